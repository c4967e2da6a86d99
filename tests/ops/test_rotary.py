"""rotary_embedding_ against a pure-torch fp32 reference (Hugging Face's ``q * cos + rotate_half(q)
* sin``, and its GPT-J interleaved twin), through contiguous tensors and through strided views of a
fused qkv buffer, on CPU here and on CUDA where there is a GPU (there also against the CPU kernel):
partial rotary, the columns the op must not touch, errors, opcheck, side streams and CUDA graphs."""

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close, gpu_only, to_device


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def ref_rotary(positions, x, head_dim, cos_sin_cache, is_neox):
    """x: [num_tokens, heads, head_dim] or [num_tokens, heads * head_dim]; returns a rotated copy."""
    shape = x.shape
    xf = x.float().reshape(shape[0], -1, head_dim)
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if is_neox:  # HF Llama: cos/sin repeated over both halves
        cos, sin = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]
        rot = rot * cos + rotate_half(rot) * sin
    else:  # GPT-J: pairs (2i, 2i + 1)
        cos, sin = cos.repeat_interleave(2, -1)[:, None, :], sin.repeat_interleave(2, -1)[:, None, :]
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        rot = rot * cos + rotated * sin
    return torch.cat((rot, rest), -1).reshape(shape).to(x.dtype)


def make_cache(max_position, rotary_dim, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_HEADS, NUM_KV_HEADS, MAX_POSITION = 4, 2, 4096


def positions_for(num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MAX_POSITION, (num_tokens,), generator=g, dtype=torch.int64)


def rotate_on(device, positions, q, k, head_dim, cache, is_neox=True):
    """rotary_embedding_ on `device` of copies of q and k (built on the CPU, strides kept); returns
    them rotated, and on CUDA checks them against the CPU kernel on the same inputs."""
    qd, kd = to_device(q, device), to_device(k, device)
    assert tidal.ops.rotary_embedding_(positions.to(device), qd, kd, head_dim, cache.to(device), is_neox) is None
    if device == "cuda":  # cross-backend: the GPU kernel equals the CPU kernel
        q_cpu, k_cpu = q.clone(), k.clone()
        tidal.ops.rotary_embedding_(positions, q_cpu, k_cpu, head_dim, cache, is_neox)
        assert_close(qd, q_cpu)
        assert_close(kd, k_cpu)
    return qd, kd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["3d", "2d"])
