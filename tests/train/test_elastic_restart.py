"""A job that loses a rank and carries on (examples/elastic/train.py on Gloo ranks): 3 ranks train,
one dies after step 4 without a word, the survivors' next collective fails (CollectiveError) instead
of hanging; restarted on the 2 that are left (what torchrun's elastic agent does) the job loads the
latest checkpoint, re-plans the ZeRO partition, keeps the global batch through elasticity, and its
sampler resumes at the first unseen sample; it then grows back to 3 ranks. Over the whole run every
sample is trained once (counted), and the final weights equal an uninterrupted single-process run
over the same samples within fp32 tolerance."""

import collections
import json
import os
import sys

import torch
import torch.multiprocessing as mp

from train_util import _worker, assert_state_close, free_port, spawn

EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "examples", "elastic")


def _example():
    if EXAMPLE_DIR not in sys.path:
        sys.path.insert(0, EXAMPLE_DIR)
    import train as example  # examples/elastic/train.py

    return example


def _die_after(step: int, rank: int):
    def after_step(engine):
        if engine.global_steps == step and engine.rank == rank:
            os._exit(1)  # the node is gone
    return after_step


def job(rank: int, world: int, out: str, steps: int, die: tuple | None) -> dict:
    os.environ["TIDAL_COLLECTIVE_TIMEOUT_S"] = "20"
    example = _example()
    try:
        example.train(out, steps, after_step=None if die is None else _die_after(*die))
    except Exception as e:  # the survivors of a lost rank: the collective that failed, named
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def test_a_job_loses_a_rank_restarts_smaller_and_grows_back(tmp_path):
    out = str(tmp_path / "run")
    # 3 ranks until rank 2 dies after step 4 (plain processes: the others are left to notice)
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_worker, args=(r, 3, port, job, (out, 12, (4, 2)), str(tmp_path))) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 1]
    survivors = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    for s in survivors:
        assert s["error"] is not None and s["error"].startswith("CollectiveError: collective ")
    # restarted on the 2 left, then on 3 again
    assert all(r["error"] is None for r in spawn(2, job, (out, 8, None), str(tmp_path)))
    assert all(r["error"] is None for r in spawn(3, job, (out, 12, None), str(tmp_path)))

    with open(os.path.join(out, "trained.json")) as f:
        trained = json.load(f)
    assert [r["step"] for r in trained] == list(range(1, 13))
    assert [r["world_size"] for r in trained] == [3] * 4 + [2] * 4 + [3] * 4
    counts = collections.Counter(x for r in trained for x in r["samples"])
    assert sum(counts.values()) == 12 * 12 and set(counts.values()) == {1}  # none skipped, none twice

    want = _example().train(str(tmp_path / "uninterrupted"), 12)  # one process, the same global batches
    assert_state_close(torch.load(os.path.join(out, "final.pt")), want, rtol=1e-4, atol=1e-5)
