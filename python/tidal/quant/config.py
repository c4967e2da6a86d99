"""Which quantization a model is served with: the user's ``quantization=`` argument, a checkpoint's
``quantization_config``, or both (then they must agree).

:class:`QuantConfig` says how the decoder layers' linear layers store their weights (the formats of
:mod:`tidal.ops.quant`) and where the codes come from: rounded from the checkpoint's float weights
as they load (``source="rtn"``), or read from a published quantized layout (``"gptq"``, ``"awq"``,
``"compressed-tensors"``; :mod:`tidal.quant.formats` converts them).
"""

from dataclasses import dataclass

#: What ``quantization=`` accepts: a weight format (quantized from a float checkpoint as it loads, or
#: matching a quantized checkpoint), or a published method naming a quantized checkpoint's layout.
QUANTIZATION_CHOICES = ("int8", "int4", "fp8", "gptq", "awq", "compressed-tensors")
DEFAULT_INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantConfig:
    """How the dense linear layers of the decoder are stored.

    format : "int8", "int4" or "fp8"
        The weight codes (tidal.ops.quant's formats).
    group_size : int or None
        Inputs per scale (and zero point); None: one scale per output row.
    source : "rtn", "gptq", "awq" or "compressed-tensors"
        Where the codes come from (see the module docstring).
    static_input_scale : bool
        FP8 only: the checkpoint gives each layer a static activation scale (else per token).
    gptq_zero_offset : int
        GPTQ only: what the stored zero points lack (1 in the original ``gptq`` layout, 0 in ``gptq_v2``).
    act_order : bool
        GPTQ's ``desc_act`` (compressed-tensors' ``actorder``): each layer's ``g_idx`` puts its inputs
        in groups out of order; tidal reorders the codes' columns at load so groups are runs again, and
        permutes ``x`` to match.
    zero_points : bool
        int4 only: the checkpoint stores zero points (else they are 8: symmetric codes).
    """

    format: str
    group_size: int | None = None
    source: str = "rtn"
    static_input_scale: bool = False
    gptq_zero_offset: int = 0
    act_order: bool = False
    zero_points: bool = True

    @property
    def is_prequantized(self) -> bool:
        return self.source != "rtn"


def resolve(quantization: str | None, hf_config: dict) -> QuantConfig | None:
    """The QuantConfig for ``quantization`` (the user's choice, or None) and the checkpoint's
    ``config.json`` contents; None when neither asks for one. ValueError naming the setting when the
    checkpoint's quantization is not supported, or the two disagree."""
    if quantization is not None and quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization={quantization!r} must be None or one of {QUANTIZATION_CHOICES}")
    raw = hf_config.get("quantization_config")
    if raw is None:
        if quantization is None:
            return None
        if quantization in ("gptq", "awq", "compressed-tensors"):
            raise ValueError(f"quantization={quantization!r} needs a checkpoint in that layout (its config.json has "
                             f"no quantization_config); make one with `tidal quantize MODEL --method "
                             f"{'int8' if quantization == 'compressed-tensors' else quantization}`, or pass "
                             f"'int8', 'int4' or 'fp8' to quantize this one as it loads")
        return QuantConfig(quantization, DEFAULT_INT4_GROUP_SIZE if quantization == "int4" else None)
    config = from_checkpoint(raw)
    if quantization is not None and quantization not in (config.format, config.source):
        raise ValueError(f"quantization={quantization!r} disagrees with the checkpoint, which is quantized with "
                         f"{config.source} ({config.format}); pass quantization=None or {config.source!r}")
    return config


def from_checkpoint(raw) -> QuantConfig:
    """Parse a Hugging Face ``quantization_config``; ValueError naming any setting tidal cannot serve."""
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method == "gptq":
        return _gptq(raw)
    if method == "awq":
        return _awq(raw)
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    raise ValueError(f"quantization_config.quant_method={method!r} is not supported; tidal reads 'gptq', 'awq' and "
                     f"'compressed-tensors' checkpoints")


def _bad(setting: str, value, why: str) -> ValueError:
    return ValueError(f"quantization_config.{setting}={value!r} is not supported: {why}")


def _group_size(raw: dict) -> int | None:
    group = raw.get("group_size", DEFAULT_INT4_GROUP_SIZE)
    if group == -1 or group is None:
        return None
    if not isinstance(group, int) or group < 2 or group % 2:
        raise _bad("group_size", group, "expected -1 or an even group of inputs")
    return group


