"""fused_moe against a pure-torch fp32 reference (transformers' expert loop: softmax in fp32, top-k,
optional renormalisation, per-expert SiLU MLP, weighted sum in ascending expert order): dtypes, odd
sizes, top_k from 1 to all experts, both routing conventions, strided inputs, errors. On the GPU: the
tensor-core path (decode and prefill tile heights, split inner dimension), the SIMT path (fp32, odd
sizes, misaligned rows), many experts, capture in a CUDA graph, determinism, workspace errors; each
against the same reference and the CPU kernel."""

import pytest
import torch

import tidal
from conftest import TOLERANCES, assert_close, gpu_only, poison_cuda_allocator, to_device
from tidal.ops._lib import capsule, native


def ref_fused_moe(x, router_logits, w13, w2, top_k, renormalize=True, fp32_weights=False):
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    xf = x.reshape(-1, x.shape[-1]).float()
    probs = router_logits.reshape(-1, num_experts).float().softmax(-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if not fp32_weights:
        weights = weights.to(x.dtype).float()
    out = torch.zeros_like(xf)
    for e in range(num_experts):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = xf[token] @ w13[e].float().T
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, token, (act @ w2[e].float().T) * weights[token, slot, None])
    return out.reshape(x.shape).to(x.dtype)


def make(num_tokens, hidden, inter, num_experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    # each row a permutation of multiples of 8 / num_experts in [-4, 4): exact in every dtype for up to
    # 256 experts, so the top-k has no ties (whose order torch.topk leaves open)
    logits = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_tokens)]).float()
    logits = (logits / num_experts * 8 - 4).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    return x, logits, w13, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 8, 4, 2), (37, 48, 24, 8, 2), (9, 33, 17, 5, 3), (20, 16, 8, 6, 6),
                                   (64, 64, 32, 8, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("routing", [(True, True), (True, False), (False, False)], ids=["mixtral", "qwen_norm", "qwen"])
def test_fused_moe_matches_reference(dtype, shape, routing):
    num_tokens, hidden, inter, num_experts, top_k = shape
    x, logits, w13, w2 = make(num_tokens, hidden, inter, num_experts, dtype, seed=sum(shape))
    out = tidal.ops.fused_moe(x, logits, w13, w2, top_k, *routing)
    assert out.shape == x.shape and out.dtype == dtype
    want = ref_fused_moe(x, logits, w13, w2, top_k, *routing)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=atol * 4, rtol=rtol)


def test_fp32_router_logits_and_strided_rows():
    x, _, w13, w2 = make(12, 32, 16, 4, torch.bfloat16, seed=3)
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(5))  # fp32: no bf16 ties in the top-k
    wide = torch.randn(12, 40).to(torch.bfloat16)
    wide[:, 4:36] = x
    out = tidal.ops.fused_moe(wide[:, 4:36], logits, w13, w2, 2)
    assert_close(out, ref_fused_moe(x, logits, w13, w2, 2))


