"""fused_moe against a pure-torch fp32 reference (transformers' expert loop: softmax in fp32, top-k,
optional renormalisation, per-expert SiLU MLP, weighted sum in ascending expert order): dtypes, odd
sizes, top_k from 1 to all experts, both routing conventions, strided inputs, errors. The CUDA kernel
does not exist yet: CUDA tensors get an error that says so."""

import pytest
import torch

import tidal
from conftest import DEVICES, TOLERANCES, assert_close


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
    # distinct after rounding to dtype, so the top-k has no ties (whose order torch.topk leaves open)
    logits = (torch.randperm(num_tokens * num_experts, generator=g).float().view(num_tokens, num_experts) /
              (num_tokens * num_experts) * 8 - 4).to(dtype)
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


@pytest.mark.parametrize("device", [p for p in DEVICES if p.id == "cuda"])
def test_cuda_tensors_get_a_clear_error(device):
    x, logits, w13, w2 = (t.to(device) for t in make(5, 16, 8, 4, torch.bfloat16))
    with pytest.raises(RuntimeError, match="fused_moe: no CUDA kernel yet; run on the CPU"):
        tidal.ops.fused_moe(x, logits, w13, w2, 2)
