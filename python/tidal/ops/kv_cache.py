"""Writing new keys and values into the paged KV cache as a torch op
(``torch.ops.tidal.reshape_and_cache_``), on the CPU and CUDA."""

import torch

from tidal.ops._lib import capsule, is_eager_call, lib, native, stream_of

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

lib.define("reshape_and_cache_(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
           "Tensor slot_mapping) -> ()")


def check_cache_dtypes(key_cache, value_cache, x, x_name: str) -> None:
    """The caches hold ``x``'s dtype, or FP8 E4M3 codes as uint8 (scale 1)."""
    if key_cache.dtype == torch.uint8:
        if value_cache.dtype != torch.uint8:
            raise ValueError(f"value_cache.dtype={value_cache.dtype} must be torch.uint8 like key_cache's")
        return
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} must equal {x_name}.dtype={x.dtype} (or be torch.uint8: "
                             f"FP8 codes)")


def _check(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"key.dtype={key.dtype} is not supported; expected float32, float16 or bfloat16")
    if key.dim() != 3:
        raise ValueError(f"key must be 3-D [num_tokens, num_kv_heads, head_dim], got shape {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value.shape={tuple(value.shape)} must equal key.shape={tuple(key.shape)}")
    if key_cache.dim() != 4 or key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"key_cache.shape={tuple(key_cache.shape)} must be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim] with num_kv_heads, head_dim = {tuple(key.shape[1:])} (from key)")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache.shape={tuple(value_cache.shape)} must equal "
                         f"key_cache.shape={tuple(key_cache.shape)}")
    if value.dtype != key.dtype:
        raise ValueError(f"value.dtype={value.dtype} must equal key.dtype={key.dtype}")
    check_cache_dtypes(key_cache, value_cache, key, "key")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping.dtype={slot_mapping.dtype} must be torch.int64")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping.shape={tuple(slot_mapping.shape)} must be [num_tokens] = [{key.shape[0]}]")
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device} but key is on {key.device}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _reshape_and_cache_impl(key, value, key_cache, value_cache, slot_mapping):
    _check(key, value, key_cache, value_cache, slot_mapping)
    if key.numel() == 0:
        return
    native.reshape_and_cache(capsule(_last_dim_contiguous(key)), capsule(_last_dim_contiguous(value)),
                             capsule(key_cache), capsule(value_cache), capsule(slot_mapping), stream_of(key))


for _key in ("CPU", "CUDA"):
    lib.impl("reshape_and_cache_", _reshape_and_cache_impl, _key)


@torch.library.register_fake("tidal::reshape_and_cache_")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    _check(key, value, key_cache, value_cache, slot_mapping)


def reshape_and_cache_(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    r"""Write this step's keys and values into their slots of the paged KV cache.

    .. math:: \mathrm{key\_cache}[s \,/\!/\, B,\ s \bmod B] = \mathrm{key}[t], \qquad s = \mathrm{slot\_mapping}[t]

    and the same for ``value``, where ``B`` is the block size. A negative slot is padding and is
    skipped; two tokens with one slot: the later one wins on the CPU, either may on the GPU.

    Parameters
    ----------
    key, value : torch.Tensor
        ``[num_tokens, num_kv_heads, head_dim]``, float32 / float16 / bfloat16, any strides (e.g.
        slices of a fused qkv output).
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous, ``key.dtype``; written in place.
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int64, ``block_id * block_size + offset``. A slot
        ``>= num_blocks * block_size`` raises ``IndexError`` naming the token and the slot, before
        anything is written.
    """
    if is_eager_call(key, value, key_cache, value_cache, slot_mapping):
        return _reshape_and_cache_impl(key, value, key_cache, value_cache, slot_mapping)
    torch.ops.tidal.reshape_and_cache_(key, value, key_cache, value_cache, slot_mapping)
