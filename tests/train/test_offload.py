"""ZeRO-Offload: with ``offload_optimizer`` (and, at stage 3, ``offload_param``) on the CPU, the fp32
master weights and Adam moments (and the stage-3 parameter shard) live in host memory, the C++ Adam
steps the owned range chunk by chunk, and the weights after several steps equal those of the engine
without offload and the single-process torch AdamW reference, at every stage on 1 and 2 Gloo ranks; a
DeepSpeed config with the offload keys runs unchanged; config errors name the key. On a GPU the
state is pinned host memory and the result matches the on-device engine within fp32 rounding. On one
rank the gradients reach the host during the backward pass and, without clipping, each chunk is
stepped there (from the second step on), with the same weights; a gradient arriving in two parts
(reentrant checkpoints sharing a parameter) is never stepped early; a failed backward pass stops the
host thread."""

import pytest
import torch

import tidal
from train_util import ACCUM, assert_state_close, config, make_model, micro_batch, reference, spawn

STEPS = 3
OFFLOAD = {"device": "cpu", "pin_memory": True, "buffer_count": 4, "fast_init": False, "ratio": 1.0}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(rank: int, world: int, stage: int, offload: bool, offload_param: bool, device: str = "cpu") -> dict:
    cfg = config(stage, world)
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = dict(OFFLOAD)
    if offload_param:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True, "buffer_size": 1 << 20,
                                                     "max_in_cpu": 1 << 30}
    engine = tidal.initialize(make_model().to(device), cfg)
    engine.offload_chunk = 100  # several chunks per shard: the pipelined path, not one piece
    placement = {"master": engine.master.device.type,
                 "pinned": engine.master.is_pinned() if device == "cuda" else None,
                 "shard": None if engine.flat_shard is None else engine.flat_shard.device.type}
    for step in range(STEPS):
        for a in range(ACCUM):
            x, y = (t.to(device) for t in micro_batch(step, a, rank, world))
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
    return {"state": {k: v.cpu() for k, v in engine.full_state_dict().items()}, "placement": placement}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_offloaded_optimizer_matches_the_engine_without_it(stage, world, tmp_path):
    with_offload = spawn(world, train, (stage, True, False), str(tmp_path))
    without = spawn(world, train, (stage, False, False), str(tmp_path))
    assert with_offload[0]["placement"]["master"] == "cpu"
    assert_state_close(with_offload[0]["state"], without[0]["state"], rtol=0, atol=0)
    assert_state_close(with_offload[0]["state"], reference(STEPS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_offloaded_parameters_at_stage_3(world, tmp_path):
    got = spawn(world, train, (3, True, True), str(tmp_path))
    want = spawn(world, train, (3, False, False), str(tmp_path))
    assert got[0]["placement"] == {"master": "cpu", "pinned": None, "shard": "cpu"}
    assert_state_close(got[0]["state"], want[0]["state"], rtol=0, atol=0)


@pytest.mark.parametrize("zero,match", [
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}},
     "zero_optimization.offload_optimizer.device='nvme' is not supported"),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}},
     "zero_optimization.offload_optimizer.device='gpu' must be 'cpu' or 'none'"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
     "zero_optimization.offload_optimizer.ratio=0.5: partial offload is not supported"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memroy": True}},
     "zero_optimization.offload_optimizer.pin_memroy is not a known key; did you mean "
     "zero_optimization.offload_optimizer.pin_memory"),
    ({"stage": 2, "offload_param": {"device": "cpu"}},
     "zero_optimization.offload_param.device='cpu' needs zero_optimization.stage=3, got stage 2"),
    ({"stage": 3, "offload_param": "cpu"}, "zero_optimization.offload_param='cpu' must be an object"),
])
def test_config_errors(zero, match):
    with pytest.raises(ValueError, match=match):
        tidal.initialize(torch.nn.Linear(2, 2), {"train_batch_size": 1, "zero_optimization": zero})


@needs_gpu
@pytest.mark.parametrize("stage,offload_param", [(0, False), (2, False), (3, True)])
def test_offload_on_gpu_keeps_state_in_pinned_host_memory(stage, offload_param, tmp_path):
    got = train(0, 1, stage, True, offload_param, "cuda")
    want = train(0, 1, stage, False, False, "cuda")
    assert got["placement"]["master"] == "cpu" and got["placement"]["pinned"]
    if offload_param:
        assert got["placement"]["shard"] == "cpu"
    # the host's C++ Adam against torch's arithmetic on the GPU: fp32 rounding apart
    assert_state_close(got["state"], want["state"], rtol=1e-5, atol=1e-6)


