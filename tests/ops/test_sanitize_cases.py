"""Small CUDA cases of every serving kernel, one per code path, sized so the device script can run them
under ``compute-sanitizer --tool memcheck`` in seconds (bench/device_run.sh). Each case also checks its
result against a pure-torch reference, so it is a test on its own; the full sweeps live in the
per-op test files. Skipped without a GPU."""

import math

import pytest
import torch

import tidal
from conftest import HAS_GPU, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build")]


def _paged(num_seqs, q_len, ctx, heads, kv_heads, head_dim, block_size, dtype, window=-1, counters=False):
    g = torch.Generator().manual_seed(num_seqs * 131 + ctx + head_dim)
    blocks = math.ceil(ctx / block_size)
    num_blocks = num_seqs * blocks + 1
    ids = torch.randperm(num_blocks, generator=g)[: num_seqs * blocks].to(torch.int32).view(num_seqs, blocks)
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(num_seqs * q_len, heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32) * q_len
    args = (q, kc, vc, ids, seq_lens, cu, head_dim ** -0.5, window)
    ref = tidal.ops.paged_attention(*args)  # the CPU kernel, itself checked against fp32 in test_paged_attention
    split_counters = torch.zeros(num_seqs * heads, dtype=torch.int32, device="cuda") if counters else None
    out = tidal.ops.paged_attention(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args),
                                    max_seqlen_q=q_len, max_seqlen_k=ctx, split_counters=split_counters)
    torch.cuda.synchronize()
    assert_close(out, ref)
    if counters:
        assert int(split_counters.abs().sum()) == 0


@pytest.mark.parametrize("case", [
    dict(num_seqs=1, q_len=1, ctx=700, heads=8, kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16),  # split-K
    # split-K merged in the kernel: the tensor-core decode kernel, then the SIMT one
    dict(num_seqs=2, q_len=1, ctx=700, heads=8, kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16,
         counters=True),
    dict(num_seqs=2, q_len=1, ctx=450, heads=6, kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32,
         counters=True),
    dict(num_seqs=300, q_len=1, ctx=33, heads=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16),  # one split
    dict(num_seqs=2, q_len=37, ctx=90, heads=4, kv_heads=1, head_dim=128, block_size=16, dtype=torch.bfloat16),  # tensor cores
    dict(num_seqs=2, q_len=9, ctx=40, heads=4, kv_heads=2, head_dim=256, block_size=8, dtype=torch.float16),
    dict(num_seqs=3, q_len=5, ctx=29, heads=6, kv_heads=2, head_dim=80, block_size=4, dtype=torch.float32),  # SIMT rows
    dict(num_seqs=2, q_len=1, ctx=50, heads=2, kv_heads=2, head_dim=20, block_size=16, dtype=torch.float16),  # scalar
    dict(num_seqs=2, q_len=20, ctx=64, heads=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, window=7),
], ids=lambda c: f"{c['num_seqs']}x{c['q_len']}x{c['ctx']}_d{c['head_dim']}_{str(c['dtype'])[6:]}"
                 + ("_counters" if c.get("counters") else ""))
def test_paged_attention_paths(case):
    _paged(**case)