@pytest.mark.parametrize("partial", [False, True], ids=["full_rotary", "partial_rotary"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_contiguous(dtype, is_neox, head_dim, partial, form, device):
    num_tokens = 13
    rotary_dim = head_dim // 2 if partial else head_dim
    cache = make_cache(MAX_POSITION, rotary_dim)
    positions = positions_for(num_tokens, head_dim)
    q = randn(num_tokens, NUM_HEADS, head_dim, dtype=dtype, seed=1)
    k = randn(num_tokens, NUM_KV_HEADS, head_dim, dtype=dtype, seed=2)
    if form == "2d":
        q, k = q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)
    ref_q = ref_rotary(positions, q, head_dim, cache, is_neox)
    ref_k = ref_rotary(positions, k, head_dim, cache, is_neox)
    q_out, k_out = rotate_on(device, positions, q, k, head_dim, cache, is_neox)
    assert_close(q_out, ref_q)
    assert_close(k_out, ref_k)
    if partial:  # the tail of every head passes through untouched, bit for bit
        view = lambda t: t.cpu().reshape(num_tokens, -1, head_dim)[..., rotary_dim:]  # noqa: E731
        torch.testing.assert_close(view(q_out), view(q), atol=0, rtol=0)
        torch.testing.assert_close(view(k_out), view(k), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spare", [5, 0])
@pytest.mark.parametrize("form", ["3d", "2d"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_views_of_fused_qkv(dtype, is_neox, form, spare, device):
    """q and k are slices of the qkv projection output: row stride (nh + 2 nkv) * hd (+ spare
    columns); v and the spare columns must not change. Without spare columns every head is 16-byte
    aligned: the GPU takes its streaming Neox kernel."""
    num_tokens, head_dim, rotary_dim = 11, 64, 64
    q_size, kv_size = NUM_HEADS * head_dim, NUM_KV_HEADS * head_dim
    qkv_cpu = randn(num_tokens, q_size + 2 * kv_size + spare, dtype=dtype, seed=3)
    qkv_cpu[:, q_size + 2 * kv_size:] = float("nan")  # poison the spare columns: they must stay NaN
    qkv = qkv_cpu.to(device)
    q, k, v, _ = qkv.split([q_size, kv_size, kv_size, spare], dim=-1)
    if form == "3d":
        q, k = q.view(num_tokens, NUM_HEADS, head_dim), k.view(num_tokens, NUM_KV_HEADS, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    data_ptr = qkv.data_ptr()
    cache = make_cache(MAX_POSITION, rotary_dim)
    positions = positions_for(num_tokens, 7)
    ref_q = ref_rotary(positions, q.cpu(), head_dim, cache, is_neox)
    ref_k = ref_rotary(positions, k.cpu(), head_dim, cache, is_neox)
    tidal.ops.rotary_embedding_(positions.to(device), q, k, head_dim, cache.to(device), is_neox)
    assert qkv.data_ptr() == data_ptr
    assert_close(qkv[:, :q_size].reshape(q.shape), ref_q)
    assert_close(qkv[:, q_size:q_size + kv_size].reshape(k.shape), ref_k)
    torch.testing.assert_close(qkv[:, q_size + kv_size:].cpu(), qkv_cpu[:, q_size + kv_size:], atol=0, rtol=0,
                               equal_nan=True)
    if device == "cuda":  # cross-backend: the CPU kernel through the same views
        q_cpu, k_cpu, _, _ = qkv_cpu.split([q_size, kv_size, kv_size, spare], dim=-1)
        tidal.ops.rotary_embedding_(positions, q_cpu, k_cpu, head_dim, cache, is_neox)
        assert_close(qkv[:, :q_size + kv_size], qkv_cpu[:, :q_size + kv_size])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_strided_positions_and_cache_rows(device):
    head_dim = 64
    cache = make_cache(2 * MAX_POSITION, head_dim)[::2]  # row stride 2 * rotary_dim
    positions = positions_for(24, 3)[::2]  # stride 2
    q = randn(12, NUM_HEADS, head_dim, dtype=torch.float32, seed=4)
    k = randn(12, NUM_KV_HEADS, head_dim, dtype=torch.float32, seed=5)
    ref_q, ref_k = ref_rotary(positions, q, head_dim, cache, True), ref_rotary(positions, k, head_dim, cache, True)
    qd, kd = to_device(q, device), to_device(k, device)
    tidal.ops.rotary_embedding_(to_device(positions, device), qd, kd, head_dim, to_device(cache, device))
    assert_close(qd, ref_q)
    assert_close(kd, ref_k)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_last_dim_not_contiguous_is_copied_back(device):
    head_dim = 8
    cache = make_cache(64, head_dim)
    positions = torch.arange(5)
    q = randn(head_dim, 2, 5, dtype=torch.float32, seed=6).permute(2, 1, 0)  # stride(-1) != 1
    k = randn(5, 1, head_dim, dtype=torch.float32, seed=7)
    ref_q, ref_k = ref_rotary(positions, q, head_dim, cache, True), ref_rotary(positions, k, head_dim, cache, True)
    q_out, k_out = rotate_on(device, positions, q, k, head_dim, cache)
    assert q_out.stride() == q.stride()
    assert_close(q_out, ref_q)
    assert_close(k_out, ref_k)


def test_rotary_matches_transformers_apply_rotary_pos_emb():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    del transformers
    head_dim, num_tokens = 64, 9
    cache = make_cache(MAX_POSITION, head_dim)
    positions = positions_for(num_tokens, 8)
    q = randn(num_tokens, NUM_HEADS, head_dim, dtype=torch.float32, seed=9)
    k = randn(num_tokens, NUM_KV_HEADS, head_dim, dtype=torch.float32, seed=10)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # [1, seq, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    tidal.ops.rotary_embedding_(positions, q, k, head_dim, cache)
    assert_close(q, hf_q[0].transpose(0, 1))
    assert_close(k, hf_k[0].transpose(0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_empty(device):
    cache = make_cache(16, 8).to(device)
    q, k = torch.empty(0, 2, 8, device=device), torch.empty(0, 1, 8, device=device)
    tidal.ops.rotary_embedding_(torch.empty(0, dtype=torch.int64, device=device), q, k, 8, cache)


@pytest.mark.parametrize("bad", [-1, MAX_POSITION, MAX_POSITION + 100])
def test_bad_position_is_an_index_error_and_writes_nothing(bad):
    head_dim = 64
    cache = make_cache(MAX_POSITION, head_dim)
    positions = torch.tensor([0, 5, bad, 7])
    q, k = randn(4, NUM_HEADS, head_dim, dtype=torch.float32, seed=1), randn(4, 1, head_dim, dtype=torch.float32, seed=2)
    q_before, k_before = q.clone(), k.clone()
    with pytest.raises(IndexError, match=rf"positions\[2\]={bad} is out of range \[0, max_position={MAX_POSITION}\)"):
        tidal.ops.rotary_embedding_(positions, q, k, head_dim, cache)
    torch.testing.assert_close(q, q_before, atol=0, rtol=0)
    torch.testing.assert_close(k, k_before, atol=0, rtol=0)


def test_bad_arguments_name_the_argument():
    cache, positions = make_cache(64, 8), torch.arange(3)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="positions.dtype=torch.int32 must be torch.int64"):
        tidal.ops.rotary_embedding_(positions.int(), q, k, 8, cache)
    with pytest.raises(ValueError, match="key.dtype=torch.float16 must equal query.dtype=torch.float32"):
        tidal.ops.rotary_embedding_(positions, q, k.half(), 8, cache)
    with pytest.raises(ValueError, match=r"query.shape\[2\]=8 must equal head_dim=16"):
        tidal.ops.rotary_embedding_(positions, q, k, 16, make_cache(64, 16))
    with pytest.raises(ValueError, match=r"key.shape\[1\]=12 must be a multiple of head_dim=8"):
        tidal.ops.rotary_embedding_(positions, q, torch.randn(3, 12), 8, cache)
    with pytest.raises(ValueError, match=r"rotary_dim=cos_sin_cache.shape\[1\]=16 must be even, positive and <= head_dim=8"):
        tidal.ops.rotary_embedding_(positions, q, k, 8, make_cache(64, 16))
    with pytest.raises(ValueError, match="cos_sin_cache.dtype=torch.float16 must be torch.float32"):
        tidal.ops.rotary_embedding_(positions, q, k, 8, cache.half())
    with pytest.raises(ValueError, match=r"query.shape\[0\]=3 must equal num_tokens=positions.shape\[0\]=2"):
        tidal.ops.rotary_embedding_(positions[:2], q, k[:2], 8, cache)


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack as c

    from tidal import _core

    cache, positions = make_cache(64, 8), torch.arange(3)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="head_dim=0 must be positive"):
        _core.ops.rotary_embedding(c(positions), c(q), c(k), 0, c(cache), True, 0)
    with pytest.raises(ValueError, match=r"rotary_dim=cos_sin_cache.shape\[1\]=6 must be even, positive and <= head_dim=4"):
        _core.ops.rotary_embedding(c(positions), c(q.view(3, 4, 4)), c(k.view(3, 2, 4)), 4, c(make_cache(64, 6)), True, 0)
    with pytest.raises(ValueError, match=r"positions.shape=\[2\] must be \[num_tokens\] = \[3\]"):
        _core.ops.rotary_embedding(c(positions[:2]), c(q), c(k), 8, c(cache), True, 0)
    with pytest.raises(ValueError, match=r"query.stride\(-1\)=2 must be 1"):
        _core.ops.rotary_embedding(c(positions), c(torch.randn(3, 2, 16)[..., ::2]), c(k), 8, c(cache), True, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    head_dim = 64
    samples = [
        (positions_for(5, 1), randn(5, NUM_HEADS, head_dim, dtype=torch.float32, seed=1),
         randn(5, NUM_KV_HEADS, head_dim, dtype=torch.float32, seed=2), head_dim, make_cache(MAX_POSITION, head_dim), True),
        (positions_for(3, 2), randn(3, NUM_HEADS * head_dim, dtype=torch.bfloat16, seed=3),
         randn(3, head_dim, dtype=torch.bfloat16, seed=4), head_dim, make_cache(MAX_POSITION, 32), False),
    ]
    qkv = randn(4, (NUM_HEADS + 2 * NUM_KV_HEADS) * head_dim, dtype=torch.float16, seed=5).to(device)
    q, k, _ = qkv.split([NUM_HEADS * head_dim, NUM_KV_HEADS * head_dim, NUM_KV_HEADS * head_dim], -1)
    samples.append((positions_for(4, 3), q, k, head_dim, make_cache(MAX_POSITION, head_dim), True))
    for args in samples:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.tidal.rotary_embedding_.default, args)


@gpu_only
def test_cuda_many_heads_large_head_dim_and_errors():
    """Llama-3-8B's heads (more head jobs than the kernel's warps), head_dim up to the GPU kernel's
    512 and partial rotary of Phi-like models; device errors."""
    for num_heads, num_kv_heads, head_dim, rotary_dim, dtype in ((32, 8, 128, 128, torch.bfloat16),
                                                                 (8, 2, 512, 512, torch.float16),
                                                                 (6, 1, 80, 32, torch.float32)):
        cache = make_cache(MAX_POSITION, rotary_dim)
        positions = positions_for(37, head_dim)
        q = randn(37, num_heads, head_dim, dtype=dtype, seed=11)
        k = randn(37, num_kv_heads * head_dim, dtype=dtype, seed=12)
        for is_neox in (True, False):
            q_out, k_out = rotate_on("cuda", positions, q, k, head_dim, cache, is_neox)
            assert_close(q_out, ref_rotary(positions, q, head_dim, cache, is_neox))
            assert_close(k_out, ref_rotary(positions, k, head_dim, cache, is_neox))

    q, k = torch.randn(3, 2, 8, device="cuda"), torch.randn(3, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="cos_sin_cache is on cpu but query is on cuda"):
        tidal.ops.rotary_embedding_(torch.arange(3, device="cuda"), q, k, 8, make_cache(64, 8))
    with pytest.raises(ValueError, match="positions is on cpu but query is on cuda"):
        tidal.ops.rotary_embedding_(torch.arange(3), q, k, 8, make_cache(64, 8).cuda())
    with pytest.raises(ValueError, match="head_dim=520 must be <= 512 on the GPU"):
        tidal.ops.rotary_embedding_(torch.arange(3, device="cuda"), torch.randn(3, 1, 520, device="cuda"),
                                    torch.randn(3, 1, 520, device="cuda"), 520, make_cache(64, 8).cuda())


@gpu_only
def test_cuda_unchecked_position_side_stream_and_graph():
    """Positions are checked on the CPU only (on the GPU that needs a host sync): an out-of-range
    position must not be read there; its token passes through. A side stream, and a CUDA graph
    replayed on new positions and new query/key contents."""
    head_dim, cache = 64, make_cache(MAX_POSITION, 64)
    positions = torch.tensor([0, 5, MAX_POSITION + 7, 7])
    q = randn(4, NUM_HEADS, head_dim, dtype=torch.bfloat16, seed=13)
    k = randn(4, NUM_KV_HEADS, head_dim, dtype=torch.bfloat16, seed=14)
    q_out, k_out = to_device(q, "cuda"), to_device(k, "cuda")
    tidal.ops.rotary_embedding_(positions.cuda(), q_out, k_out, head_dim, cache.cuda())
    good = torch.tensor([0, 1, 3])
    assert_close(q_out[good], ref_rotary(positions[good], q[good], head_dim, cache, True))
    assert_close(k_out[good], ref_rotary(positions[good], k[good], head_dim, cache, True))
    torch.testing.assert_close(q_out[2].cpu(), q[2], atol=0, rtol=0)
    torch.testing.assert_close(k_out[2].cpu(), k[2], atol=0, rtol=0)

    cache_d = cache.cuda()
    static_pos = torch.zeros(9, dtype=torch.int64, device="cuda")
    static_q = torch.zeros(9, NUM_HEADS, head_dim, dtype=torch.bfloat16, device="cuda")
    static_k = torch.zeros(9, NUM_KV_HEADS, head_dim, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # also the warm-up before capture
        tidal.ops.rotary_embedding_(static_pos, static_q, static_k, head_dim, cache_d)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tidal.ops.rotary_embedding_(static_pos, static_q, static_k, head_dim, cache_d)
    for seed in (15, 16):
        positions = positions_for(9, seed)
        q = randn(9, NUM_HEADS, head_dim, dtype=torch.bfloat16, seed=seed)
        k = randn(9, NUM_KV_HEADS, head_dim, dtype=torch.bfloat16, seed=seed + 100)
        static_pos.copy_(positions)
        static_q.copy_(q)
        static_k.copy_(k)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_q, ref_rotary(positions, q, head_dim, cache, True))
        assert_close(static_k, ref_rotary(positions, k, head_dim, cache, True))


# ---- the differentiable, out-of-place form used by the training forward -------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_place_gradients_match_reference_autograd(device, dtype):
    """rotary_embedding's values and gradients (the same kernel rotating back) against autograd
    through the fp64 reference."""
    g = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_dim = 9, 4, 2, 32
    cache = make_cache(64, head_dim)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    gq, gk = torch.randn_like(q, dtype=torch.float32).to(dtype), torch.randn_like(k, dtype=torch.float32).to(dtype)
    q_, k_ = (to_device(t, device).requires_grad_() for t in (q, k))
    out_q, out_k = tidal.ops.rotary_embedding(to_device(positions, device), q_, k_, to_device(cache, device))
    grads = torch.autograd.grad((out_q, out_k), (q_, k_), (to_device(gq, device), to_device(gk, device)))

    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    ref_q = ref_rotary(positions, qd, head_dim, cache.double(), True)
    ref_k = ref_rotary(positions, kd, head_dim, cache.double(), True)
    ref_grads = torch.autograd.grad((ref_q, ref_k), (qd, kd), (gq.double(), gk.double()))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for got, want in zip((out_q, out_k, *grads), (ref_q, ref_k, *ref_grads)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want.detach(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_place_opcheck_and_gradcheck(device):
    positions = to_device(torch.tensor([0, 5, 2]), device)
    cache = to_device(make_cache(8, 8), device)
    q = to_device(torch.randn(3, 2, 8), device)
    k = to_device(torch.randn(3, 1, 8), device)
    torch.library.opcheck(torch.ops.tidal.rotary_embedding.default, (positions, q, k, cache))
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tidal.ops.rotary_embedding(positions, a, b, cache), (qg, kg),
                                    eps=1e-3, atol=2e-3, rtol=1e-2)