# ---- one rank: the trip to the host (and Adam, without clipping) overlapped with the backward pass ----

def _one_rank(device: str, offload: bool, clip: float, model=None, steps: int = STEPS):
    """Trains on one rank; returns the final state and, per optimizer step, whether it was stepped
    during the backward pass: the pipeline stepped its chunks and engine.step() ran no Adam of its
    own (and the weights did change)."""
    cfg = config(0, 1, gradient_clipping=clip)
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = dict(OFFLOAD)
    engine = tidal.initialize((model or make_model()).to(device), cfg)
    engine.offload_chunk = 100  # several chunks: parameters complete them at different times
    adam_calls = []
    engine_adam = engine._adam
    engine._adam = lambda *a, **k: (adam_calls.append(1), engine_adam(*a, **k))
    early = []
    for step in range(steps):
        for a in range(ACCUM):
            x, y = (t.to(device) for t in micro_batch(step, a, 0, 1))
            before, calls = engine.master.clone(), len(adam_calls)
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:
                assert not torch.equal(before, engine.master)
                early.append(len(adam_calls) == calls)
    return {k: v.cpu() for k, v in engine.full_state_dict().items()}, early, engine


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_gpu, pytest.mark.gpu])])
def test_one_rank_without_clipping_steps_during_the_backward_pass(device):
    got, changed, engine = _one_rank(device, True, 0.0)
    want, _, _ = _one_rank(device, False, 0.0)
    assert engine.offload_pipeline is not None
    # the first step learns that every parameter gets its gradient once; later ones step early
    assert changed == [False] + [True] * (STEPS - 1)
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    assert_state_close(got, want, **tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_gpu, pytest.mark.gpu])])
def test_one_rank_with_clipping_steps_after_the_norm(device):
    """Clipping needs the global norm: the chunks reach the host during the backward pass and are
    stepped by engine.step(), with the same weights as without offload."""
    got, changed, engine = _one_rank(device, True, 0.5)
    want, _, _ = _one_rank(device, False, 0.5)
    assert engine.offload_pipeline is not None and changed == [False] * STEPS
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    assert_state_close(got, want, **tol)


class _SharedAcrossCheckpoints(torch.nn.Module):
    """One linear applied in two reentrant checkpoints: its gradient reaches it in two parts."""

    def __init__(self):
        super().__init__()
        self.inner = make_model()
        self.shared = torch.nn.Linear(self.inner[-2].out_features, self.inner[-2].out_features)

    def forward(self, x):
        from tidal import checkpointing

        h = checkpointing.checkpoint(lambda t: self.shared(self.inner(t)), x)
        return checkpointing.checkpoint(lambda t: torch.tanh(self.shared(t)), h)


def test_one_rank_gradient_in_two_parts_is_never_stepped_early():
    torch.manual_seed(1)
    got, changed, engine = _one_rank("cpu", True, 0.0, _SharedAcrossCheckpoints())
    torch.manual_seed(1)
    want, _, _ = _one_rank("cpu", False, 0.0, _SharedAcrossCheckpoints())
    assert changed == [False] * STEPS and not engine.offload_pipeline.step_early_ok
    assert_state_close(got, want, rtol=0, atol=0)


def test_one_rank_failed_backward_leaves_the_step_to_do():
    """A backward pass that raises (here while the host thread waits to step chunks early) stops
    that thread; the next one trains as usual."""
    cfg = config(0, 1, gradient_clipping=0.0, gradient_accumulation_steps=1, train_batch_size=4)
    cfg["zero_optimization"]["offload_optimizer"] = dict(OFFLOAD)
    engine = tidal.initialize(make_model(), cfg)
    x, y = micro_batch(0, 0, 0, 1)
    engine.backward(torch.nn.functional.mse_loss(engine(x[:4]), y[:4]))
    engine.step()  # the first step shows each parameter firing once: the next ones step early

    def boom(grad):
        raise RuntimeError("boom")

    out = engine(x[:4])
    out.register_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        engine.backward(torch.nn.functional.mse_loss(out, y[:4]))
    pipeline = engine.offload_pipeline
    assert pipeline.stepping_early and not pipeline.active and not pipeline.worker.is_alive()
    engine.backward(torch.nn.functional.mse_loss(engine(x[:4]), y[:4]))
    engine.step()
    assert engine.optimizer_steps == 2 and pipeline.stepped