def test_batch_dims_and_empty():
    x, logits, w13, w2 = make(6, 16, 8, 4, torch.float32, seed=4)
    out = tidal.ops.fused_moe(x.view(2, 3, 16), logits.view(2, 3, 4), w13, w2, 2)
    assert_close(out.view(6, 16), ref_fused_moe(x, logits, w13, w2, 2))
    empty = tidal.ops.fused_moe(x[:0], logits[:0], w13, w2, 2)
    assert empty.shape == (0, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(top_k=0), "top_k=0 must be in \\[1, num_experts=4\\]"),
    (dict(top_k=5), "top_k=5 must be in \\[1, num_experts=4\\]"),
    (dict(w2=torch.zeros(4, 16, 9)), "w2.shape=\\(4, 16, 9\\) must be"),
    (dict(router_logits=torch.zeros(6, 3)), "router_logits.shape=\\(6, 3\\)"),
    (dict(w13=torch.zeros(4, 16, 15)), "w13.shape=\\(4, 16, 15\\)"),
])
def test_errors_name_the_argument(bad, match):
    x, logits, w13, w2 = make(6, 16, 8, 4, torch.float32)
    args = dict(x=x, router_logits=logits, w13=w13, w2=w2, top_k=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        tidal.ops.fused_moe(**args)


def test_opcheck():
    x, logits, w13, w2 = make(5, 16, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.tidal.fused_moe.default, (x, logits, w13, w2, 2, True, False))


# ---- the CUDA kernel ------------------------------------------------------------------------------

# (num_tokens, hidden, inter, num_experts, top_k): which path and tile each one takes in bf16/fp16
GPU_SHAPES = [
    (1, 512, 1024, 8, 2),     # decode, one 16-row tile per expert, down split 4 ways
    (3, 256, 192, 8, 2),      # inter not a multiple of the 64-column tile
    (64, 128, 256, 8, 2),     # decode batch 64: 32-row tiles
    (160, 128, 128, 8, 2),    # 64-row tiles
    (300, 256, 512, 8, 2),    # prefill: 128-row tiles over 2 x 2 warps
    (40, 128, 64, 128, 8),    # Qwen3-MoE-like: many experts, most with one or two slots
    (37, 48, 24, 8, 2),       # hidden and inter multiples of 8 but smaller than a tile
    (9, 33, 17, 5, 3),        # odd sizes: the SIMT kernel
    (20, 16, 8, 6, 6),        # every expert chosen
]


def _gpu_tolerance(dtype):
    # the gate-up activations are rounded to the dtype on the GPU before the down product
    atol, rtol = TOLERANCES[dtype]
    return (atol * 4, rtol) if dtype == torch.float32 else (atol * 8, rtol * 2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("routing", [(True, True), (True, False), (False, False)], ids=["mixtral", "qwen_norm", "qwen"])
def test_cuda_kernel_matches_reference_and_cpu(dtype, shape, routing):
    num_tokens, hidden, inter, num_experts, top_k = shape
    x, logits, w13, w2 = make(num_tokens, hidden, inter, num_experts, dtype, seed=sum(shape))
    want = ref_fused_moe(x, logits, w13, w2, top_k, *routing)
    cpu = tidal.ops.fused_moe(x, logits, w13, w2, top_k, *routing)
    poison_cuda_allocator(x.numel() * x.element_size())
    out = tidal.ops.fused_moe(x.cuda(), logits.cuda(), w13.cuda(), w2.cuda(), top_k, *routing)
    assert out.shape == x.shape and out.dtype == dtype and out.is_cuda
    atol, rtol = _gpu_tolerance(dtype)
    torch.testing.assert_close(out.float().cpu(), want.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.float().cpu(), cpu.float(), atol=atol, rtol=rtol)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_strided_and_misaligned_rows_and_fp32_logits(dtype):
    """Rows 8 bytes off 16-byte alignment take the SIMT kernel; a wide aligned view the tensor cores."""
    x, _, w13, w2 = make(12, 64, 32, 4, dtype, seed=3)
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(5))  # fp32
    want = ref_fused_moe(x, logits, w13, w2, 2)
    atol, rtol = _gpu_tolerance(dtype)
    for offset in (4, 8):
        wide = torch.randn(12, 80).to(dtype)
        wide[:, offset:offset + 64] = x
        view = to_device(wide, "cuda")[:, offset:offset + 64]
        out = tidal.ops.fused_moe(view, logits.cuda(), w13.cuda(), w2.cuda(), 2)
        torch.testing.assert_close(out.float().cpu(), want.float(), atol=atol, rtol=rtol)


@gpu_only
def test_cuda_graph_capture_and_determinism():
    """Five launches and no host synchronisation: the op records into a CUDA graph, and a replay with
    new inputs gives the eager result bit for bit."""
    x, logits, w13, w2 = (t.cuda() for t in make(16, 256, 512, 8, torch.bfloat16, seed=7))
    static_x, static_logits = x.clone(), logits.clone()
    tidal.ops.fused_moe(static_x, static_logits, w13, w2, 2)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = tidal.ops.fused_moe(static_x, static_logits, w13, w2, 2)
    x2, logits2, _, _ = (t.cuda() for t in make(16, 256, 512, 8, torch.bfloat16, seed=8))
    static_x.copy_(x2)
    static_logits.copy_(logits2)
    graph.replay()
    eager = tidal.ops.fused_moe(x2, logits2, w13, w2, 2)
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    assert torch.equal(eager, tidal.ops.fused_moe(x2, logits2, w13, w2, 2))
    atol, rtol = _gpu_tolerance(torch.bfloat16)
    want = ref_fused_moe(x2.cpu(), logits2.cpu(), w13.cpu(), w2.cpu(), 2)
    torch.testing.assert_close(eager.float().cpu(), want.float(), atol=atol, rtol=rtol)


@gpu_only
def test_cuda_errors_name_the_argument():
    x, logits, w13, w2 = (t.cuda() for t in make(6, 16, 8, 4, torch.bfloat16))
    size = native.fused_moe_workspace_size(1, 0, "bfloat16", 6, 16, 8, 4, 2)
    assert size > 0 and native.fused_moe_workspace_size(0, 0, "bfloat16", 6, 16, 8, 4, 2) == 0
    out = torch.empty_like(x)
    small = torch.empty(size - 1, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match=f"workspace holds {size - 1} bytes but this call needs {size}"):
        native.fused_moe(capsule(out), capsule(x), capsule(logits), capsule(w13), capsule(w2), 2, True, False,
                         capsule(small), torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="w13 is on cpu but x is on cuda:0"):
        tidal.ops.fused_moe(x, logits, w13.cpu(), w2, 2)
    many = make(2, 16, 8, 513, torch.bfloat16)
    with pytest.raises(ValueError, match="num_experts=513 must be <= 512 for the GPU kernel"):
        tidal.ops.fused_moe(*(t.cuda() for t in many), 2)


def test_workspace_size_errors():
    with pytest.raises(ValueError, match="top_k=5"):
        native.fused_moe_workspace_size(1, 0, "float32", 6, 16, 8, 4, 5)
