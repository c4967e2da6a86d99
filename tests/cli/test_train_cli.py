"""`tidal train`: the demo model trained from a DeepSpeed config, resumable and elastic. Stopping and
resuming gives the weights of an uninterrupted run; a job started on 2 torchrun ranks (elasticity
section, ZeRO stage 1) and finished on 1 process gives them too; checkpoints follow save_interval /
keep_last (asynchronous saves included); the model it writes loads in tidal.LLM; bad arguments are
clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tidal
from tidal.cli import main

ARGS = ["--seq-len", "32", "--save-interval", "2"]


def _config(tmp_path, **extra) -> str:
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}}, "gradient_clipping": 1.0,
              **extra}
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.json')))}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _weights(out) -> dict:
    return load_file(os.path.join(out, "model", "model.safetensors"))


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"{name}: {m}", **tol)


def test_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    config = _config(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    stopped, whole = str(tmp_path / "stopped"), str(tmp_path / "whole")
    assert main(["train", "--config", config, "--out", stopped, "--steps", "3", *ARGS]) == 0
    assert main(["train", "--config", config, "--out", stopped, "--steps", "5", *ARGS]) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    assert main(["train", "--config", config, "--out", whole, "--steps", "5", *ARGS]) == 0
    _assert_same(_weights(stopped), _weights(whole), rtol=0, atol=0)
    llm = tidal.LLM(os.path.join(whole, "model"), device="cpu", num_kv_blocks=64, max_model_len=128)
    out = llm.generate(["def "], tidal.SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_async_saves_and_keep_last(tmp_path):
    config = _config(tmp_path, train_micro_batch_size_per_gpu=2)
    out = str(tmp_path / "run")
    assert main(["train", "--config", config, "--out", out, "--steps", "5", "--seq-len", "16", "--save-interval", "1",
                 "--keep-last", "2", "--async-save"]) == 0
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d != "latest")
    assert kept == ["global_step4", "global_step5"]
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "global_step5"


def test_two_torchrun_ranks_then_one_process(tmp_path):
    """The elasticity section gives the same global batch (8) at 1 and 2 ranks; the ZeRO state of the
    2-rank checkpoint is resharded for 1; the result is the 1-process run's within fp32 tolerance."""
    config = _config(tmp_path, elasticity={"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2, 4],
                                           "min_gpus": 1, "max_gpus": 2, "version": 0.1},
                     zero_optimization={"stage": 1})
    grown, whole = str(tmp_path / "grown"), str(tmp_path / "whole")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "tidal", "train", "--config", config, "--out", grown, "--steps", "3", *ARGS],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "on 2 rank(s)" in result.stdout and "global batch 8" in result.stdout
    assert main(["train", "--config", config, "--out", grown, "--steps", "5", *ARGS]) == 0
    assert main(["train", "--config", config, "--out", whole, "--steps", "5", *ARGS]) == 0
    # NOTE: a few embedding rows of tokens barely seen get gradients at the level of the fp32 noise
    # that 2-rank reduction adds, and Adam divides them by their own square root: those elements move
    # by a fraction of lr (3e-3) either way. A resume that skipped or repeated samples moves most
    # elements by about lr.
    _assert_same(_weights(grown), _weights(whole), rtol=1e-3, atol=5e-4)


@pytest.mark.parametrize("args,message", [
    (["--config", "missing.json"], "config 'missing.json' cannot be read"),
    (["--config", "BAD"], "is not valid JSON"),
    (["--steps", "0"], "steps=0 must be at least 1"),
    (["--seq-len", "4096"], "seq_len=4096 must be in"),
])
def test_errors(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    full = {"--config": _config(tmp_path), "--out": str(tmp_path / "o"), "--steps": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        full[flag] = str(bad) if value == "BAD" else value
    assert main(["train", *[x for kv in full.items() for x in kv]]) == 1
    assert message in capsys.readouterr().err
