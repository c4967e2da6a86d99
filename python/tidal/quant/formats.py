"""The published layouts of quantized checkpoints, read into tidal's and written from it.

GPTQ (``quant_method: gptq``; AutoGPTQ/GPTQModel/optimum): per linear layer ``qweight`` int32
[k / 8, n] (input 8i + b in bits 4b of row i), ``qzeros`` int32 [num_groups, n / 8] (output 8c + b
in bits 4b), ``scales`` fp16 [num_groups, n], ``g_idx`` int32 [k]; the original ``gptq`` layout
stores each zero point minus one (``gptq_v2`` does not).

AWQ (``quant_method: awq``, version ``gemm``; AutoAWQ): ``qweight`` int32 [k, n / 8] and ``qzeros``
int32 [num_groups, n / 8], packed along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 (output
8c + AWQ_ORDER[i] in bits 4i); ``scales`` fp16 [num_groups, n].

compressed-tensors (``format: float-quantized`` / ``int-quantized`` / ``naive-quantized``):
``weight`` FP8 E4M3 or int8 [n, k], ``weight_scale`` [n, 1] (per channel) or one value (per
tensor), ``input_scale`` one value (static FP8 activations). ``pack-quantized`` (W4A16):
``weight_packed`` int32 [n, k / 8] (input 8c + b in bits 4b of word c), each code stored as the
signed value plus 8; ``weight_scale`` [n, num_groups]; ``weight_zero_point`` int32
[n / 8, num_groups] packed along the outputs the same way (asymmetric only; else the zero is 8);
``weight_shape`` [2]; ``weight_g_idx`` [k] with act-order.

Every layout means ``w = (code - zero) * scale``; tidal's (tidal.ops.quant) keeps the outputs as
rows: codes [n, k] (int4: two a byte), scales float32 [n, num_groups], zeros uint8 [n, num_groups].
"""

from collections.abc import Iterator

import torch

from tidal.quant.config import QuantConfig
from tidal.quant.linear import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit codes (bits 4b hold code b) -> uint8 codes, the eight of
    each word consecutive along ``dim`` (0: rows, 1: columns)."""
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [..., 8]
    if dim == 0:
        return nibbles.permute(0, 2, 1).reshape(-1, packed.shape[1]).to(torch.uint8)
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def _pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`_unpack_int32`."""
    codes = codes.to(torch.int32)
    if dim == 0:
        words = codes.reshape(-1, 8, codes.shape[1]).permute(0, 2, 1)  # [k / 8, n, 8]
    else:
        words = codes.reshape(codes.shape[0], -1, 8)
    out = torch.zeros(words.shape[:-1], dtype=torch.int32, device=words.device)
    for b in range(8):
        out |= words[..., b] << (4 * b)
    return out


