"""ElasticSampler: each step's global batch is one stretch of the epoch's permutation whatever the
world size, split over ranks and accumulation steps; every sample of an epoch is seen once; its
state travels in a checkpoint's client_state, and a job resumed at another world size (2 ranks ->
3) carries on at the first unseen sample, so over the whole run no sample is skipped or seen twice."""

import collections

import pytest
import torch

import tidal
from tidal.train.data import ElasticSampler
from train_util import spawn

N, GLOBAL, MICRO = 50, 12, 2


def steps(sampler: ElasticSampler, count: int) -> list[list[int]]:
    """The indices this rank takes in each of ``count`` steps (its micro-batches concatenated)."""
    it = iter(sampler)
    return [sum((next(it) for _ in range(sampler.accumulation)), []) for _ in range(count)]


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_a_step_is_the_same_samples_at_any_world_size(world):
    single = steps(ElasticSampler(N, GLOBAL, MICRO, 1, 0), 8)
    per_rank = [steps(ElasticSampler(N, GLOBAL, MICRO, world, r), 8) for r in range(world)]
    for step in range(8):
        together = sorted(sum((per_rank[r][step] for r in range(world)), []))
        assert together == sorted(single[step])
    # 4 whole steps per epoch of 50 (48 used): each epoch's samples distinct
    for epoch in range(2):
        seen = sum(single[epoch * 4:(epoch + 1) * 4], [])
        assert len(seen) == len(set(seen)) == 48


def test_state_resumes_at_another_world_size():
    first = ElasticSampler(N, GLOBAL, MICRO, 2, 0)
    steps(first, 3)
    state = first.state_dict()
    assert state["consumed"] == 3 * GLOBAL
    want = steps(ElasticSampler(N, GLOBAL, MICRO, 1, 0), 6)[3:]
    got = [[] for _ in range(3)]
    for r in range(3):
        sampler = ElasticSampler(N, GLOBAL, MICRO, 3, r)
        sampler.load_state_dict(state)
        for i, batch in enumerate(steps(sampler, 3)):
            got[i] += batch
    assert [sorted(g) for g in got] == [sorted(w) for w in want]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"global_batch=12 must be a multiple of micro_batch=5 \* world_size=1"):
        ElasticSampler(N, GLOBAL, 5, 1, 0)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        ElasticSampler(N, GLOBAL, MICRO, 2, 2)
    sampler = ElasticSampler(N, GLOBAL, MICRO, 1, 0)
    with pytest.raises(ValueError, match="the sampler state has global_batch=24"):
        sampler.load_state_dict(dict(sampler.state_dict(), global_batch=24))


def job(rank: int, world: int, ckpt: str, first: int, last: int, load: bool) -> dict:
    """Trains steps [first, last) on ElasticSampler's micro-batches of a toy dataset, saving the
    sampler in the checkpoint at the end; returns the sample ids this rank trained on."""
    data_x = torch.randn(N, 8, generator=torch.Generator().manual_seed(0))
    data_y = torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    engine = tidal.initialize(torch.nn.Linear(8, 4), {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO,
                                             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                             "zero_optimization": {"stage": 1}})
    sampler = ElasticSampler.for_engine(N, engine, seed=7)
    if load:
        engine.load_checkpoint(ckpt)
        sampler.load_state_dict(engine.client_state["sampler"])
    assert engine.global_steps == first
    seen, batches = [], iter(sampler)
    while engine.global_steps < last:
        ids = next(batches)
        seen += ids
        engine.backward(torch.nn.functional.mse_loss(engine(data_x[ids]), data_y[ids]))
        engine.step()
    engine.save_checkpoint(ckpt, client_state={"sampler": sampler.state_dict()})
    return {"seen": seen}


def test_no_sample_skipped_or_repeated_across_a_world_size_change(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    before = spawn(2, job, (ckpt, 0, 2, False), str(tmp_path))
    after = spawn(3, job, (ckpt, 2, 4, True), str(tmp_path))
    counts = collections.Counter(sum((r["seen"] for r in before + after), []))
    assert sum(counts.values()) == 4 * GLOBAL and set(counts.values()) == {1}  # 48 distinct samples, once each