def _gptq(raw: dict) -> QuantConfig:
    if raw.get("bits", 4) != 4:
        raise _bad("bits", raw.get("bits"), "tidal serves 4-bit GPTQ")
    fmt = raw.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _bad("checkpoint_format", fmt, "expected 'gptq' or 'gptq_v2'")
    act_order = bool(raw.get("desc_act", False))
    if act_order and _group_size(raw) is None:
        raise _bad("desc_act", raw.get("desc_act"), "act-order needs groups (group_size=-1 has one per row)")
    return QuantConfig("int4", _group_size(raw), "gptq", gptq_zero_offset=1 if fmt == "gptq" else 0,
                       act_order=act_order)


def _awq(raw: dict) -> QuantConfig:
    bits = raw.get("bits", raw.get("w_bit", 4))
    if bits != 4:
        raise _bad("bits", bits, "tidal serves 4-bit AWQ")
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise _bad("version", raw.get("version"), "tidal reads the 'gemm' layout")
    if not raw.get("zero_point", True):
        raise _bad("zero_point", raw.get("zero_point"), "tidal reads AWQ with zero points")
    return QuantConfig("int4", _group_size({"group_size": raw.get("group_size", raw.get("q_group_size", 128))}), "awq")


def _compressed_tensors(raw: dict) -> QuantConfig:
    fmt = raw.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized"):
        raise _bad("format", fmt, "tidal reads 'float-quantized', 'int-quantized', 'naive-quantized' (8-bit, "
                   "unpacked) and 'pack-quantized' (4-bit) compressed-tensors checkpoints")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _bad("config_groups", groups, "expected exactly one group")
    (name, group), = groups.items()
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise _bad(f"config_groups.{name}.targets", targets, "expected ['Linear']")
    ignore = raw.get("ignore") or []
    if any(entry not in ("lm_head", "re:.*lm_head") for entry in ignore):
        raise _bad("ignore", ignore, "only the LM head may stay unquantized")
    weights = group.get("weights") or {}
    kind, strategy = weights.get("type"), weights.get("strategy")
    if fmt == "pack-quantized":
        return _pack_quantized(name, weights, group.get("input_activations"))
    if weights.get("num_bits") != 8 or kind not in ("int", "float"):
        raise _bad(f"config_groups.{name}.weights", weights, "expected 8-bit 'int' or 'float' weights")
    if strategy not in ("channel", "tensor") or not weights.get("symmetric", True):
        raise _bad(f"config_groups.{name}.weights.strategy", strategy, "expected symmetric 'channel' or 'tensor'")
    acts = group.get("input_activations")
    if kind == "int":
        if acts is not None:
            raise _bad(f"config_groups.{name}.input_activations", acts, "int8 weights are served with float "
                       "activations (W8A16); int8 activations are not supported")
        return QuantConfig("int8", None, "compressed-tensors")
    if acts is None:
        raise _bad(f"config_groups.{name}.input_activations", acts, "FP8 weights need FP8 activations "
                   "(dynamic per token or a static per-tensor scale)")
    if acts.get("type", "float") != "float" or acts.get("num_bits") != 8:
        raise _bad(f"config_groups.{name}.input_activations", acts, "expected 8-bit float activations")
    if acts.get("dynamic", False):
        if acts.get("strategy") not in ("token", "tensor"):
            raise _bad(f"config_groups.{name}.input_activations.strategy", acts.get("strategy"),
                       "expected 'token' for dynamic activations")
        return QuantConfig("fp8", None, "compressed-tensors")
    if acts.get("strategy") != "tensor":
        raise _bad(f"config_groups.{name}.input_activations.strategy", acts.get("strategy"),
                   "static activation scales must be per tensor")
    return QuantConfig("fp8", None, "compressed-tensors", static_input_scale=True)


def _pack_quantized(name: str, weights: dict, acts) -> QuantConfig:
    """compressed-tensors' W4A16: int4 codes packed eight to an int32 along the inputs."""
    if weights.get("num_bits") != 4 or weights.get("type") != "int":
        raise _bad(f"config_groups.{name}.weights", weights, "tidal reads 4-bit 'int' pack-quantized weights")
    if acts is not None:
        raise _bad(f"config_groups.{name}.input_activations", acts, "int4 weights are served with float "
                   "activations (W4A16)")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise _bad(f"config_groups.{name}.weights.strategy", strategy, "expected 'group' or 'channel'")
    group = _group_size({"group_size": weights.get("group_size")}) if strategy == "group" else None
    if strategy == "group" and group is None:
        raise _bad(f"config_groups.{name}.weights.group_size", weights.get("group_size"), "a group strategy needs one")
    act_order = weights.get("actorder") not in (None, False, "static")
    if act_order and group is None:
        raise _bad(f"config_groups.{name}.weights.actorder", weights.get("actorder"), "act-order needs groups")
    return QuantConfig("int4", group, "compressed-tensors", act_order=act_order,
                       zero_points=not weights.get("symmetric", True))