def _awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked AWQ columns (in packing order) -> natural output order."""
    k, n = codes.shape
    natural = torch.empty_like(codes)
    view = natural.reshape(k, n // 8, 8)
    packed = codes.reshape(k, n // 8, 8)
    for i, j in enumerate(AWQ_ORDER):
        view[:, :, j] = packed[:, :, i]
    return natural


def _awq_pack_order(codes: torch.Tensor) -> torch.Tensor:
    """Natural output order -> AWQ packing order (the inverse of :func:`_awq_columns`)."""
    k, n = codes.shape
    view = codes.reshape(k, n // 8, 8)
    return torch.stack([view[:, :, j] for j in AWQ_ORDER], dim=-1).reshape(k, n)


def _check_g_idx(name: str, g_idx: torch.Tensor, config: QuantConfig) -> None:
    k = g_idx.numel()
    group = config.group_size or k
    expected = torch.arange(k, dtype=torch.int64) // group
    if not torch.equal(g_idx.to(torch.int64).cpu(), expected):
        raise ValueError(f"tensor {name!r} orders the inputs' groups by activation (act-order); tidal reads GPTQ "
                         f"checkpoints whose groups are consecutive runs of {group} inputs")


def _checked_act_order(name: str, g_idx: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """An act-order ``g_idx`` as int64, checked: every group holds exactly ``group_size`` inputs."""
    g_idx = g_idx.to(torch.int64)
    k, group = g_idx.numel(), config.group_size
    counts = torch.bincount(g_idx.cpu(), minlength=k // group) if g_idx.numel() and g_idx.min() >= 0 else None
    if k % group or counts is None or counts.numel() != k // group or not (counts == group).all():
        raise ValueError(f"tensor {name!r} is not an act-order g_idx of {k // max(group, 1)} groups of {group} "
                         f"inputs each")
    return g_idx


def read_tensors(weights: Iterator[tuple[str, torch.Tensor]],
                 config: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's ``(name, tensor)`` stream with every quantized layer's tensors turned into
    tidal's layout and names (``<layer>.qweight``, ``.scales``, ``.zeros``, ``.input_scale``);
    the float tensors pass through. ValueError naming a tensor whose layout is not ``config``'s."""
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if config.source in ("gptq", "awq"):
            if suffix == "g_idx":
                if config.act_order:
                    yield name, _checked_act_order(name, tensor, config)
                else:
                    _check_g_idx(name, tensor, config)
                continue
            if suffix in ("qweight", "qzeros") and tensor.dtype != torch.int32:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; {config.source} packs int32 words")
            if config.source == "gptq":
                if suffix == "qweight":
                    yield name, pack_int4(_unpack_int32(tensor, 0).t())
                elif suffix == "qzeros":
                    zeros = (_unpack_int32(tensor, 1).to(torch.int32) + config.gptq_zero_offset) & 0xF
                    yield f"{prefix}.zeros", zeros.t().to(torch.uint8).contiguous()
                elif suffix == "scales":
                    yield name, tensor.t().float().contiguous()
                else:
                    yield name, tensor
            else:
                if suffix == "qweight":
                    yield name, pack_int4(_awq_columns(_unpack_int32(tensor, 1)).t())
                elif suffix == "qzeros":
                    yield f"{prefix}.zeros", _awq_columns(_unpack_int32(tensor, 1)).t().contiguous()
                elif suffix == "scales":
                    yield name, tensor.t().float().contiguous()
                else:
                    yield name, tensor
        elif config.format == "int4":  # compressed-tensors pack-quantized
            yield from _read_pack_quantized(name, prefix, suffix, tensor, config)
        else:  # compressed-tensors, 8-bit
            if suffix == "weight" and tensor.dtype in (torch.float8_e4m3fn, torch.int8):
                expected = torch.int8 if config.format == "int8" else torch.float8_e4m3fn
                if tensor.dtype != expected:
                    raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; the checkpoint's config says "
                                     f"{config.format}")
                yield f"{prefix}.qweight", tensor.view(torch.uint8) if tensor.dtype != torch.int8 else tensor
            elif suffix == "weight_scale":
                scales = tensor.float()
                yield f"{prefix}.scales", scales.reshape(-1, 1) if scales.numel() > 1 else scales.reshape(1)
            elif suffix == "input_scale":
                yield name, tensor.float().reshape(1)
            elif suffix == "weight_zero_point":
                if torch.count_nonzero(tensor):
                    raise ValueError(f"tensor {name!r} holds non-zero zero points; tidal reads symmetric "
                                     f"compressed-tensors checkpoints")
            else:
                yield name, tensor


def _read_pack_quantized(name, prefix, suffix, tensor, config: QuantConfig):
    if suffix in ("weight_packed", "weight_zero_point") and tensor.dtype != torch.int32:
        raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; pack-quantized packs int32 words")
    if suffix == "weight_packed":
        yield f"{prefix}.qweight", pack_int4(_unpack_int32(tensor, 1))
    elif suffix == "weight_scale":
        scales = tensor.float().reshape(tensor.shape[0], -1).contiguous()
        yield f"{prefix}.scales", scales
        if not config.zero_points:  # symmetric: every zero point is 8
            yield f"{prefix}.zeros", torch.full(scales.shape, 8, dtype=torch.uint8)
    elif suffix == "weight_zero_point":
        if config.zero_points:
            yield f"{prefix}.zeros", _unpack_int32(tensor, 0).contiguous()
    elif suffix == "weight_shape":
        return
    elif suffix == "weight_g_idx":
        if config.act_order:
            yield f"{prefix}.g_idx", _checked_act_order(name, tensor, config)
        else:
            _check_g_idx(name, tensor, config)
    else:
        yield name, tensor


