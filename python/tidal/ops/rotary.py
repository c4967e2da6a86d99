"""Rotary position embedding, in place, as a torch op (``torch.ops.tidal.rotary_embedding_``).

The query and key may be strided views (slices of a fused qkv projection output); they are
rotated through those views without copies. CPU and CUDA kernels; also the fused
``rotary_embedding_and_cache_`` (Qwen3's q/k norm, rotary and the KV-cache write in one pass).
"""

import torch

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of
from tidal.ops.kv_cache import _check as check_cache_write

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("rotary_embedding_(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_dim, "
           "Tensor cos_sin_cache, bool is_neox) -> ()")


def _check_heads(t: torch.Tensor, name: str, head_dim: int, num_tokens: int) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [num_tokens, num_heads, head_dim] or [num_tokens, num_heads * head_dim], "
                         f"got shape {tuple(t.shape)}")
    if t.shape[0] != num_tokens:
        raise ValueError(f"{name}.shape[0]={t.shape[0]} must equal num_tokens=positions.shape[0]={num_tokens}")
    if t.dim() == 3 and t.shape[2] != head_dim:
        raise ValueError(f"{name}.shape[2]={t.shape[2]} must equal head_dim={head_dim}")
    if t.dim() == 2 and t.shape[1] % head_dim:
        raise ValueError(f"{name}.shape[1]={t.shape[1]} must be a multiple of head_dim={head_dim}")


