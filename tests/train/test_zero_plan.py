# SPDX-License-Identifier: Apache-2.0
"""The ZeRO partition plan through tidal._core.zero: ownership, buckets, param slices reassembling
each parameter (checked on real tensors), gather groups, and argument errors."""
import pytest
import torch

from tidal._core import zero


def check(plan, numels, group_starts=None):
    assert plan.numel == sum(numels)
    assert plan.padded_numel == plan.world_size * plan.shard_numel
    assert plan.shard_numel % plan.alignment == 0
    # Buckets tile each shard once, aligned, no larger than bucket_numel.
    at = 0
    for lo, hi in plan.buckets:
        assert lo == at and lo < hi and hi - lo <= plan.bucket_numel and lo % plan.alignment == 0
        at = hi
    assert at == plan.shard_numel
    # Scatter every parameter into the ranks' shards through its slices, gather it back.
    params = [torch.arange(n, dtype=torch.float64) + 1000 * i for i, n in enumerate(numels)]
    shards = [torch.full((plan.shard_numel,), -1.0, dtype=torch.float64) for _ in range(plan.world_size)]
    for t, layout in zip(params, plan.params):
        assert layout.flat_offset % plan.alignment == 0 and layout.numel == t.numel()
        for s in layout.shards:
            n = s.param_end - s.param_begin
            assert (shards[s.rank][s.shard_begin:s.shard_begin + n] == -1).all()  # no element twice
            shards[s.rank][s.shard_begin:s.shard_begin + n] = t[s.param_begin:s.param_end]
            assert plan.owner_of(layout.flat_offset + s.param_begin) == s.rank
    flat = torch.cat(shards)
    for t, layout in zip(params, plan.params):
        assert torch.equal(flat[layout.flat_offset:layout.flat_offset + layout.numel], t)
    # Groups tile the parameters; their shard parts cover their flat range.
    starts = list(group_starts or ([0] if numels else []))
    assert [g.param_begin for g in plan.groups] == starts
    assert [g.param_end for g in plan.groups] == starts[1:] + ([len(numels)] if numels else [])
    for g in plan.groups:
        assert sum(s.shard_end - s.shard_begin for s in g.shards) == g.flat_end - g.flat_begin
        for s in g.shards:
            assert plan.owner_of(plan.shard_offset(s.rank) + s.shard_begin) == s.rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("alignment", [1, 4, 16])
@pytest.mark.parametrize("numels", [[1], [7, 0, 13], [4096, 1, 0, 333], [100003], [0, 0, 5]])
def test_plan(numels, alignment, world_size):
    starts = list(range(0, len(numels), 2))
    plan = zero.make_plan(numels, world_size, bucket_numel=3 * alignment + 1, alignment=alignment,
                          group_starts=starts)
    check(plan, numels, starts)
    check(zero.make_plan(numels, world_size, 1000, alignment), numels)


def test_known_values():
    plan = zero.make_plan([3, 5, 2], 2, 4)
    assert (plan.numel, plan.shard_numel, plan.padded_numel) == (10, 5, 10)
    assert plan.buckets == [(0, 4), (4, 5)]
    s0, s1 = plan.params[1].shards
    assert (s0.rank, s0.param_begin, s0.param_end, s0.shard_begin) == (0, 0, 2, 3)
    assert (s1.rank, s1.param_begin, s1.param_end, s1.shard_begin) == (1, 2, 5, 0)
    assert "ZeroPlan(" in repr(plan) and "ParamShard(" in repr(plan.params[1])
    aligned = zero.make_plan([3, 5, 1], 3, 10, alignment=4)
    assert [p.flat_offset for p in aligned.params] == [0, 4, 12] and aligned.shard_numel == 8
    assert zero.make_plan([], 4, 8).groups == []
    with pytest.raises(AttributeError):
        plan.shard_numel = 3


@pytest.mark.parametrize("args, kwargs, error, needle", [
    (([4], 0, 4), {}, ValueError, "world_size=0"),
    (([4], 2, 0), {}, ValueError, "bucket_numel=0"),
    (([4], 2, 4), dict(alignment=0), ValueError, "alignment=0"),
    (([4], 2, 2), dict(alignment=4), ValueError, "bucket_numel=2 must be >= alignment=4"),
    (([4, -3], 2, 4), {}, ValueError, r"param_numels\[1\]=-3"),
    (([4, 4], 2, 4), dict(group_starts=[1]), ValueError, r"group_starts\[0\]=1 must be 0"),
    (([4, 4], 2, 4), dict(group_starts=[0, 0]), ValueError, r"group_starts\[1\]=0"),
    (([4, 4], 2, 4), dict(group_starts=[0, 5]), ValueError, r"group_starts\[1\]=5"),
])
def test_errors(args, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        zero.make_plan(*args, **kwargs)


def test_owner_of_range():
    plan = zero.make_plan([4, 4], 2, 4)
    with pytest.raises(IndexError, match="flat_index=8"):
        plan.owner_of(8)
