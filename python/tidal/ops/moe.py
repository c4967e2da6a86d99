"""The mixture-of-experts MLP as a torch op (``torch.ops.tidal.fused_moe``): routing, the experts'
gate-up product, SiLU-and-mul, down product and the weighted combine in one call, tokens grouped by
expert. CPU and CUDA kernels; the CUDA one takes a workspace sized by the core."""

import torch

from tidal.ops._lib import as_rows, capsule, is_eager_call, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

lib.define("fused_moe(Tensor x, Tensor router_logits, Tensor w13, Tensor w2, int top_k, bool renormalize, "
           "bool fp32_weights) -> Tensor")


def _check(x, router_logits, w13, w2, top_k) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported; expected float32, float16 or bfloat16")
    if w13.dim() != 3 or w13.shape[2] != x.shape[-1] or w13.shape[1] % 2:
        raise ValueError(f"w13.shape={tuple(w13.shape)} must be [num_experts, 2 * inter, hidden={x.shape[-1]}]")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, x.shape[-1], inter):
        raise ValueError(f"w2.shape={tuple(w2.shape)} must be [num_experts, hidden, inter] = "
                         f"[{num_experts}, {x.shape[-1]}, {inter}]")
    if router_logits.shape != (*x.shape[:-1], num_experts):
        raise ValueError(f"router_logits.shape={tuple(router_logits.shape)} must be [..., num_experts] = "
                         f"{(*x.shape[:-1], num_experts)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")


def _fused_moe_impl(x, router_logits, w13, w2, top_k, renormalize, fp32_weights):
    _check(x, router_logits, w13, w2, top_k)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = as_rows(x, "x")
    logits = as_rows(router_logits, "router_logits")
    workspace = None
    if x.device.type == "cuda":
        size = native.fused_moe_workspace_size(1, x.device.index or 0, _DTYPE_NAMES[x.dtype], rows.shape[0],
                                               rows.shape[1], w2.shape[2], w13.shape[0], top_k)
        workspace = capsule(torch.empty(size, dtype=torch.uint8, device=x.device))
    native.fused_moe(capsule(out.view(rows.shape)), capsule(rows), capsule(logits), capsule(w13.contiguous()),
                     capsule(w2.contiguous()), top_k, renormalize, fp32_weights, workspace, stream_of(x))
    return out


for _key in ("CPU", "CUDA"):
    lib.impl("fused_moe", _fused_moe_impl, _key)


@torch.library.register_fake("tidal::fused_moe")
def _fused_moe_fake(x, router_logits, w13, w2, top_k, renormalize, fp32_weights):
    _check(x, router_logits, w13, w2, top_k)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool = True, fp32_weights: bool = False) -> torch.Tensor:
    r"""A mixture-of-experts MLP with its routing (Mixtral, Qwen2-MoE, Qwen3-MoE).

    .. math::
        p = \mathrm{softmax}(\ell_t),\quad S = \mathrm{top}_k(p),\quad
        w_e = \frac{p_e}{\sum_{e' \in S} p_{e'}}\ (\text{or } p_e),\quad
        \mathrm{out}_t = \sum_{e \in S} w_e\, W_2^{e}\big(\mathrm{silu}(G^{e} x_t) \odot U^{e} x_t\big)

    with the softmax in fp32, the products in fp32 and one rounding of the output; the sum runs in
    ascending expert order. On the GPU the gate-up activations are rounded to x's dtype before the
    down product (as transformers' own forward in that dtype does).

    Parameters
    ----------
    x : torch.Tensor
        ``[..., hidden]`` float32 / float16 / bfloat16.
    router_logits : torch.Tensor
        ``[..., num_experts]``: the router's logits for each token (x's dtype or float32).
    w13 : torch.Tensor
        ``[num_experts, 2 * inter, hidden]``: each expert's gate rows, then its up rows.
    w2 : torch.Tensor
        ``[num_experts, hidden, inter]``: each expert's down projection.
    top_k : int
        Experts per token.
    renormalize : bool
        Divide the chosen probabilities by their sum (Mixtral; Qwen's ``norm_topk_prob``).
    fp32_weights : bool
        Keep the routing weights in fp32 (Mixtral); else round them to x's dtype (Qwen).

    Returns
    -------
    torch.Tensor
        A new contiguous tensor shaped like ``x``. Not differentiable (training uses the model's
        pure-torch MoE forward).
    """
    if is_eager_call(x, router_logits, w13, w2):
        return _fused_moe_impl(x, router_logits, w13, w2, top_k, renormalize, fp32_weights)
    return torch.ops.tidal.fused_moe(x, router_logits, w13, w2, top_k, renormalize, fp32_weights)
