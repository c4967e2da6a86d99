"""reshape_and_cache_ against a pure-torch reference (index_put into the flattened caches) on CPU:
random unique slots, padding slots, strided key/value views, errors; on CUDA the op raises "no CUDA
kernel yet" for now."""

import pytest
import torch

import tidal
from conftest import DEVICES


def ref_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    """Returns updated copies of the caches."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    k_out, v_out = key_cache.clone(), value_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_out.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = key[keep]
    v_out.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = value[keep]
    return k_out, v_out


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def unique_slots(num_tokens, num_slots, seed, num_padding=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens].to(torch.int64)
    if num_padding:
        slots[torch.randperm(num_tokens, generator=g)[:num_padding]] = -1
    return slots


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv_views", "head_strided"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("shape", [(2, 64), (1, 128), (4, 8)], ids=lambda s: f"kv{s[0]}_hd{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(dtype, shape, block_size, layout):
    num_kv_heads, head_dim = shape
    num_blocks, num_tokens = 9, 7
    g = torch.Generator().manual_seed(num_kv_heads * head_dim)
    if layout == "contiguous":
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    elif layout == "fused_qkv_views":  # slices of [num_tokens, (nh + 2 nkv) hd]: row stride > nkv hd
        q_size, kv_size = 4 * head_dim, num_kv_heads * head_dim
        qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=g).to(dtype)
        _, key, value = qkv.split([q_size, kv_size, kv_size], -1)
        key, value = key.view(num_tokens, num_kv_heads, head_dim), value.view(num_tokens, num_kv_heads, head_dim)
    else:  # heads not packed: head stride > head_dim
        key = torch.randn(num_tokens, num_kv_heads, head_dim + 3, generator=g).to(dtype)[..., :head_dim]
        value = torch.randn(num_tokens, num_kv_heads, head_dim + 3, generator=g).to(dtype)[..., 3:]
    key_cache, value_cache = make_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    slots = unique_slots(num_tokens, num_blocks * block_size, seed=block_size)
    ref_k, ref_v = ref_reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots) is None
    torch.testing.assert_close(key_cache, ref_k, atol=0, rtol=0)  # a copy: bit for bit
    torch.testing.assert_close(value_cache, ref_v, atol=0, rtol=0)


def test_padding_slots_leave_the_cache_untouched():
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    key, value = torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    slots = unique_slots(10, 64, seed=3, num_padding=4)
    tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots)
    ref_k, ref_v = ref_reshape_and_cache(key, value, before_k, before_v, slots)
    torch.testing.assert_close(key_cache, ref_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, ref_v, atol=0, rtol=0)
    all_padding = torch.full((10,), -1, dtype=torch.int64)
    tidal.ops.reshape_and_cache_(torch.randn(10, 2, 64), torch.randn(10, 2, 64), key_cache, value_cache, all_padding)
    torch.testing.assert_close(key_cache, ref_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache, ref_v, atol=0, rtol=0)


def test_duplicate_slot_last_token_wins():
    key_cache, value_cache = make_caches(1, 4, 1, 8, torch.float32)
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, torch.tensor([2, 2, 0]))
    torch.testing.assert_close(key_cache[0, 2], key[1], atol=0, rtol=0)
    torch.testing.assert_close(value_cache[0, 0], value[2], atol=0, rtol=0)


def test_empty():
    key_cache, value_cache = make_caches(2, 4, 1, 8, torch.float32)
    tidal.ops.reshape_and_cache_(torch.empty(0, 1, 8), torch.empty(0, 1, 8), key_cache, value_cache,
                                 torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize("bad", [64, 1000])
def test_out_of_range_slot_is_an_index_error_and_writes_nothing(bad):
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    before_k = key_cache.clone()
    slots = torch.tensor([3, 9, bad, 1])
    with pytest.raises(IndexError, match=rf"slot_mapping\[2\]={bad} is out of range: .* = 64 slots"):
        tidal.ops.reshape_and_cache_(torch.randn(4, 2, 64), torch.randn(4, 2, 64), key_cache, value_cache, slots)
    torch.testing.assert_close(key_cache, before_k, atol=0, rtol=0)


def test_bad_arguments_name_the_argument():
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    key, value, slots = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.arange(3)
    with pytest.raises(ValueError, match="slot_mapping.dtype=torch.int32 must be torch.int64"):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots.int())
    with pytest.raises(ValueError, match=r"slot_mapping.shape=\(2,\) must be \[num_tokens\] = \[3\]"):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots[:2])
    with pytest.raises(ValueError, match=r"value.shape=\(3, 2, 32\) must equal key.shape=\(3, 2, 64\)"):
        tidal.ops.reshape_and_cache_(key, value[..., :32], key_cache, value_cache, slots)
    with pytest.raises(ValueError, match=r"key_cache.shape=\(4, 16, 1, 64\) must be \[num_blocks"):
        tidal.ops.reshape_and_cache_(key, value, key_cache[:, :, :1].contiguous(), value_cache, slots)
    with pytest.raises(ValueError, match="value_cache.dtype=torch.float16 must equal key.dtype=torch.float32"):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache.half(), slots)
    with pytest.raises(ValueError, match="key_cache must be contiguous"):
        tidal.ops.reshape_and_cache_(key, value, key_cache.transpose(0, 1).contiguous().transpose(0, 1), value_cache,
                                     slots)


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack as c

    from tidal import _core

    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    key, value, slots = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.arange(3)
    with pytest.raises(ValueError, match="key_cache and value_cache overlap in memory"):
        _core.ops.reshape_and_cache(c(key), c(value), c(key_cache), c(key_cache), c(slots), 0)
    with pytest.raises(ValueError, match=r"key.stride\(-1\)=2 must be 1"):
        _core.ops.reshape_and_cache(c(torch.randn(3, 2, 128)[..., ::2]), c(value), c(key_cache), c(value_cache),
                                    c(slots), 0)
    with pytest.raises(ValueError, match="key or value overlaps a cache"):
        _core.ops.reshape_and_cache(c(key_cache[0, :3]), c(value), c(key_cache), c(value_cache), c(slots), 0)


def test_opcheck():
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    qkv = torch.randn(5, 8 * 64).to(torch.bfloat16)
    _, k, v = qkv.split([4 * 64, 2 * 64, 2 * 64], -1)
    kb, vb = make_caches(3, 1, 2, 64, torch.bfloat16)
    samples = [
        (torch.randn(6, 2, 64), torch.randn(6, 2, 64), key_cache, value_cache, unique_slots(6, 64, 1, num_padding=2)),
        (k.view(5, 2, 64), v.view(5, 2, 64), kb, vb, torch.tensor([2, -1, 0, -1, 1])),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.tidal.reshape_and_cache_.default, args)


@pytest.mark.parametrize("device", [p for p in DEVICES if p.id == "cuda"])
def test_cuda_has_no_kernel_yet(device):
    key_cache, value_cache = (t.to(device) for t in make_caches(4, 16, 2, 64, torch.float32))
    key, value = torch.randn(3, 2, 64, device=device), torch.randn(3, 2, 64, device=device)
    with pytest.raises(RuntimeError, match="reshape_and_cache: no CUDA kernel yet; run on the CPU"):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, torch.arange(3, device=device))
