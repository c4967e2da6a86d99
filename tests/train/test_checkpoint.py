"""Sharded checkpoints: saved at world 4, resumed at world 2 and world 1 (other stages too), the
trajectory continues exactly; a corrupt or missing shard is an error naming the file, and the last
good checkpoint still loads. Asynchronous saves hold the state of their step, stay invisible until
complete, surface a writer's error, and a process killed mid-save leaves the previous checkpoint;
keep_last prunes the older ones."""

import os

import pytest

from train_util import assert_state_close, reference, run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    run(4, 2, [("train", 0, 1), ("save", ckpt, "first"), ("train", 1, 2), ("save", ckpt, None)],
        os.path.join(ckpt, "out.pt"))
    return ckpt


@pytest.mark.parametrize("world,stage", [(2, 1), (1, 0), (3, 2), (2, 3)])
def test_resume_at_another_world_size_continues_exactly(saved, world, stage, tmp_path):
    result = run(world, stage, [("load", saved, None), ("train", 2, 4)], str(tmp_path / "out.pt"))
    assert result["global_steps"] == 4
    assert_state_close(result["state"], reference(4))


def test_layout_and_latest(saved):
    assert open(os.path.join(saved, "latest")).read() == "global_step2"
    files = sorted(os.listdir(os.path.join(saved, "global_step2")))
    assert files == ["index.json"] + [f"rank_{r:05d}.safetensors" for r in range(4)]
    assert not any(name.endswith(".tmp") for name in os.listdir(saved))


def test_corrupt_and_missing_shards_are_named_and_the_last_good_one_loads(saved, tmp_path):
    import shutil

    from tidal.train.checkpoint import read_full_state

    broken = str(tmp_path / "broken")
    shutil.copytree(saved, broken)
    shard = os.path.join(broken, "global_step2", "rank_00002.safetensors")
    with open(shard, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="rank_00002.safetensors is corrupt"):
        read_full_state(broken)
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="rank_00002.safetensors is corrupt or truncated"):
        read_full_state(broken)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="rank_00002.safetensors is missing"):
        read_full_state(broken)
    result = run(1, 0, [("load", broken, "first"), ("train", 1, 3)], str(tmp_path / "out.pt"))
    assert_state_close(result["state"], reference(3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_full_state(broken, "no_such_tag")


# ---- asynchronous saves and keep_last ----------------------------------------------------------

def _same_state(a: str, b: str) -> None:
    from tidal.train.checkpoint import read_full_state

    (index_a, want), (index_b, got) = read_full_state(a), read_full_state(b)
    assert index_a["counters"] == index_b["counters"]
    for state in want:
        assert_state_close(got[state], want[state], rtol=0, atol=0)


def test_async_save_holds_the_state_of_its_step(tmp_path):
    """Saved in the background while two more steps train (2 ranks, ZeRO-2): the files hold the
    state of the step the save was called at, as a synchronous save there does."""
    async_dir, sync_dir = str(tmp_path / "async"), str(tmp_path / "sync")
    got = run(2, 2, [("train", 0, 1), ("save_async", async_dir, "s"), ("train", 1, 3)], str(tmp_path / "a.pt"))
    run(2, 2, [("train", 0, 1), ("save", sync_dir, "s")], str(tmp_path / "b.pt"))
    _same_state(async_dir, sync_dir)
    assert got["global_steps"] == 3
    assert sorted(os.listdir(os.path.join(async_dir, "s"))) == \
        ["index.json"] + [f"rank_{r:05d}.safetensors" for r in range(2)]


def _engine():
    import tidal
    from train_util import config, make_model

    return tidal.initialize(make_model(), config(1, 1))


def _train_step(engine, step: int) -> None:
    import torch

    from train_util import ACCUM, micro_batch

    for a in range(ACCUM):
        x, y = micro_batch(step, a, 0, 1)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()


def test_async_save_is_invisible_until_complete(tmp_path, monkeypatch):
    import threading

    from tidal.train import checkpoint

    release, writing = threading.Event(), threading.Event()
    write_file = checkpoint._write_file

    def held(path, tensors):  # the writer waits until the test lets it go
        writing.set()
        assert release.wait(30)
        write_file(path, tensors)

    monkeypatch.setattr(checkpoint, "_write_file", held)
    engine, directory = _engine(), str(tmp_path)
    _train_step(engine, 0)
    path = engine.save_checkpoint(directory, "a", async_save=True)
    assert writing.wait(30)
    assert not os.path.exists(path) and not os.path.exists(os.path.join(directory, "latest"))
    _train_step(engine, 1)  # training goes on while the save is pending
    assert engine.checkpoint_pending()
    release.set()
    assert engine.wait_for_checkpoint() == path
    assert not engine.checkpoint_pending()
    assert open(os.path.join(directory, "latest")).read() == "a"
    fresh = _engine()
    fresh.load_checkpoint(directory)
    assert fresh.global_steps == 1


def test_a_failed_async_save_raises_and_is_never_visible(tmp_path, monkeypatch):
    from tidal.train import checkpoint

    def broken(path, tensors):
        raise OSError("disk full")

    engine, directory = _engine(), str(tmp_path)
    engine.save_checkpoint(directory, "good")
    monkeypatch.setattr(checkpoint, "_write_file", broken)
    engine.save_checkpoint(directory, "bad", async_save=True)
    with pytest.raises(OSError, match="disk full"):
        engine.wait_for_checkpoint()
    assert open(os.path.join(directory, "latest")).read() == "good"
    assert not os.path.exists(os.path.join(directory, "bad"))


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """A job killed while its background save is writing: ``latest`` still names the previous
    checkpoint, which loads; the unfinished one exists only as ``<tag>.tmp``."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    directory = str(tmp_path)
    code = f"""
import os, sys
sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]
import test_checkpoint as t
from tidal.train import checkpoint
engine = t._engine()
t._train_step(engine, 0)
engine.save_checkpoint({directory!r}, "first")
t._train_step(engine, 1)
write_file = checkpoint._write_file
def dying(path, tensors):
    with open(path, "wb") as f:
        f.write(b"half a file")
    os._exit(9)
checkpoint._write_file = dying
engine.save_checkpoint({directory!r}, "second", async_save=True)
t._train_step(engine, 2)
engine.wait_for_checkpoint()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-2000:]
    assert open(os.path.join(directory, "latest")).read() == "first"
    assert os.path.isdir(os.path.join(directory, "second.tmp"))
    assert not os.path.exists(os.path.join(directory, "second"))
    fresh = _engine()
    fresh.load_checkpoint(directory)
    assert fresh.global_steps == 1


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_last(async_save, tmp_path):
    engine, directory = _engine(), str(tmp_path)
    for step in range(4):
        _train_step(engine, step)
        engine.save_checkpoint(directory, async_save=async_save, keep_last=2)
    engine.wait_for_checkpoint()
    assert sorted(os.listdir(directory)) == ["global_step3", "global_step4", "latest"]
    with pytest.raises(ValueError, match="keep_last=0 must be a positive integer or None"):
        engine.save_checkpoint(directory, keep_last=0)


