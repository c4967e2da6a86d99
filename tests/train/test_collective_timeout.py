"""A peer that stops answering, or dies, makes the survivors' collectives raise CollectiveError naming
the collective within the configured timeout, instead of hanging (2 Gloo ranks)."""

import os
import time

import pytest
import torch

import tidal
from train_util import config, make_model, micro_batch, spawn

TIMEOUT = 3.0


def train_until_peer_fails(rank: int, world: int, how: str) -> dict:
    os.environ["TIDAL_COLLECTIVE_TIMEOUT_S"] = str(TIMEOUT)
    engine = tidal.initialize(make_model(), config(0, world, gradient_accumulation_steps=1, train_batch_size=8))
    x, y = micro_batch(0, 0, rank, world)
    engine.backward(torch.nn.functional.mse_loss(engine(x[:4]), y[:4]))
    engine.step()  # one step together
    if rank == 1:
        if how == "dies":
            os._exit(0)  # gone without a word
        time.sleep(5 * TIMEOUT)  # alive but silent well past the timeout
        return {"error": None}
    engine.backward(torch.nn.functional.mse_loss(engine(x[:4]), y[:4]))
    start = time.monotonic()
    try:
        engine.step()  # its all-reduce waits for rank 1
    except tidal.train.comm.CollectiveError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.parametrize("how", ["silent", "dies"])
def test_a_lost_peer_is_an_error_naming_the_collective(how, tmp_path):
    if how == "dies":
        results = _rank0_only(train_until_peer_fails, how, tmp_path)
    else:
        results = spawn(2, train_until_peer_fails, (how,), str(tmp_path))[0]
    assert results["error"] is not None, results
    assert "collective all_reduce over 2 ranks failed" in results["error"]
    assert results["seconds"] < 2.5 * TIMEOUT  # the timeout, not the peer waking up


def _rank0_only(fn, how, tmp_path) -> dict:
    """Spawns 2 ranks where rank 1 exits abruptly (no result file); returns rank 0's result."""
    import torch.multiprocessing as mp

    from train_util import _worker, free_port

    try:
        mp.start_processes(_worker, args=(2, free_port(), fn, (how,), str(tmp_path)), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException:
        pass  # rank 1 exiting early is the scenario; rank 0's result is what counts
    return torch.load(os.path.join(tmp_path, "rank0.pt"), weights_only=False)