def write_tensors(prefix: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  config: QuantConfig, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One linear layer's tensors in ``config.source``'s published layout, from tidal's: ``codes``
    [n, k] unpacked (uint8 0..15 for int4, int8, or FP8 bits as uint8), ``scales`` [n, num_groups]
    float32, ``zeros`` [n, num_groups] uint8 (int4); ``g_idx`` [k] (GPTQ act-order: each input's
    group; the codes in input order). Names are ``prefix + '.' + tensor``."""
    codes, scales = codes.cpu(), scales.cpu()
    if config.source == "gptq":
        k = codes.shape[1]
        group = config.group_size or k
        stored_zeros = (zeros.cpu().to(torch.int32) - config.gptq_zero_offset) & 0xF
        return {f"{prefix}.qweight": _pack_int32(codes.t().contiguous(), 0),
                f"{prefix}.qzeros": _pack_int32(stored_zeros.t().contiguous(), 1),
                f"{prefix}.scales": scales.t().to(torch.float16).contiguous(),
                f"{prefix}.g_idx": (torch.arange(k, dtype=torch.int32) // group if g_idx is None
                                    else g_idx.cpu().to(torch.int32))}
    if config.source == "awq":
        return {f"{prefix}.qweight": _pack_int32(_awq_pack_order(codes.t().contiguous()), 1),
                f"{prefix}.qzeros": _pack_int32(_awq_pack_order(zeros.cpu().t().contiguous()), 1),
                f"{prefix}.scales": scales.t().to(torch.float16).contiguous()}
    if config.source == "compressed-tensors":
        weight = codes.view(torch.float8_e4m3fn) if config.format == "fp8" else codes.to(torch.int8)
        return {f"{prefix}.weight": weight.contiguous(), f"{prefix}.weight_scale": scales.reshape(-1, 1).contiguous()}
    raise ValueError(f"config.source={config.source!r} has no published layout to write")


def quantization_config(config: QuantConfig) -> dict:
    """The ``quantization_config`` entry of config.json for a checkpoint written by :func:`write_tensors`."""
    if config.source == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": config.group_size or -1, "desc_act": config.act_order,
                "sym": False, "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
                "checkpoint_format": "gptq" if config.gptq_zero_offset else "gptq_v2"}
    if config.source == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": config.group_size or -1, "version": "gemm",
                "zero_point": True, "modules_to_not_convert": None}
    kind = "float" if config.format == "fp8" else "int"
    group = {"targets": ["Linear"],
             "weights": {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False,
                         "group_size": None, "observer": "minmax"},
             "input_activations": None if kind == "int" else
             {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
              "observer": None}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized" if kind == "float" else "int-quantized",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "quantization_status": "compressed"}


def save_quantized_model(model: torch.nn.Module, path, config: QuantConfig) -> None:
    """Write a model whose projections are QuantLinear layers as a Hugging Face directory in
    ``config.source``'s published layout: config.json with its ``quantization_config``, one
    ``model.safetensors`` with the quantized layers in that layout under Hugging Face's unfused names
    and every other tensor in the model's dtype."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from tidal.quant.linear import unpack_int4

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    for name, (param, lo, hi) in model._hf_targets().items():
        part = param.detach() if lo is None else param.detach()[lo:hi]
        prefix, _, suffix = name.rpartition(".")
        if suffix in ("qweight", "scales", "zeros", "g_idx"):
            layers.setdefault(prefix, {})[suffix] = part
        else:  # float tensors, a quantized layer's bias and its static input scale
            tensors[name] = part.to("cpu", copy=True).contiguous()
    for prefix, parts in layers.items():
        codes = unpack_int4(parts["qweight"]) if config.format == "int4" else parts["qweight"]
        g_idx = parts.get("g_idx")
        if g_idx is not None:  # act-order: the codes sit in group order (argsort of g_idx); store them by input
            if config.source != "gptq":
                raise ValueError(f"{prefix} has act-order codes; only the GPTQ layout stores them")
            codes = codes[:, torch.argsort(torch.argsort(g_idx, stable=True))]
        tensors.update(write_tensors(prefix, codes, parts["scales"], parts.get("zeros"), config, g_idx))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    dtype_name = str(model.dtype).removeprefix("torch.")
    raw = {**model.config.hf_config, "dtype": dtype_name, "quantization_config": quantization_config(config)}
    raw.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