def test_rotary_cache_activation_and_noise():
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, head_dim, block_size = 7, 4, 2, 64, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 32, (tokens,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(32).float()[:, None] * inv[None]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.tensor([3, 0, -1, 9, 12, 5, 6])
    caches = [torch.zeros(4, block_size, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    w = torch.rand(head_dim, generator=g).to(torch.bfloat16) + 0.5
    outs = {}
    for device in ("cpu", "cuda"):
        x = qkv.to(device, copy=True)  # the op rotates q in place
        q, k, v = x.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
        kc, vc = (c.to(device) for c in caches)
        tidal.ops.rotary_embedding_and_cache_(positions.to(device), q, k, v, kc, vc, slots.to(device),
                                              cos_sin.to(device), True, w.to(device), w.to(device), 1e-6)
        k2, v2 = k.clone(), v.clone()
        kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
        tidal.ops.reshape_and_cache_(k2, v2, kc2, vc2, slots.to(device))
        tidal.ops.rotary_embedding_(positions.to(device), q.clone(), k2, head_dim, cos_sin.to(device))
        act = tidal.ops.silu_and_mul(x[:, : 2 * head_dim * 2])
        noise = tidal.ops.seeded_exponential_(torch.empty(3, 1001, device=device), torch.tensor([1, 2, 3], device=device),
                                              torch.tensor([0, 5, 7], device=device))
        outs[device] = (q, kc, vc, kc2, vc2, k2, act, noise)
    torch.cuda.synchronize()
    for cpu, gpu in zip(outs["cpu"], outs["cuda"]):
        assert_close(gpu, cpu, dtype=torch.bfloat16 if cpu.dtype == torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("m,n,k,prologue,dtype", [
    (1, 300, 1000, 1, torch.bfloat16),  # rms_norm into the product, more rows than warps
    (3, 37, 64, 2, torch.float16),      # silu_and_mul, rows padded to 4, the residual add
    (4, 65, 256, 0, torch.float32),
])
def test_skinny_linear_paths(m, n, k, prologue, dtype):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, 2 * k if prologue == 2 else k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    nw = torch.randn(k, generator=g).to(dtype) if prologue == 1 else None
    kwargs = dict(norm_weight=nw, gated=prologue == 2)
    if prologue == 2:
        res = torch.randn(m, n, generator=g).to(dtype)
        expected = tidal.ops.skinny_linear(x, w, b, residual=res.clone(), **kwargs)  # the CPU twin
        got = tidal.ops.skinny_linear(x.cuda(), w.cuda(), b.cuda(), residual=res.cuda(), **kwargs)
    else:
        expected = tidal.ops.skinny_linear(x, w, b, **kwargs)
        got = tidal.ops.skinny_linear(x.cuda(), w.cuda(), b.cuda(),
                                      **dict(kwargs, norm_weight=None if nw is None else nw.cuda()))
    torch.cuda.synchronize()
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,dtype", [
    (2, 256, 512, 8, 2, torch.bfloat16),    # decode: 16-row tiles, the down product split
    (24, 128, 192, 4, 2, torch.float16),    # 32-row tiles, a partial column tile
    (80, 128, 192, 4, 2, torch.float16),    # 64-row tiles
    (150, 64, 64, 4, 2, torch.bfloat16),    # prefill: 128-row tiles over 2 x 2 warps
    (7, 40, 24, 6, 3, torch.float32),       # the SIMT kernel
])
def test_fused_moe_paths(num_tokens, hidden, inter, num_experts, top_k, dtype):
    g = torch.Generator().manual_seed(num_tokens + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * inter ** -0.5).to(dtype)
    expected = tidal.ops.fused_moe(x, logits, w13, w2, top_k)  # the CPU twin, checked in test_moe
    got = tidal.ops.fused_moe(x.cuda(), logits.cuda(), w13.cuda(), w2.cuda(), top_k)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("m,n,k,fmt,dtype", [
    (1, 9001, 256, "int4", torch.bfloat16),  # tensor cores: more 16-row tiles than a wave, a ragged last tile
    (5, 40, 384, "int4", torch.float16),     # tensor cores: fewer k blocks than warps (empty units)
    (12, 300, 512, "int8", torch.bfloat16),  # tensor cores: two B tiles
    (1, 70, 256, "int8", torch.float16),     # the SIMT kernel
    (3, 50, 256, "fp8", torch.bfloat16),
    (2, 33, 96, "int4", torch.float32),
])
def test_quant_linear_paths(m, n, k, fmt, dtype):
    from tidal.quant import quantize_weight
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    codes, scales, zeros = quantize_weight(w, fmt, 32 if fmt == "int4" and k % 128 else 128 if fmt == "int4" else None)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    expected = tidal.ops.quant_linear(x, codes, scales, zeros, b, fmt)  # the CPU twin, checked in test_quant_linear
    cuda = [None if t is None else t.cuda() for t in (x, codes, scales, zeros, b)]
    got = tidal.ops.quant_linear(*cuda, fmt)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=3e-2, rtol=3e-2)
