"""Sharded checkpoints: saved at world 4, resumed at world 2 and world 1 (other stages too), the
trajectory continues exactly; a corrupt or missing shard is an error naming the file, and the last
good checkpoint still loads."""

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
