"""Rotary position embedding tables, computed exactly as transformers computes them.

A table row holds ``[cos(p * inv_freq), sin(p * inv_freq)]`` (cos half then sin half, fp32), the
layout ``tidal.ops.rotary_embedding_`` indexes by position. ``inv_freq`` follows transformers'
formulas operation by operation in fp32, so the tables are bit-identical to what its rotary module
feeds ``apply_rotary_pos_emb``.

Dynamic NTK scaling ("dynamic") changes the base with the sequence length. tidal applies it per
sequence: the new tokens of a sequence whose length after the step, ``L = seq_len``, exceeds
``max_position_embeddings`` are rotated with the base computed for ``L``; tokens of shorter sequences
use the plain table. Keys already in the KV cache keep the rotation they were written with. This is
what transformers does when it generates one sequence with a KV cache (its rotary module recomputes
the base from ``max(position_ids) + 1`` every forward).
"""

import math

import torch


def _default_inv_freq(rotary_dim: int, base: float | torch.Tensor) -> torch.Tensor:
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base ** exponent)


def _llama3_inv_freq(rotary_dim: int, base: float, scaling: dict) -> torch.Tensor:
    inv_freq = _default_inv_freq(rotary_dim, base)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def dynamic_ntk_base(base: float, factor: float, seq_len: int, max_position_embeddings: int,
                     rotary_dim: int) -> torch.Tensor:
    r"""The dynamic-NTK base for a sequence of ``seq_len`` tokens (a 0-d fp32 tensor).

    .. math:: b' = b \left(\frac{f \cdot \max(L, L_{max})}{L_{max}} - (f - 1)\right)^{d / (d - 2)}

    evaluated in fp32 as transformers does; equals ``base`` for ``seq_len <= max_position_embeddings``.
    """
    length = torch.maximum(torch.tensor(seq_len, dtype=torch.int64),
                           torch.tensor(max_position_embeddings, dtype=torch.int64))
    return base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None, seq_len: int | None = None,
             max_position_embeddings: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` fp32 (CPU) for plain RoPE or a scaled variant.

    ``seq_len`` and ``max_position_embeddings`` matter only for "dynamic": with both given and
    ``seq_len > max_position_embeddings``, the base is :func:`dynamic_ntk_base`'s.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_dim} must be a positive even number")
    kind = "default" if rope_scaling is None else rope_scaling["rope_type"]
    if kind == "default":
        return _default_inv_freq(rotary_dim, base)
    if kind == "linear":
        return _default_inv_freq(rotary_dim, base) / rope_scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(rotary_dim, base, rope_scaling)
    if kind == "dynamic":
        if seq_len is None or max_position_embeddings is None or seq_len <= max_position_embeddings:
            return _default_inv_freq(rotary_dim, base)
        return _default_inv_freq(rotary_dim, dynamic_ntk_base(base, rope_scaling["factor"], seq_len,
                                                              max_position_embeddings, rotary_dim))
    raise ValueError(f"rope_type={kind!r} is not supported; supported: default, linear, dynamic, llama3")


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``[len(positions), rotary_dim]`` fp32 rows ``[cos | sin]`` of ``positions * inv_freq``."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def build_cos_sin_cache(rotary_dim: int, max_position: int, base: float, rope_scaling: dict | None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    r"""The rotary table of positions ``0 .. max_position - 1``.

    .. math:: \mathrm{cache}[p] = [\cos(p\,\omega_0..\omega_{d/2-1}),\ \sin(p\,\omega_0..\omega_{d/2-1})]

    with :math:`\omega` from :func:`inv_freq` (for "dynamic": the unscaled frequencies, which
    transformers uses up to ``max_position_embeddings``; longer sequences need
    :func:`inv_freq` with their ``seq_len``, see the module docstring).

    Parameters
    ----------
    rotary_dim : int
        Rotated dims per head (the head_dim for the Llama family); even.
    max_position : int
        Number of rows.
    base : float
        ``rope_theta``.
    rope_scaling : dict or None
        ``ModelConfig.rope_scaling``.

    Returns
    -------
    torch.Tensor
        ``[max_position, rotary_dim]``: cos half then sin half, computed in fp32, cast to ``dtype``.
    """
    if max_position <= 0:
        raise ValueError(f"max_position={max_position} must be positive")
    freqs = inv_freq(rotary_dim, base, rope_scaling)
    table = cos_sin(torch.arange(max_position, dtype=torch.int64), freqs)
    return table.to(dtype=dtype, device=device)
