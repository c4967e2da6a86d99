# SPDX-License-Identifier: Apache-2.0
"""Every bad argument to tidal._core.kv raises ValueError / IndexError (RuntimeError for a stale
lookup) with a message that names the argument and its value."""
import pytest

from tidal._core import kv


@pytest.mark.parametrize(
    "args, needle",
    [
        ((0, 16), "num_blocks=0"),
        ((-5, 16), "num_blocks=-5"),
        ((4, 0), "block_size=0"),
        ((4, 16, True, 0), "hash_bits=0"),
        ((4, 16, True, 65), "hash_bits=65"),
    ],
)
def test_constructor(args, needle):
    with pytest.raises(ValueError, match=needle):
        kv.KVCacheManager(*args)


@pytest.fixture
def manager():
    m = kv.KVCacheManager(4, 2)
    assert m.allocate(1, 4)
    m.cache_full_blocks(1, [1, 2, 3, 4], 4)
    return m


def test_bad_values(manager):
    with pytest.raises(ValueError, match="num_tokens=-1"):
        manager.allocate(2, -1)
    with pytest.raises(ValueError, match="num_new_blocks=-3"):
        manager.can_allocate(-3)
    with pytest.raises(ValueError, match=r"extra_keys.size\(\)=1"):
        manager.lookup([1, 2, 3, 4], [7])
    with pytest.raises(ValueError, match="num_tokens=5"):
        manager.cache_full_blocks(1, [1, 2, 3, 4], 5)
    with pytest.raises(ValueError, match="num_tokens=6"):
        manager.cache_full_blocks(1, [1, 2, 3, 4, 5, 6], 6)  # only 4 tokens allocated


def test_bad_computed(manager):
    hit = manager.lookup([1, 2, 3, 4])
    assert hit.num_tokens == 4
    with pytest.raises(ValueError, match="request_id=1"):
        manager.allocate(1, 8, hit)  # request 1 already has blocks
    with pytest.raises(ValueError, match="num_tokens=3"):
        manager.allocate(2, 3, hit)
    bad = kv.ComputedBlocks()
    bad.block_ids, bad.epochs, bad.num_tokens = [0], [1, 1], 2
    with pytest.raises(ValueError, match=r"computed.epochs.size\(\)=2"):
        manager.allocate(2, 4, bad)
    bad.block_ids, bad.epochs, bad.num_tokens = [11], [1], 2
    with pytest.raises(IndexError, match="block_id=11"):
        manager.allocate(2, 4, bad)
    assert not manager.has_request(2)


def test_stale_computed_is_runtime_error():
    m = kv.KVCacheManager(2, 1)
    assert m.allocate(1, 1)
    m.cache_full_blocks(1, [5], 1)
    m.free(1)
    hit = m.lookup([5])
    assert hit.block_ids == [0]
    assert m.allocate(2, 2)  # pops both free blocks, evicting block 0
    with pytest.raises(RuntimeError, match="block 0"):
        m.allocate(3, 1, hit)
    assert not m.has_request(3)


@pytest.mark.parametrize("method", ["free", "block_table"])
def test_unknown_request(manager, method):
    with pytest.raises(IndexError, match="request_id=12345678901"):
        getattr(manager, method)(12345678901)
    with pytest.raises(IndexError, match="request_id=-2"):
        manager.cache_full_blocks(-2, [1, 2], 2)


@pytest.mark.parametrize("method", ["ref_count", "is_cached", "cached_tokens"])
@pytest.mark.parametrize("block_id", [-1, 4])
def test_bad_block_id(manager, method, block_id):
    with pytest.raises(IndexError, match=f"block_id={block_id}"):
        getattr(manager, method)(block_id)