def _check(positions, query, key, head_dim, cos_sin_cache) -> None:
    if positions.dtype != torch.int64:
        raise ValueError(f"positions.dtype={positions.dtype} must be torch.int64")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [num_tokens], got shape {tuple(positions.shape)}")
    if head_dim <= 0:
        raise ValueError(f"head_dim={head_dim} must be positive")
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query.dtype={query.dtype} is not supported; expected float32, float16 or bfloat16")
    if key.dtype != query.dtype:
        raise ValueError(f"key.dtype={key.dtype} must equal query.dtype={query.dtype}")
    _check_heads(query, "query", head_dim, positions.shape[0])
    _check_heads(key, "key", head_dim, positions.shape[0])
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache.dtype={cos_sin_cache.dtype} must be torch.float32")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache must be 2-D [max_position, rotary_dim], got shape {tuple(cos_sin_cache.shape)}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim=cos_sin_cache.shape[1]={rotary_dim} must be even, positive and "
                         f"<= head_dim={head_dim}")
    for name, t in (("key", key), ("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")


def _writable_view(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _rotary_embedding_impl(positions, query, key, head_dim, cos_sin_cache, is_neox):
    _check(positions, query, key, head_dim, cos_sin_cache)
    if positions.shape[0] == 0:
        return
    cache = cos_sin_cache if _writable_view(cos_sin_cache) else cos_sin_cache.contiguous()
    # NOTE(tidal): the kernel writes through the views it is given; a view whose last dim is not
    # contiguous is rotated in a contiguous copy and copied back.
    q = query if _writable_view(query) else query.contiguous()
    k = key if _writable_view(key) else key.contiguous()
    native.rotary_embedding(capsule(positions), capsule(q), capsule(k), head_dim, capsule(cache), is_neox,
                            stream_of(query))
    if q is not query:
        query.copy_(q)
    if k is not key:
        key.copy_(k)


for _key in ("CPU", "CUDA"):
    lib.impl("rotary_embedding_", _rotary_embedding_impl, _key)


@torch.library.register_fake("tidal::rotary_embedding_")
def _rotary_embedding_fake(positions, query, key, head_dim, cos_sin_cache, is_neox):
    _check(positions, query, key, head_dim, cos_sin_cache)


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int,
                      cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    r"""Rotary position embedding (RoPE), applied in place to ``query`` and ``key``.

    For token ``t`` at position ``p = positions[t]``, every head's first ``rotary_dim`` entries are
    rotated in pairs :math:`(x_1, x_2)` by the angles of row ``p`` of the table:

    .. math:: x_1' = x_1 \cos\theta - x_2 \sin\theta, \qquad x_2' = x_2 \cos\theta + x_1 \sin\theta

    in fp32, rounded once. ``is_neox=True`` pairs ``(i, i + rotary_dim/2)``, which is
    ``x * cos + rotate_half(x) * sin`` of Hugging Face Llama / Qwen / Mistral; ``False`` pairs
    ``(2i, 2i + 1)`` (GPT-J). Entries past ``rotary_dim`` are left untouched.

    Parameters
    ----------
    positions : torch.Tensor
        ``[num_tokens]`` int64, each in ``[0, max_position)``; otherwise ``IndexError`` naming it
        (raised before anything is written).
    query : torch.Tensor
        ``[num_tokens, num_heads, head_dim]`` or ``[num_tokens, num_heads * head_dim]``; float32 /
        float16 / bfloat16; any strides (slices of a fused qkv output are rotated through the view).
    key : torch.Tensor
        ``[num_tokens, num_kv_heads, head_dim]`` or 2-D likewise; same dtype as ``query``; must not
        share elements with ``query``.
    head_dim : int
        Size of one head (makes the 2-D forms unambiguous).
    cos_sin_cache : torch.Tensor
        ``[max_position, rotary_dim]`` float32: row ``p`` is ``cos(p * inv_freq)`` then
        ``sin(p * inv_freq)``; ``rotary_dim`` even and ``<= head_dim``.
    is_neox : bool
        Neox (rotate_half) pairing when True, GPT-J interleaved pairing when False.
    """
    if is_eager_call(positions, query, key, cos_sin_cache):
        return _rotary_embedding_impl(positions, query, key, head_dim, cos_sin_cache, is_neox)
    torch.ops.tidal.rotary_embedding_(positions, query, key, head_dim, cos_sin_cache, is_neox)


lib.define("rotary_embedding(Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache) -> (Tensor, Tensor)")


def _rotary_embedding_out_impl(positions, query, key, cos_sin_cache):
    # one copy each into fresh contiguous buffers (``.contiguous().clone()`` copied a strided view twice)
    q, k = query.clone(memory_format=torch.contiguous_format), key.clone(memory_format=torch.contiguous_format)
    _rotary_embedding_impl(positions, q, k, query.shape[-1], cos_sin_cache, True)
    return q, k


for _key in ("CPU", "CUDA"):
    lib.impl("rotary_embedding", _rotary_embedding_out_impl, _key)


@torch.library.register_fake("tidal::rotary_embedding")
def _rotary_embedding_out_fake(positions, query, key, cos_sin_cache):
    return torch.empty_like(query, memory_format=torch.contiguous_format), \
        torch.empty_like(key, memory_format=torch.contiguous_format)


def _rotary_setup(ctx, inputs, output):
    positions, _, _, cache = inputs
    ctx.save_for_backward(positions, cache)


def _rotary_backward(ctx, grad_q, grad_k):
    """The rotation is orthogonal: its transpose rotates by the opposite angles (sin negated)."""
    positions, cache = ctx.saved_tensors
    half = cache.shape[1] // 2
    inverse = torch.cat((cache[:, :half], -cache[:, half:]), dim=1)
    gq, gk = torch.ops.tidal.rotary_embedding(positions, grad_q, grad_k, inverse)
    return None, gq, gk, None


torch.library.register_autograd("tidal::rotary_embedding", _rotary_backward, setup_context=_rotary_setup)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding as rotary_embedding_ computes it (fp32, rounded once), out of
    place and differentiable with respect to ``query`` and ``key`` (``[num_tokens, heads,
    head_dim]`` each; the backward is the same kernel rotating the gradients back): the training
    forward's rotary. Returns new contiguous rotated tensors."""
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query and key must be [num_tokens, heads, head_dim], got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if is_eager_call(positions, query, key, cos_sin_cache):
        return _rotary_embedding_out_impl(positions, query, key, cos_sin_cache)
    return torch.ops.tidal.rotary_embedding(positions, query, key, cos_sin_cache)


lib.define("rotary_embedding_and_cache_(Tensor positions, Tensor(a!) query, Tensor key, Tensor value, "
           "Tensor(b!) key_cache, Tensor(c!) value_cache, Tensor slot_mapping, Tensor cos_sin_cache, bool is_neox, "
           "Tensor? q_norm_weight, Tensor? k_norm_weight, float eps) -> ()")


def _check_fused(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache, q_norm_weight,
                 k_norm_weight, eps) -> None:
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query and key must be 3-D [num_tokens, heads, head_dim], got shapes {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    head_dim = query.shape[2]
    _check(positions, query, key, head_dim, cos_sin_cache)
    check_cache_write(key, value, key_cache, value_cache, slot_mapping)
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        if w.shape != (head_dim,) or w.dtype != query.dtype or w.device != query.device:
            raise ValueError(f"{name} must be a [{head_dim}] {query.dtype} tensor on {query.device}, got "
                             f"{tuple(w.shape)} {w.dtype} on {w.device}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"eps={eps} must be finite and >= 0")


def _rotary_embedding_and_cache_impl(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                     cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps):
    _check_fused(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache, q_norm_weight,
                 k_norm_weight, eps)
    if positions.shape[0] == 0:
        return
    q = query if _writable_view(query) else query.contiguous()
    k = key if _writable_view(key) else key.contiguous()
    v = value if _writable_view(value) else value.contiguous()
    cache = cos_sin_cache if _writable_view(cos_sin_cache) else cos_sin_cache.contiguous()
    native.rotary_embedding_and_cache(
        capsule(positions), capsule(q), capsule(k), capsule(v), capsule(key_cache), capsule(value_cache),
        capsule(slot_mapping), capsule(cache), is_neox, None if q_norm_weight is None else capsule(q_norm_weight),
        None if k_norm_weight is None else capsule(k_norm_weight), eps, stream_of(query))
    if q is not query:
        query.copy_(q)


for _key in ("CPU", "CUDA"):
    lib.impl("rotary_embedding_and_cache_", _rotary_embedding_and_cache_impl, _key)


@torch.library.register_fake("tidal::rotary_embedding_and_cache_")
def _rotary_embedding_and_cache_fake(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache,
                                     is_neox, q_norm_weight, k_norm_weight, eps):
    _check_fused(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache, q_norm_weight,
                 k_norm_weight, eps)


def rotary_embedding_and_cache_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                cos_sin_cache: torch.Tensor, is_neox: bool = True,
                                q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                                eps: float = 1e-6) -> None:
    r"""The attention block's pre-processing in one pass: per-head RMSNorm (Qwen3's ``q_norm`` /
    ``k_norm``, when their weights are given), rotary embedding, and the KV-cache write.

    .. math::
        q_{t,h} \leftarrow \mathrm{rope}_p(\mathrm{norm}_q(q_{t,h})), \qquad
        K[s] \leftarrow \mathrm{rope}_p(\mathrm{norm}_k(k_{t,h})), \qquad V[s] \leftarrow v_{t,h}

    with ``p = positions[t]``, ``s = slot_mapping[t]``,
    :math:`\mathrm{norm}_x(u) = u / \sqrt{\overline{u^2} + \epsilon} \cdot w_x` and ``rope`` the
    rotation of :func:`rotary_embedding_`; fp32 math, one rounding per output. ``query`` is updated
    in place; ``key`` is only read (its normalised, rotated copy goes to the cache). A negative slot
    skips the token's cache write.

    Parameters
    ----------
    positions : torch.Tensor
        ``[num_tokens]`` int64.
    query : torch.Tensor
        ``[num_tokens, num_heads, head_dim]`` float32 / float16 / bfloat16, any token and head strides.
    key, value : torch.Tensor
        ``[num_tokens, num_kv_heads, head_dim]``, query's dtype, any token and head strides.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous, written at the slots.
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int64.
    cos_sin_cache : torch.Tensor
        ``[max_position, rotary_dim]`` float32, as for :func:`rotary_embedding_`.
    is_neox : bool
        Neox pairing (Llama, Qwen, Mistral) when True, GPT-J when False.
    q_norm_weight, k_norm_weight : torch.Tensor or None
        ``[head_dim]`` RMSNorm weights, or None for no norm.
    eps : float
        The norm's epsilon.
    """
    tensors = [positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache]
    tensors += [w for w in (q_norm_weight, k_norm_weight) if w is not None]
    if is_eager_call(*tensors):
        return _rotary_embedding_and_cache_impl(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                                cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps)
    torch.ops.tidal.rotary_embedding_and_cache_(positions, query, key, value, key_cache, value_cache, slot_mapping,
                                                cos_sin_cache, is_neox, q_norm_weight, k_norm_weight, eps)