def test_resume_with_other_accumulation_steps_keeps_step_boundaries(tmp_path):
    """Elasticity changes the accumulation steps with the world size: after loading, a step is again
    exactly that many micro-batches (the step counter, not the saved micro-batch count, decides)."""
    import tidal
    from train_util import make_model

    def engine(gas: int):
        return tidal.initialize(make_model(), {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas,
                                               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})

    first = engine(2)
    for _ in range(3):
        _train_step(first, 0)  # two micro-batches per _train_step (ACCUM = 2): one step each
    first.save_checkpoint(str(tmp_path))
    resumed = engine(3)
    resumed.load_checkpoint(str(tmp_path))
    assert resumed.global_steps == 3 and resumed.micro_steps == 9
    boundaries = []
    for _ in range(3):
        boundaries.append(resumed.is_gradient_accumulation_boundary())
        resumed.micro_steps += 1
    assert boundaries == [False, False, True]


def test_shard_files_are_safetensors_with_their_checksum(tmp_path):
    """The shard writer's own safetensors layout reads back with safetensors for every dtype it takes,
    empty and multi-dimensional tensors included, and its sidecar is the file's sha256."""
    import hashlib

    import torch

    from safetensors.torch import load_file

    from tidal.train import checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"master": torch.randn(1000, generator=g), "half": torch.randn(3, 5, generator=g).half(),
               "bf": torch.randn(7, generator=g).bfloat16(), "ids": torch.arange(-3, 9), "small": torch.arange(5).int(),
               "bytes": torch.arange(11, dtype=torch.uint8), "empty": torch.zeros(0)}
    path = str(tmp_path / "rank_00000.safetensors")
    checkpoint._write_file(path, tensors)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert open(path + ".sha256").read() == hashlib.sha256(open(path, "rb").read()).hexdigest()
