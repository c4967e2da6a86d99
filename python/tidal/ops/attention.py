"""Paged attention as a torch op (``torch.ops.tidal.paged_attention``): one op for prefill, chunked
prefill over a cached prefix and decode, mixed in one flat batch. On the CPU, OpenMP threads with an
online softmax per key block; on CUDA, a SIMT kernel for decode (split over keys for small batches,
flash-decoding) and a tensor-core kernel for prefill and mixed batches in fp16 / bf16."""

import torch

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of
from tidal.ops.kv_cache import check_cache_dtypes

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256

lib.define("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
           "Tensor seq_lens, Tensor cu_seqlens_q, float scale, int sliding_window, int max_seqlen_q=-1, "
           "int max_seqlen_k=-1, Tensor(a!)? split_counters=None, Tensor? seq_order=None) -> Tensor")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale) -> None:
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"query.dtype={query.dtype} is not supported; expected float32, float16 or bfloat16")
    if query.dim() != 3:
        raise ValueError(f"query must be 3-D [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim=query.shape[2]={head_dim} must be in [1, {_MAX_HEAD_DIM}]")
    if key_cache.dim() != 4 or key_cache.shape[3] != head_dim:
        raise ValueError(f"key_cache.shape={tuple(key_cache.shape)} must be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim={head_dim}]")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache.shape={tuple(value_cache.shape)} must equal "
                         f"key_cache.shape={tuple(key_cache.shape)}")
    num_kv_heads = key_cache.shape[2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads=query.shape[1]={num_heads} must be a multiple of "
                         f"num_kv_heads=key_cache.shape[2]={num_kv_heads}")
    check_cache_dtypes(key_cache, value_cache, query, "query")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be 2-D [num_seqs, max_num_blocks], got shape {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens.shape={tuple(seq_lens.shape)} must be [num_seqs] = [{num_seqs}]")
    if cu_seqlens_q.shape != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens_q.shape={tuple(cu_seqlens_q.shape)} must be [num_seqs + 1] = [{num_seqs + 1}]")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name}.dtype={t.dtype} must be torch.int32")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if not abs(scale) < float("inf"):
        raise ValueError(f"scale={scale} must be finite")


def _gpu_workspace(query, key_cache, num_seqs, max_seqlen_q, max_seqlen_k):
    num_tokens, num_heads, head_dim = query.shape
    size = native.paged_attention_workspace_size(1, query.device.index or 0, _DTYPE_NAMES[query.dtype], num_tokens,
                                                 num_seqs, num_heads, key_cache.shape[2], head_dim, max_seqlen_q,
                                                 max_seqlen_k)
    return capsule(torch.empty(size, dtype=torch.uint8, device=query.device)) if size else None


def _check_counters(split_counters, seq_order, query, num_seqs) -> None:
    if split_counters is not None:
        if split_counters.dtype != torch.int32 or not split_counters.is_contiguous():
            raise ValueError(f"split_counters must be contiguous torch.int32, got {split_counters.dtype}")
        if split_counters.device != query.device:
            raise ValueError(f"split_counters is on {split_counters.device} but query is on {query.device}")
    if seq_order is not None:
        if seq_order.dtype != torch.int32 or seq_order.shape != (num_seqs,):
            raise ValueError(f"seq_order must be [num_seqs] = [{num_seqs}] torch.int32, got {seq_order.dtype} of "
                             f"shape {tuple(seq_order.shape)}")
        if seq_order.device != query.device:
            raise ValueError(f"seq_order is on {seq_order.device} but query is on {query.device}")


def _paged_attention_impl(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                          sliding_window, max_seqlen_q=-1, max_seqlen_k=-1, split_counters=None, seq_order=None):
    _check(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale)
    _check_counters(split_counters, seq_order, query, block_tables.shape[0])
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    q = query if query.shape[-1] <= 1 or query.stride(-1) == 1 else query.contiguous()
    workspace = None
    if query.device.type == "cuda" and query.shape[0] > 0:
        if max_seqlen_q < 0 or max_seqlen_k < 0:  # NOTE(tidal): a host synchronisation; callers pass them
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if max_seqlen_q < 0 else max_seqlen_q
            max_seqlen_k = int(seq_lens.max()) if max_seqlen_k < 0 else max_seqlen_k
        workspace = _gpu_workspace(query, key_cache, block_tables.shape[0], max_seqlen_q, max_seqlen_k)
    native.paged_attention(capsule(out), capsule(q), capsule(key_cache), capsule(value_cache), capsule(block_tables),
                           capsule(seq_lens), capsule(cu_seqlens_q), scale, sliding_window, max_seqlen_q,
                           max_seqlen_k, workspace,
                           None if split_counters is None or query.device.type != "cuda" else capsule(split_counters),
                           None if seq_order is None else capsule(seq_order), stream_of(query))
    return out


