"""zero_optimization.overlap_comm below stage 3 (tidal.train.overlap): the buckets' reductions
(stage 2's reduce-scatters, stage 0's and 1's all-reduces) start during the accumulation boundary's
backward pass, and the trained weights equal those of the non-overlapped reduction bit for bit, on 2
and 4 Gloo ranks, fp32 and bf16, with gradient accumulation and clipping; a gradient replaced by hand
after its bucket started is refused by name."""

import pytest
import torch

import tidal
from train_util import ACCUM, config, make_model, micro_batch, spawn

STEPS = 3


def _train(rank: int, world: int, overlap: bool, precision: str, stage: int = 2) -> dict:
    cfg = config(stage, world)
    cfg["zero_optimization"].update(overlap_comm=overlap, reduce_bucket_size=256)  # 128-element buckets
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine = tidal.initialize(make_model(), cfg)
    assert (engine.overlap is not None) == overlap
    started = []  # buckets whose reduce-scatter was in flight when the backward pass returned
    for step in range(STEPS):
        for a in range(ACCUM):
            x, y = micro_batch(step, a, rank, world)
            if precision == "bf16":
                x, y = x.bfloat16(), y.bfloat16()
            engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y.float()))
            if overlap and engine.is_gradient_accumulation_boundary():
                started.append(len(engine.overlap.handles))
            engine.step()
    buckets = engine.plan.buckets if stage == 2 else engine.all_reduce_buckets
    return {"state": {k: v.cpu() for k, v in engine.full_state_dict().items()}, "started": started,
            "buckets": len(buckets)}


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("world", [2, 4])
def test_overlapped_reduction_equals_the_plain_one(world, precision, stage, tmp_path):
    plain = spawn(world, _train, (False, precision, stage), str(tmp_path))
    overlapped = spawn(world, _train, (True, precision, stage), str(tmp_path))
    for a, b in zip(plain, overlapped):
        assert set(a["state"]) == set(b["state"])
        for name in a["state"]:
            assert torch.equal(a["state"][name], b["state"][name]), name
    result = overlapped[0]
    assert result["buckets"] >= 2
    # every bucket is complete once the backward pass ends: all started during it
    assert result["started"] == [result["buckets"]] * STEPS


def _replace_grad(rank: int, world: int, stage: int) -> str:
    cfg = config(stage, world)
    cfg["zero_optimization"]["overlap_comm"] = True
    engine = tidal.initialize(make_model(), cfg)
    first = engine.slots[0].param  # the first layer's weight: its gradient comes last, closing its bucket
    for a in range(ACCUM):
        x, y = micro_batch(0, a, rank, world)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        if engine.is_gradient_accumulation_boundary():
            handle = first.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", torch.zeros_like(p)))
            try:
                engine.backward(loss)
            except ValueError as e:
                return str(e)
            finally:
                handle.remove()
        else:
            engine.backward(loss)
        engine.step()
    return "no error"


@pytest.mark.parametrize("stage", [1, 2])
def test_a_gradient_replaced_after_its_bucket_started_is_refused(stage, tmp_path):
    messages = spawn(2, _replace_grad, (stage,), str(tmp_path))
    for message in messages:
        assert "overlap_comm" in message and "set outside autograd" in message, message
