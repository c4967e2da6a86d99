"""ZeRO stage 3's communication (tidal.train.stage3): gradients partitioned during every backward pass
(each rank accumulates only its shard; buckets reduce-scattered while the backward pass goes on under
overlap_comm, the same values without it), and parameter gathers prefetched ahead of use in both
passes, bounded by stage3_prefetch_bucket_size and stage3_max_live_parameters, with results equal bit
for bit to those without prefetch, on 2 and 4 Gloo ranks."""

import pytest
import torch

import tidal
from train_util import ACCUM, assert_state_close, config, make_model, micro_batch, reference, spawn

STEPS = 3


def _train(rank: int, world: int, zero: dict, precision: str = "fp32") -> dict:
    cfg = config(3, world)
    cfg["zero_optimization"].update(zero)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    model = make_model()
    modules = [m for m in model.modules() if list(m.parameters(recurse=False))]
    # the first layer's gradients are the last of a backward pass: the buckets launched before its
    # weight's reaches the engine (this hook, registered first, runs before the engine's)
    launched_before_last = []
    modules[0].weight.register_post_accumulate_grad_hook(
        lambda p: launched_before_last.append(engine.reducer.launched))
    engine = tidal.initialize(model, cfg)
    reducer, gatherer = engine.reducer, engine.gatherer
    # during the backward pass, which groups are gathered or in flight when each module's backward starts
    ahead_in_backward = []

    def record(module, grad_output):
        ahead_in_backward.append([g.pending is not None or g.buffer is not None for g in gatherer.groups])

    for m in modules:
        m.register_full_backward_pre_hook(record)
    for step in range(STEPS):
        for a in range(ACCUM):
            x, y = micro_batch(step, a, rank, world)
            if precision == "bf16":
                x, y = x.bfloat16(), y.bfloat16()
            launched = reducer.launched
            engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y.float()))
            launched_before_last[-1] -= launched
            engine.step()
    return {"state": {k: v.cpu() for k, v in engine.full_state_dict().items()},
            "accum_numel": engine.grad_accum.numel(), "shard_numel": engine.plan.shard_numel,
            "padded_numel": engine.plan.padded_numel, "buckets": len(reducer.buckets),
            "launched_before_last": launched_before_last, "ahead_in_backward": ahead_in_backward,
            "peak_live": gatherer.peak_live_numel, "group_numels": [g.numel for g in gatherer.groups],
            "order": list(gatherer.order)}


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_gradients_match_adamw_and_overlap_changes_nothing(world, tmp_path):
    small = {"reduce_bucket_size": 64}  # one module per bucket
    overlapped = spawn(world, _train, ({**small, "overlap_comm": True},), str(tmp_path))
    plain = spawn(world, _train, ({**small, "overlap_comm": False},), str(tmp_path))
    assert_state_close(overlapped[0]["state"], reference(STEPS))
    for a, b in zip(plain, overlapped):
        for name in a["state"]:
            assert torch.equal(a["state"][name], b["state"][name]), name
    result = overlapped[0]
    # the accumulator is this rank's shard, not the whole model
    assert result["accum_numel"] == result["shard_numel"] < result["padded_numel"]
    # one bucket per module, and all but the first layer's went out before its gradient arrived
    assert result["buckets"] == 3
    assert result["launched_before_last"] == [2] * (STEPS * ACCUM)


def test_bf16_partitioned_gradients_track_fp32(tmp_path):
    got = spawn(2, _train, ({"reduce_bucket_size": 64}, "bf16"), str(tmp_path))[0]
    want = reference(STEPS)
    for name, tensor in want.items():
        torch.testing.assert_close(got["state"][name], tensor, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("world", [2, 4])
def test_prefetch_runs_ahead_in_both_passes_and_changes_nothing(world, tmp_path):
    prefetched = spawn(world, _train, ({},), str(tmp_path))  # DeepSpeed's defaults: everything ahead
    none = spawn(world, _train, ({"stage3_prefetch_bucket_size": 0},), str(tmp_path))
    one = spawn(world, _train, ({"stage3_max_live_parameters": 1},), str(tmp_path))
    for a, b, c in zip(prefetched, none, one):
        for name in a["state"]:
            assert torch.equal(a["state"][name], b["state"][name]), name
            assert torch.equal(a["state"][name], c["state"][name]), name
    p, n, o = prefetched[0], none[0], one[0]
    order = p["order"]
    assert len(order) == 3
    # backward passes after the first: when a module's backward starts, every module before it in the
    # forward order is already gathered or in flight (its own group is gathered too)
    calls = p["ahead_in_backward"][3:]
    for i, flags in enumerate(calls):
        position = 2 - i % 3  # backward visits the modules in reverse
        assert all(flags[g] for g in order[:position + 1]), (i, flags)
    # without prefetch, or with no room for it, no module before the running one is gathered
    for result in (n, o):
        for i, flags in enumerate(result["ahead_in_backward"][3:]):
            position = 2 - i % 3
            assert flags[order[position]] and not any(flags[g] for g in order[:position]), (i, flags)
        assert result["peak_live"] < sum(result["group_numels"])
    assert p["peak_live"] == sum(p["group_numels"])