for _key in ("CPU", "CUDA"):
    lib.impl("paged_attention", _paged_attention_impl, _key)


@torch.library.register_fake("tidal::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                          max_seqlen_q=-1, max_seqlen_k=-1, split_counters=None, seq_order=None):
    _check(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale)
    _check_counters(split_counters, seq_order, query, block_tables.shape[0])
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                    sliding_window: int = -1, max_seqlen_q: int = -1, max_seqlen_k: int = -1,
                    split_counters: torch.Tensor | None = None, seq_order: torch.Tensor | None = None) -> torch.Tensor:
    r"""Causal attention of a flat batch of new query tokens over the paged KV cache.

    Sequence ``s`` owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` (``q_len`` of them); its
    row ``j`` sits at position ``p = seq_lens[s] - q_len + j`` and attends the cached keys at
    positions ``k`` with ``k <= p`` and, when ``sliding_window > 0``, ``k > p - sliding_window``
    (Hugging Face's sliding-window mask). The key at position ``k`` lives in block
    ``block_tables[s, k // block_size]`` at offset ``k % block_size``. Query head ``h`` reads KV
    head ``h // (num_heads // num_kv_heads)`` (GQA / MQA).

    .. math:: \mathrm{out}[i, h] = \sum_k \mathrm{softmax}_k\big(\mathrm{scale}\; q_{i,h} \cdot K_k\big)\, V_k

    in fp32 with an online softmax over key blocks, rounded once to the dtype. One call covers
    prefill (``q_len == seq_len``), chunked prefill over a cached prefix (``q_len < seq_len``) and
    decode (``q_len == 1``), mixed. This step's keys and values must already be in the cache
    (:func:`reshape_and_cache_`).

    Parameters
    ----------
    query : torch.Tensor
        ``[num_tokens, num_heads, head_dim]``, float32 / float16 / bfloat16, any strides
        (e.g. a slice of a fused qkv output); ``head_dim <= 256``.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous, ``query.dtype``;
        ``num_heads % num_kv_heads == 0``.
    block_tables : torch.Tensor
        ``[num_seqs, max_num_blocks]`` int32; the entries a sequence reads must lie in
        ``[0, num_blocks)`` (else ``IndexError``).
    seq_lens : torch.Tensor
        ``[num_seqs]`` int32: context length including this step's tokens;
        ``q_len <= seq_len <= max_num_blocks * block_size``.
    cu_seqlens_q : torch.Tensor
        ``[num_seqs + 1]`` int32: first 0, non-decreasing, last ``num_tokens``.
    scale : float
        Multiplies ``q . k``; usually ``head_dim ** -0.5``.
    sliding_window : int
        Keys within this many positions of the query (the query's own included) when ``> 0``;
        ``<= 0`` (default -1): no window.
    max_seqlen_q, max_seqlen_k : int
        The longest query run (``cu_seqlens_q`` difference) and context (``seq_lens`` entry) of the
        batch, or upper bounds of them. The CUDA launcher sizes its grid from these host ints; -1
        (default) computes them from the tensors, which synchronises with the device. Ignored on the
        CPU. A CUDA graph captured with ``max_seqlen_k`` at its largest value replays correctly for
        any shorter context.
    split_counters : torch.Tensor, optional
        CUDA: int32 zeros (``num_seqs * num_heads`` of them cover any decode batch) that the caller
        keeps for its calls on one stream, as the GPU model runner does. With them the last of a
        sequence's key splits to finish merges the splits in the same kernel (flash-decoding without
        a second kernel) and leaves its counter at zero again; without them, or when a call needs
        more of them, a second kernel merges the splits. The output is the same either way.
    seq_order : torch.Tensor, optional
        ``[num_seqs]`` int32 on ``query``'s device, a permutation of ``range(num_seqs)``: the order in
        which the CUDA kernels take the sequences. When contexts differ, the longest first (the GPU
        model runner's order) keeps the grid's last wave short. The output is the same in any order.
        The CPU checks that it is a permutation and otherwise ignores it; CUDA takes it on trust (a
        check would synchronise), and a tensor that is no permutation leaves some rows unwritten.

    Returns
    -------
    torch.Tensor
        A new contiguous ``[num_tokens, num_heads, head_dim]`` tensor of ``query.dtype``.
    """
    if is_eager_call(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q):
        return _paged_attention_impl(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                     sliding_window, max_seqlen_q, max_seqlen_k, split_counters, seq_order)
    return torch.ops.tidal.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
                                           scale, sliding_window, max_seqlen_q, max_seqlen_k, split_counters,
                                           seq_order)
