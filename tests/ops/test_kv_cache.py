"""reshape_and_cache_ against a pure-torch reference (index_put into the flattened caches), on CPU here
and on CUDA where there is a GPU (there also against the CPU kernel): random unique slots, padding
slots, strided key/value views (the GPU's 16-, 4- and 2-byte copy paths), slots the op must not touch
checked bit for bit, errors, opcheck, side streams and CUDA graph replay."""

import pytest
import torch

import tidal
from conftest import DEVICES, gpu_only, to_device


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


def run_and_check(key, value, key_cache, value_cache, slots, device):
    """reshape_and_cache_ on `device` (inputs built on the CPU): every slot against the reference,
    bit for bit, so slots that must not be written keep their random contents; key and value
    untouched; on CUDA also equal to the CPU kernel's caches."""
    ref_k, ref_v = ref_reshape_and_cache(key, value, key_cache, value_cache, slots)
    kd, vd = to_device(key, device), to_device(value, device)
    kcd, vcd = key_cache.clone().to(device), value_cache.clone().to(device)
    key_before, value_before = kd.clone(), vd.clone()
    assert tidal.ops.reshape_and_cache_(kd, vd, kcd, vcd, slots.to(device)) is None
    torch.testing.assert_close(kcd.cpu(), ref_k, atol=0, rtol=0, equal_nan=True)  # a copy: bit for bit
    torch.testing.assert_close(vcd.cpu(), ref_v, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(kd, key_before, atol=0, rtol=0)
    torch.testing.assert_close(vd, value_before, atol=0, rtol=0)
    if device == "cuda":  # cross-backend: the GPU kernel writes what the CPU kernel writes
        kc_cpu, vc_cpu = key_cache.clone(), value_cache.clone()
        tidal.ops.reshape_and_cache_(key, value, kc_cpu, vc_cpu, slots)
        torch.testing.assert_close(kcd.cpu(), kc_cpu, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(vcd.cpu(), vc_cpu, atol=0, rtol=0, equal_nan=True)
    return kcd, vcd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv_views", "head_strided"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("shape", [(2, 64), (1, 128), (4, 8)], ids=lambda s: f"kv{s[0]}_hd{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(dtype, shape, block_size, layout, device):
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
    run_and_check(key, value, key_cache, value_cache, slots, device)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_slots_leave_the_cache_untouched(device):
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    key_cache[1::2] = float("nan")  # poison: NaN where no token writes must stay NaN, bit for bit
    g = torch.Generator().manual_seed(3)
    key, value = torch.randn(10, 2, 64, generator=g), torch.randn(10, 2, 64, generator=g)
    slots = unique_slots(10, 64, seed=3, num_padding=4)
    kcd, vcd = run_and_check(key, value, key_cache, value_cache, slots, device)
    written_k, written_v = kcd.cpu(), vcd.cpu()
    all_padding = torch.full((10,), -1, dtype=torch.int64, device=device)
    tidal.ops.reshape_and_cache_(torch.randn(10, 2, 64, device=device), torch.randn(10, 2, 64, device=device), kcd,
                                 vcd, all_padding)
    torch.testing.assert_close(kcd.cpu(), written_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(vcd.cpu(), written_v, atol=0, rtol=0, equal_nan=True)


def test_duplicate_slot_last_token_wins():
    """CPU only: the GPU kernel copies tokens in parallel, so there two tokens with one slot race."""
    key_cache, value_cache = make_caches(1, 4, 1, 8, torch.float32)
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, torch.tensor([2, 2, 0]))
    torch.testing.assert_close(key_cache[0, 2], key[1], atol=0, rtol=0)
    torch.testing.assert_close(value_cache[0, 0], value[2], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    key_cache, value_cache = (t.to(device) for t in make_caches(2, 4, 1, 8, torch.float32))
    before = key_cache.clone()
    tidal.ops.reshape_and_cache_(torch.empty(0, 1, 8, device=device), torch.empty(0, 1, 8, device=device), key_cache,
                                 value_cache, torch.empty(0, dtype=torch.int64, device=device))
    torch.testing.assert_close(key_cache, before, atol=0, rtol=0)


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


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    key_cache, value_cache = make_caches(4, 16, 2, 64, torch.float32)
    qkv = torch.randn(5, 8 * 64).to(torch.bfloat16).to(device)
    _, k, v = qkv.split([4 * 64, 2 * 64, 2 * 64], -1)
    kb, vb = make_caches(3, 1, 2, 64, torch.bfloat16)
    samples = [
        (torch.randn(6, 2, 64), torch.randn(6, 2, 64), key_cache, value_cache, unique_slots(6, 64, 1, num_padding=2)),
        (k.view(5, 2, 64), v.view(5, 2, 64), kb, vb, torch.tensor([2, -1, 0, -1, 1])),
    ]
    for args in samples:
        args = tuple(a.to(device) for a in args)
        torch.library.opcheck(torch.ops.tidal.reshape_and_cache_.default, args)


@gpu_only
def test_cuda_misaligned_views_and_unchecked_slots():
    """Views at odd element offsets (the 2-byte copy path) and, on the GPU where slots are not
    checked (that needs a host sync), an out-of-range slot: that token writes nothing."""
    qkv = torch.randn(6, 2 * 2 * 40 + 3).to(torch.float16)
    key, value = qkv[:, 1:81].view(6, 2, 40), qkv[:, 81:161].view(6, 2, 40)  # base offsets of 2 and 162 bytes
    key_cache, value_cache = make_caches(3, 4, 2, 40, torch.float16)
    run_and_check(key, value, key_cache, value_cache, unique_slots(6, 12, seed=4, num_padding=1), "cuda")

    key, value = torch.randn(3, 2, 64).cuda(), torch.randn(3, 2, 64).cuda()
    key_cache, value_cache = (t.cuda() for t in make_caches(4, 16, 2, 64, torch.float32))
    before_k, before_v = key_cache.cpu(), value_cache.cpu()
    tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, torch.tensor([5, 64, 1000], device="cuda"))
    ref_k, ref_v = ref_reshape_and_cache(key.cpu(), value.cpu(), before_k, before_v, torch.tensor([5, -1, -1]))
    torch.testing.assert_close(key_cache.cpu(), ref_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache.cpu(), ref_v, atol=0, rtol=0)

    with pytest.raises(ValueError, match="key_cache is on cpu but key is on cuda"):
        tidal.ops.reshape_and_cache_(key, value, key_cache.cpu(), value_cache, torch.arange(3, device="cuda"))
    with pytest.raises(ValueError, match="slot_mapping is on cpu but key is on cuda"):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, torch.arange(3))


@gpu_only
def test_cuda_side_stream_and_graph_replay():
    """The serving loop captures the cache write in a CUDA graph: replays write the slots and keys the
    static inputs hold at replay time, not at capture time."""
    key_cache, value_cache = (t.cuda() for t in make_caches(8, 16, 2, 64, torch.bfloat16))
    key = torch.randn(5, 2, 64).to(torch.bfloat16).cuda()
    value = torch.randn(5, 2, 64).to(torch.bfloat16).cuda()
    slots = unique_slots(5, 128, seed=5, num_padding=1).cuda()
    ref_k, ref_v = ref_reshape_and_cache(key.cpu(), value.cpu(), key_cache.cpu(), value_cache.cpu(), slots.cpu())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(key_cache.cpu(), ref_k, atol=0, rtol=0)
    torch.testing.assert_close(value_cache.cpu(), ref_v, atol=0, rtol=0)

    static_key, static_value = torch.zeros_like(key), torch.zeros_like(value)
    static_slots = torch.full((5,), -1, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tidal.ops.reshape_and_cache_(static_key, static_value, key_cache, value_cache, static_slots)
    for seed in (6, 7):
        new_key, new_value = torch.randn(5, 2, 64).to(torch.bfloat16), torch.randn(5, 2, 64).to(torch.bfloat16)
        new_slots = unique_slots(5, 128, seed=seed, num_padding=2)
        ref_k, ref_v = ref_reshape_and_cache(new_key, new_value, key_cache.cpu(), value_cache.cpu(), new_slots)
        static_key.copy_(new_key)
        static_value.copy_(new_value)
        static_slots.copy_(new_slots)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(key_cache.cpu(), ref_k, atol=0, rtol=0)
        torch.testing.assert_close(value_cache.cpu(), ref_v, atol=0, rtol=0)
