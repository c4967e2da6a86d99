"""The quantized linear layer of serving, the round-to-nearest quantizers that make its codes from a
float weight, and the swap of a model's dense linear layers for it.

Which layers: every decoder layer's ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj``
(what vLLM and the published GPTQ/AWQ checkpoints quantize). The embeddings, the LM head, the norms,
a mixture-of-experts block's experts and a vision tower keep the model's dtype.
"""

import torch
from torch import nn

from tidal.ops.quant import FP8_MAX, dequantize_weight, fp8_matmul, fp8_weight_only_rows, quant_linear
from tidal.quant.config import QuantConfig

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# The formats whose layers run decode steps of a few tokens through ops.skinny_linear (norm, codes
# streamed through shared memory into tensor-core fragments, residual add in one kernel on sm_90;
# llama.skinny_max_tokens says how few) instead of rms_norm + quant_linear + add. Read when a model
# is quantized or prepared.
# NOTE(tidal): measured on an H100 (bench/RESULTS.md, 2026-12-07, late): S2 (Llama-3-8B, batch 1) int8
# 4.15 ms per token fused against 4.29 unfused, FP8 3.93 against 4.32, but int4 3.50 against 3.17:
# for int4 the fused kernel's qkv, o_proj and down_proj at one row were 10-18% slower than
# quant_linear's tensor-core kernel (`bench/bench_quant_linear.py --skinny-only`), more than the
# fused norms and adds save.
SKINNY_DECODE: tuple[str, ...] = ("int8", "fp8")
INT8_MAX = 127.0
INT4_MAX = 15


