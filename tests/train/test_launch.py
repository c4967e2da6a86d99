"""Launching: under torchrun (env:// rendezvous, Gloo on CPU) two ranks train ZeRO stage 2 exactly like
one in-process rank on the same global batch; a plain `python script.py` with no launcher and no
distributed environment variables trains at world 1. Config errors surface through tidal.initialize."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import precision_util as pu
import tidal

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 2

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {helpers!r})
    import precision_util as pu
    import tidal

    engine = tidal.initialize(pu.make_model(), pu.config("fp32", stage=2))
    rank, world = engine.rank, engine.world_size
    for step in range({steps}):
        for a in range(pu.ACCUM):
            x, y = pu.micro_batch(step, a, rank, world)
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
    state = engine.full_state_dict()
    if rank == 0:
        print(json.dumps({{"world": world, "backend": dist.get_backend() if dist.is_initialized() else None,
                          "global_steps": engine.global_steps, "checksum": pu.checksum(state)}}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
""")

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID")


def _launch(tmp_path, *launcher) -> dict:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(helpers=HERE, steps=STEPS))
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, *launcher, str(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    return json.loads(lines[0])


def _in_process_checksum() -> dict:
    result = pu.train(0, 1, pu.config("fp32", stage=2), STEPS)
    assert result["world"] == 1
    return pu.checksum(result["state"])


def _assert_checksums_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_torchrun_two_ranks_match_one_in_process_rank(tmp_path):
    out = _launch(tmp_path, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(pu.free_port()))
    assert out["world"] == 2 and out["backend"] == "gloo"  # one job of two ranks, not two jobs of one
    assert out["global_steps"] == STEPS
    _assert_checksums_close(out["checksum"], _in_process_checksum())


def test_a_single_process_needs_no_launcher(tmp_path):
    out = _launch(tmp_path)
    assert out["world"] == 1 and out["backend"] is None
    assert out["global_steps"] == STEPS
    _assert_checksums_close(out["checksum"], _in_process_checksum())


# ---- config errors through the public entry point ------------------------------------------------


def test_unknown_key_is_named():
    cfg = {"train_batch_size": 4, "zero_optimization": {"stagee": 1}}
    with pytest.raises(ValueError, match=r"zero_optimization\.stagee.*did you mean zero_optimization\.stage"):
        tidal.initialize(pu.make_model(), cfg)


def test_unknown_key_is_named_before_a_missing_batch_size():
    with pytest.raises(ValueError, match=r"zero_optimization\.stagee"):
        tidal.initialize(pu.make_model(), {"zero_optimization": {"stagee": 1}})


def test_inconsistent_batch_config_names_the_values():
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}
    with pytest.raises(ValueError, match=r"train_batch_size=16.*train_micro_batch_size_per_gpu=3.*"
                                         r"gradient_accumulation_steps=2.*world_size=1"):
        tidal.initialize(pu.make_model(), cfg)
    with pytest.raises(ValueError, match=r"train_batch_size=15 is not divisible.*gradient_accumulation_steps=2"):
        tidal.initialize(pu.make_model(), {"train_batch_size": 15, "gradient_accumulation_steps": 2})


def test_a_json_path_configures_the_engine(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(pu.config("bf16", stage=1, gradient_clipping=1.0)))
    for config in (str(path), path):
        engine = tidal.initialize(pu.make_model(), config)
        assert engine.config.train_micro_batch_size_per_gpu == pu.GLOBAL_BATCH // pu.ACCUM
        assert engine.gradient_accumulation_steps == pu.ACCUM
        assert engine.stage == 1 and engine.config.gradient_clipping == 1.0
        assert engine.master.dtype == torch.float32
        assert next(engine.module.parameters()).dtype == torch.bfloat16
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        tidal.initialize(pu.make_model(), str(bad))