class QuantLinear(nn.Module):
    """``y = x @ w.T (+ bias)`` with ``w`` [out_features, in_features] stored as ``format`` codes.

    Buffers (tidal.ops.quant's layouts): ``qweight`` (int8 [n, k], uint8 [n, k / 2] for int4, FP8
    bits as uint8 [n, k]); ``scales`` float32 [n, num_groups]; ``zeros`` uint8 [n, num_groups] (int4);
    ``input_scale`` float32 [1] (FP8 with a static activation scale). ``bias`` stays in ``dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 dtype: torch.dtype, device):
        super().__init__()
        group = config.group_size or in_features
        if in_features % group:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group}")
        if config.format == "int4" and group % 2:
            raise ValueError(f"int4 needs an even group_size, got {group}")
        self.in_features, self.out_features, self.format = in_features, out_features, config.format
        num_groups = in_features // group
        code_dtype = torch.int8 if config.format == "int8" else torch.uint8
        codes = in_features // 2 if config.format == "int4" else in_features
        self.register_buffer("qweight", torch.zeros(out_features, codes, dtype=code_dtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, num_groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, num_groups, dtype=torch.uint8, device=device)
                             if config.format == "int4" else None)
        self.register_buffer("input_scale", torch.zeros(1, dtype=torch.float32, device=device)
                             if config.static_input_scale else None)
        # act-order (GPTQ desc_act): each input's group as the checkpoint gives it (-1 until loaded),
        # then, after finalize_act_order(), the permutation that gathers x into group-contiguous order
        self.register_buffer("g_idx", torch.full((in_features,), -1, dtype=torch.int64, device=device)
                             if config.act_order else None)
        self.register_buffer("input_perm", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The checkpoint-facing tensors of this layer, in tidal's layout."""
        names = ["qweight", "scales"]
        if self.zeros is not None:
            names.append("zeros")
        if self.input_scale is not None:
            names.append("input_scale")
        if self.g_idx is not None:
            names.append("g_idx")
        if self.bias is not None:
            names.append("bias")
        return tuple(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.format, self.input_scale)

    def quantizes_activations(self, x: torch.Tensor) -> bool:
        """Whether forward(x) quantizes x's rows to FP8 with dynamic per-token scales (FP8 without a
        static input scale, at more rows than the weight-only kernel takes)."""
        return (self.format == "fp8" and self.input_scale is None and self.input_perm is None
                and x.shape[0] > fp8_weight_only_rows(x, self.qweight, self.scales))

    def forward_fp8(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """forward() for activations the caller quantized: FP8 codes ``xq`` [m, k] and their fp32
        scales ``x_scale`` [m, 1]; the output in ``dtype``."""
        return fp8_matmul(xq, x_scale, self.qweight, self.scales, self.bias, dtype)

    def finalize_act_order(self) -> None:
        """Reorder the codes' columns so each group's inputs are a run (``g_idx`` sorted, stably) and
        keep that order in ``input_perm``, which forward() gathers x by."""
        if self.g_idx is None or self.input_perm is not None:
            return
        if bool((self.g_idx < 0).any()):
            raise ValueError("an act-order layer's g_idx was never loaded")
        perm = torch.argsort(self.g_idx, stable=True)
        self.qweight.copy_(pack_int4(unpack_int4(self.qweight)[:, perm]))
        self.input_perm = perm

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``w`` [out_features, in_features] as the codes say, in ``dtype`` (inputs in the model's order)."""
        w = dequantize_weight(self.qweight, self.scales, self.zeros, self.format, dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"num_groups={self.scales.shape[1]}, bias={self.bias is not None}")

    @property
    def group_size(self) -> int:
        """Inputs per scale (the whole row when there is one scale per row)."""
        return self.in_features // self.scales.shape[1]

    def slice_rows(self, spans: list[tuple[int, int]]) -> "QuantLinear":
        """A new layer of the output rows ``spans`` (concatenated): a column-parallel slice."""
        rows = torch.cat([torch.arange(a, b, device=self.qweight.device) for a, b in spans])
        bias = None if self.bias is None else self.bias.detach().index_select(0, rows)
        return self._with(self.in_features, self.qweight.index_select(0, rows), self.scales.index_select(0, rows),
                          None if self.zeros is None else self.zeros.index_select(0, rows), bias)

    def slice_inputs(self, start: int, stop: int) -> "QuantLinear":
        """A new layer of the inputs ``[start, stop)``, without the bias (a row-parallel slice, whose
        partial outputs are summed before the bias is added once). Raises ValueError naming what keeps
        the slice from cutting the codes, scales and zero points cleanly."""
        group = self.group_size
        if self.input_perm is not None or self.g_idx is not None:
            raise ValueError(f"a layer with act-order groups (g_idx) cannot be split by its inputs "
                             f"[{start}, {stop}): its groups are not runs of inputs in the checkpoint")
        one_group = self.scales.shape[1] == 1
        if not one_group and (start % group or stop % group):
            raise ValueError(f"inputs [{start}, {stop}) do not start and end on group_size={group} boundaries")
        if self.format == "int4" and (start % 2 or stop % 2):
            raise ValueError(f"int4 inputs [{start}, {stop}) must start and end on even inputs (two per byte)")
        per_byte = 2 if self.format == "int4" else 1
        qweight = self.qweight[:, start // per_byte: stop // per_byte]
        groups = slice(None) if one_group else slice(start // group, stop // group)
        return self._with(stop - start, qweight, self.scales[:, groups],
                          None if self.zeros is None else self.zeros[:, groups], None)

    def _with(self, in_features: int, qweight, scales, zeros, bias) -> "QuantLinear":
        """A layer of this one's format and activation scale holding these tensors (copied)."""
        layer = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.format = in_features, qweight.shape[0], self.format
        layer.register_buffer("qweight", qweight.contiguous().clone())
        layer.register_buffer("scales", scales.contiguous().clone())
        layer.register_buffer("zeros", None if zeros is None else zeros.contiguous().clone())
        layer.register_buffer("input_scale", None if self.input_scale is None else self.input_scale.clone())
        layer.register_buffer("g_idx", None if self.g_idx is None else self.g_idx.clone())
        layer.register_buffer("input_perm", None if self.input_perm is None else self.input_perm.clone())
        layer.bias = None if bias is None else nn.Parameter(bias.contiguous().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        """A QuantLinear holding ``linear``'s weight rounded to the nearest codes (no calibration)."""
        w = linear.weight.detach()
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, config, w.dtype, w.device)
        codes, scales, zeros = quantize_weight(w, config.format, config.group_size)
        layer.qweight.copy_(codes)
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[n, k] codes in 0..15 -> [n, k / 2] uint8, input 2c in the low nibble of byte c."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: [n, k / 2] uint8 -> [n, k] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def int4_scales_zeros(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 scales and zero points [n, num_groups] for ``w`` [n, k]: each group's range,
    widened to hold 0, split into 15 steps (GPTQ's and AWQ's rule)."""
    n, k = w.shape
    g = group_size or k
    groups = w.float().reshape(n, k // g, g)
    lo = groups.amin(dim=2).clamp(max=0.0)
    hi = groups.amax(dim=2).clamp(min=0.0)
    scales = ((hi - lo) / INT4_MAX).clamp(min=1e-10)
    zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    return scales, zeros.to(torch.uint8)


def quantize_int4(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[n, k] codes in 0..15 (uint8, unpacked) of ``w`` at the given scales and zero points."""
    n, k = w.shape
    g = k // scales.shape[1]
    q = torch.round(w.float().reshape(n, -1, g) / scales[..., None]) + zeros[..., None].float()
    return q.clamp(0, INT4_MAX).to(torch.uint8).reshape(n, k)


def quantize_weight(w: torch.Tensor, format: str, group_size: int | None = None):
    """``(codes, scales, zeros)`` of ``w`` [n, k] by rounding to nearest, in tidal.ops.quant's
    layouts: int8 and FP8 symmetric per output row (``max |w[j]|`` maps to 127 or 448), int4
    asymmetric per group of ``group_size`` inputs (default: the whole row). zeros is None but for int4."""
    w = w.detach()
    if format == "int4":
        scales, zeros = int4_scales_zeros(w, group_size)
        return pack_int4(quantize_int4(w, scales, zeros)), scales, zeros
    if group_size is not None:
        raise ValueError(f"group_size={group_size} applies to int4 only; {format} scales each output row")
    top = INT8_MAX if format == "int8" else FP8_MAX
    scales = (w.float().abs().amax(dim=1, keepdim=True) / top).clamp(min=1e-12)
    scaled = w.float() / scales
    if format == "int8":
        return torch.round(scaled).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales, None
    if format == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scales, None
    raise ValueError(f"format={format!r} must be 'int8', 'int4' or 'fp8'")


def _projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute name)`` of every dense linear layer of the decoder that is quantized."""
    found = []
    for layer in model.model.layers:  # a vision-language model's text half too (its vision tower stays)
        for parent in (layer.self_attn, layer.mlp):
            for name in QUANTIZED_PROJECTIONS:
                if isinstance(getattr(parent, name, None), (nn.Linear, QuantLinear)):
                    found.append((parent, name))
    return found


def _serve_quantized(model: nn.Module, config: QuantConfig) -> None:
    """The model's paths that read float weights directly, turned off: the fused norm/projection
    functions of the whole-sequence forward (which then calls each projection as a module), and,
    unless SKINNY_DECODE names the format, the fused few-row layer of serving (ops.skinny_linear,
    which takes quantized weights; never with act-order groups, whose inputs are gathered first)."""
    for layer in model.model.layers:
        layer.skinny_ok = layer.skinny_ok and config.format in SKINNY_DECODE and not config.act_order
    model.fuse_across_modules = False


def finalize_act_order_(model: nn.Module) -> nn.Module:
    """After a checkpoint's tensors are loaded: every act-order layer's codes reordered (see
    :meth:`QuantLinear.finalize_act_order`)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.finalize_act_order()
    return model


def prepare_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap every quantized projection of ``model`` for an empty QuantLinear of the same shape and
    device: what a pre-quantized checkpoint's tensors are then loaded into."""
    for parent, name in _projections(model):
        linear = getattr(parent, name)
        setattr(parent, name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, config,
                                          linear.weight.dtype, linear.weight.device))
    _serve_quantized(model, config)
    return model


def quantize_model_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Round every quantized projection of ``model`` (loaded in float) to ``config.format`` in place,
    one layer at a time (each float weight is freed as its codes are made)."""
    for parent, name in _projections(model):
        linear = getattr(parent, name)
        if isinstance(linear, nn.Linear):
            setattr(parent, name, QuantLinear.from_linear(linear, config))
    _serve_quantized(model, config)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()  # the float weights' memory goes back, so the KV cache can take it
    return model
