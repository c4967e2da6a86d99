"""The typed view of a Hugging Face ``config.json`` that tidal's model definitions read.

``ModelConfig.from_pretrained(path)`` parses the file once, fills in the defaults transformers' own
config classes use for keys a checkpoint leaves out, and rejects what tidal cannot run (an unknown
architecture, an activation other than SiLU, a RoPE variant it does not implement) with an error that
names the value.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Architectures (``config.json`` "architectures") the Llama-family definition runs; the last three
#: replace some or all MLPs by mixture-of-experts blocks (tidal.models.moe).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
#: Vision-language architectures: an image encoder in front of one of the language models above
#: (LLaVA: a Llama-family model; Qwen2.5-VL: Qwen2 with multimodal rotary positions).
MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

# Used only when a config has no "architectures" entry (e.g. written by PretrainedConfig.save_pretrained).
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                               "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                               "qwen3_moe": "Qwen3MoeForCausalLM", "llava": "LlavaForConditionalGeneration",
                               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                               "qwen2_5_vl_text": "Qwen2ForCausalLM"}

#: RoPE variants implemented by tidal.models.rope ("default" is stored as ``rope_scaling=None``).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}

# NOTE(models): defaults of transformers' config classes for keys a config.json may omit, so a
# sparse config means here what it means there (Qwen3's head_dim defaults to 128, not hidden/heads).
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32,
                          "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768, "MixtralForCausalLM": 4096 * 32,
                          "Qwen2MoeForCausalLM": 32768, "Qwen3MoeForCausalLM": 32768}

# NOTE(models): bounds checked before anything is built, so a corrupt config.json is an error rather
# than a model of 2**40 columns: sizes fit int32 (the kernels' indices), the deepest released models
# have ~130 layers, and the rotary table (max_position_embeddings x head_dim fp32, built on the CPU
# even for a meta model) stays under 8 GB, which a 10M-token context of head_dim 128 still fits.
_MAX_SIZE = 1 << 31
_MAX_LAYERS = 1024
_MAX_ROPE_TABLE = 1 << 31


@dataclass(frozen=True)
class ModelConfig:
    """What a Llama-family model needs from its ``config.json``.

    Attributes
    ----------
    architecture : str
        One of :data:`SUPPORTED_ARCHITECTURES`.
    head_dim : int
        Per-head size: the explicit ``head_dim`` when the config has one, else
        ``hidden_size // num_attention_heads`` (128 for Qwen3, as transformers).
    rope_theta : float
        The RoPE base.
    rope_scaling : dict or None
        None for plain RoPE; else the scaling parameters with a normalised ``"rope_type"`` key
        (``linear``: factor; ``dynamic``: factor; ``llama3``: factor, low_freq_factor,
        high_freq_factor, original_max_position_embeddings).
    attention_bias : bool
        q/k/v projections have a bias (Llama's flag; always true for Qwen2).
    o_proj_bias : bool
        The output projection has a bias (Llama and Qwen3 with ``attention_bias``; never Qwen2).
    qk_norm : bool
        Per-head RMSNorm of q and k before RoPE (Qwen3).
    sliding_window : int or None
        Attention window in tokens, counting the query itself (a query at position ``p`` sees keys
        ``p - sliding_window + 1 .. p``); None when no layer uses one.
    sliding_window_layers : tuple of bool
        Per layer, whether it uses ``sliding_window`` (Qwen2/Qwen3 use it only from
        ``max_window_layers`` on; Mistral on every layer).
    dtype : torch.dtype or None
        The checkpoint's dtype ("dtype" or "torch_dtype"), None when the config has none.
    eos_token_ids : tuple of int
        Every end-of-sequence id (configs may hold one id or a list).
    num_experts : int
        Routed experts of a mixture-of-experts block; 0 for a dense model.
    num_experts_per_tok : int
        Experts each token is routed to (top-k).
    moe_intermediate_size : int
        Each routed expert's MLP width (Mixtral: ``intermediate_size``).
    shared_expert_intermediate_size : int
        Width of Qwen2-MoE's always-on shared expert (gated by a sigmoid); 0 for none.
    norm_topk_prob : bool
        Renormalise the top-k routing probabilities to sum to 1 (always for Mixtral).
    routing_weights_fp32 : bool
        The routing weights multiply the experts' outputs in fp32 (Mixtral) rather than rounded to
        the model's dtype (Qwen).
    moe_layers : tuple of bool
        Per layer, whether its MLP is a mixture-of-experts block (Qwen's ``decoder_sparse_step`` and
        ``mlp_only_layers``; every layer of Mixtral).
    router_aux_loss_coef : float
        The load-balancing loss coefficient of the config (training).
    multimodal_architecture : str or None
        For a vision-language checkpoint, its architecture (one of
        :data:`MULTIMODAL_ARCHITECTURES`); every other field then describes its language model,
        whose family ``architecture`` names.
    mrope_section : tuple of int or None
        Multimodal rotary positions (Qwen2.5-VL): how many of the ``head_dim // 2`` rotary
        frequencies take the temporal, height and width position; None for plain RoPE.
    hf_config : dict
        The parsed config.json, unchanged, for saving a model back in Hugging Face format.
    """

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    sliding_window_layers: tuple[bool, ...]
    hidden_act: str
    dtype: torch.dtype | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    routing_weights_fp32: bool = False
    moe_layers: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.0
    multimodal_architecture: str | None = None
    mrope_section: tuple[int, ...] | None = None
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read ``<path>/config.json`` (or ``path`` itself when it is a file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {str(path)!r}")
        return cls.from_dict(read_json(file), source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from an already parsed config.json; ``source`` names it in error messages, which are
        all ValueErrors (a value of the wrong JSON type included)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls._from_dict(raw, source)
        except (TypeError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
            # NOTE(models): the checks below name the common cases; this catches a wrong JSON type
            # deeper in (a list where the RoPE parameters' object belongs, ...)
            raise ValueError(f"{source}: malformed value ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], source: str) -> "ModelConfig":
        arch = _architecture(raw, source)
        if arch in MULTIMODAL_ARCHITECTURES:
            return _multimodal(cls, raw, arch, source)

        def need(key: str, maximum: int = _MAX_SIZE) -> int:
            if raw.get(key) is None:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return _int(raw[key], key, source, maximum=maximum)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        num_layers = need("num_hidden_layers", maximum=_MAX_LAYERS)
        head_dim = raw.get("head_dim")
        if head_dim is None:
            head_dim = 128 if arch == "Qwen3ForCausalLM" else hidden // heads
        head_dim = _int(head_dim, "head_dim", source)
        kv_heads = raw.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else _int(kv_heads, "num_key_value_heads", source)
        if heads % kv_heads != 0:
            raise ValueError(f"{source}: num_attention_heads={heads} must be a multiple of "
                             f"num_key_value_heads={kv_heads}")

        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' ACT2FN maps both names to SiLU
            raise ValueError(f"{source}: hidden_act={act!r} is not supported; only 'silu' is")

        attention_bias = bool(raw.get("attention_bias", False))
        o_proj_bias = attention_bias
        if arch == "Qwen2ForCausalLM":
            attention_bias, o_proj_bias = True, False
        elif arch == "Qwen2MoeForCausalLM":
            attention_bias, o_proj_bias = bool(raw.get("qkv_bias", True)), False
        elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
            attention_bias = o_proj_bias = False

        sliding_window, window_layers = _sliding_window(raw, arch, num_layers, source)
        rope_theta, rope_scaling, mrope_section = _rope(raw, source)
        if mrope_section is not None and sum(mrope_section) != head_dim // 2:
            raise ValueError(f"{source}: mrope_section={list(mrope_section)} must sum to head_dim // 2 = "
                             f"{head_dim // 2}")
        max_pos = _int(raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch], "max_position_embeddings",
                       source)
        if max_pos * head_dim > _MAX_ROPE_TABLE:
            raise ValueError(f"{source}: max_position_embeddings={max_pos} x head_dim={head_dim} is past the "
                             f"{_MAX_ROPE_TABLE} entries a rotary table may have")
        if rope_scaling is not None and rope_scaling["rope_type"] == "llama3":
            rope_scaling.setdefault("original_max_position_embeddings", max_pos)

        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(_int(i, "eos_token_id", source, minimum=0)
                                               for i in (eos if isinstance(eos, list) else [eos]))
        bos = raw.get("bos_token_id")
        bos = None if bos is None else _int(bos, "bos_token_id", source, minimum=0)
        moe = _moe(raw, arch, num_layers, source)
        return cls(
            architecture=arch, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            rms_norm_eps=_float(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", source), rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias, o_proj_bias=o_proj_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), sliding_window=sliding_window,
            sliding_window_layers=window_layers, hidden_act="silu", dtype=_dtype(raw, source),
            bos_token_id=bos, eos_token_ids=eos_ids, **moe, mrope_section=mrope_section,
            hf_config=raw)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a mixture-of-experts block."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` in tokens, or None for full attention."""
        return self.sliding_window if self.sliding_window_layers[layer] else None


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"{source}: architectures={archs!r} must be a list of class names")
    if not archs and isinstance(raw.get("model_type"), str) and raw["model_type"] in _ARCHITECTURE_OF_MODEL_TYPE:
        archs = [_ARCHITECTURE_OF_MODEL_TYPE[raw["model_type"]]]
    for arch in archs:
        if isinstance(arch, str) and (arch in SUPPORTED_ARCHITECTURES or arch in MULTIMODAL_ARCHITECTURES):
            return arch
    named = archs[0] if archs else f"model_type={raw.get('model_type')!r}"
    raise ValueError(f"{source}: architecture {named!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)}")


def _multimodal(cls, raw: dict, arch: str, source: str) -> "ModelConfig":
    """A vision-language config: its language model's ModelConfig, marked with ``arch``, keeping the
    whole config.json as ``hf_config``. Its text part is ``text_config`` (or, in Qwen2.5-VL's older
    layout, the top-level keys)."""
    if not isinstance(raw.get("vision_config"), dict):
        raise ValueError(f"{source}: a {arch} config needs a 'vision_config' object")
    if not isinstance(raw.get("text_config") or {}, dict):
        raise ValueError(f"{source}: text_config must be an object")
    if arch == "LlavaForConditionalGeneration":
        text = dict(raw.get("text_config") or {"model_type": "llama"})
        if "architectures" not in text:
            model_type = text.get("model_type", "llama")
            if model_type not in _ARCHITECTURE_OF_MODEL_TYPE or \
                    _ARCHITECTURE_OF_MODEL_TYPE[model_type] in MULTIMODAL_ARCHITECTURES + MOE_ARCHITECTURES:
                raise ValueError(f"{source}: text_config model_type={model_type!r} is not a supported LLaVA "
                                 f"language model")
            text["architectures"] = [_ARCHITECTURE_OF_MODEL_TYPE[model_type]]
        for key in ("vocab_size", "tie_word_embeddings"):  # some configs keep these at the top level
            if key in raw and key not in text:
                text[key] = raw[key]
    else:  # Qwen2.5-VL: Qwen2 with multimodal rotary positions
        text = {k: v for k, v in raw.items() if k not in ("vision_config", "text_config", "architectures")}
        text.update(raw.get("text_config") or {})
        text["architectures"] = ["Qwen2ForCausalLM"]
        text.setdefault("max_position_embeddings", 128000)
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        if text.get("rope_parameters") is None and text.get("rope_scaling") is None:
            raise ValueError(f"{source}: a Qwen2.5-VL config needs rope_scaling (or rope_parameters) with "
                             f"'mrope_section'")
    text.setdefault("dtype", raw.get("dtype", raw.get("torch_dtype")))
    config = cls.from_dict(text, source=f"{source} (text_config)")
    if arch == "Qwen2_5_VLForConditionalGeneration" and config.mrope_section is None:
        raise ValueError(f"{source}: a Qwen2.5-VL config needs 'mrope_section' in its RoPE parameters")
    from dataclasses import replace

    return replace(config, multimodal_architecture=arch, hf_config=raw)


def _moe(raw: dict, arch: str, num_layers: int, source: str) -> dict:
    """The mixture-of-experts fields of ModelConfig (all zero / empty for dense architectures)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    num_experts = raw.get("num_local_experts") if arch == "MixtralForCausalLM" else raw.get("num_experts")
    num_experts = raw.get("num_experts", raw.get("num_local_experts")) if num_experts is None else num_experts
    top_k = raw.get("num_experts_per_tok")
    if num_experts is None or top_k is None:
        raise ValueError(f"{source}: a {arch} config needs num_experts (or num_local_experts) and num_experts_per_tok")
    num_experts, top_k = _int(num_experts, "num_experts", source), _int(top_k, "num_experts_per_tok", source)
    if top_k > num_experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
    if arch == "MixtralForCausalLM":
        inter = _int(raw["intermediate_size"], "intermediate_size", source)
        layers, shared, norm, fp32 = (True,) * num_layers, 0, True, True
    else:
        if raw.get("moe_intermediate_size") is None:
            raise ValueError(f"{source}: required key 'moe_intermediate_size' is missing")
        inter = _int(raw["moe_intermediate_size"], "moe_intermediate_size", source)
        step = _int(raw.get("decoder_sparse_step", 1), "decoder_sparse_step", source)
        dense = set(raw.get("mlp_only_layers") or [])
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        shared = raw.get("shared_expert_intermediate_size") or 0 if arch == "Qwen2MoeForCausalLM" else 0
        shared = _int(shared, "shared_expert_intermediate_size", source, minimum=0)
        norm, fp32 = bool(raw.get("norm_topk_prob", False)), False
    if raw.get("router_jitter_noise"):
        raise ValueError(f"{source}: router_jitter_noise={raw['router_jitter_noise']} is not supported")
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                shared_expert_intermediate_size=shared, norm_topk_prob=norm, routing_weights_fp32=fp32,
                moe_layers=layers, router_aux_loss_coef=_float(raw.get("router_aux_loss_coef", 0.0) or 0.0,
                                                                "router_aux_loss_coef", source))


def _dtype(raw: dict, source: str) -> torch.dtype | None:
    name = raw.get("dtype", raw.get("torch_dtype"))
    if name is None:
        return None
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"{source}: dtype={name!r} is not supported; expected one of float32, float16, bfloat16")
    return _DTYPES[name]


def _sliding_window(raw: dict, arch: str, num_layers: int, source: str) -> tuple[int | None, tuple[bool, ...]]:
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") and \
            not raw.get("use_sliding_window", False):
        window = None
    if arch == "LlamaForCausalLM" or window is None:
        return None, (False,) * num_layers
    window = _int(window, "sliding_window", source)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return window, (True,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first = _int(raw.get("max_window_layers", 28), "max_window_layers", source, minimum=0)
        layers = tuple(i >= first for i in range(num_layers))
    else:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ValueError(f"{source}: layer_types must be a list of one entry per layer ({num_layers})")
        layers = tuple(t == "sliding_attention" for t in layer_types)
    return (window if any(layers) else None), layers


def _rope(raw: dict, source: str) -> tuple[float, dict | None, tuple[int, ...] | None]:
    """(rope_theta, rope_scaling, mrope_section) from any of the three layouts: transformers 5's
    ``rope_parameters`` (theta inside, ``rope_type``), or legacy top-level ``rope_theta`` plus
    ``rope_scaling`` with ``rope_type`` or ``type``. Qwen2.5-VL's ``"mrope"`` type (or an
    ``mrope_section`` key) is plain RoPE over three position components."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: the RoPE parameters must be an object, got {params!r}")
    params = dict(params)
    theta = _float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)), "rope_theta", source, positive=True)
    mrope = params.pop("mrope_section", None)
    if mrope is not None and not isinstance(mrope, list):
        raise ValueError(f"{source}: mrope_section={mrope!r} must be a list of integers")
    mrope = None if mrope is None else tuple(_int(s, "mrope_section", source, minimum=0) for s in mrope)
    params.pop("mrope_interleaved", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "mrope":
        if mrope is None:
            raise ValueError(f"{source}: rope type 'mrope' needs 'mrope_section'")
        rope_type = "default"
    params.pop("type", None)
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_type={rope_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return theta, None, mrope
    if mrope is not None:
        raise ValueError(f"{source}: mrope_section with rope_type={rope_type!r} is not supported")
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    for key in required:
        if params.get(key) is None:
            raise ValueError(f"{source}: rope_type={rope_type!r} needs {key!r} in its RoPE parameters")
        params[key] = _float(params[key], key, source, positive=True)
    if "original_max_position_embeddings" in params:
        params["original_max_position_embeddings"] = _int(params["original_max_position_embeddings"],
                                                          "original_max_position_embeddings", source)
    params["rope_type"] = rope_type
    return theta, params, mrope


def read_json(file: Path) -> Any:
    """The parsed JSON ``file``; FileNotFoundError or ValueError naming it (not UTF-8 text, invalid
    JSON, nested past the parser's recursion limit, an integer literal past Python's 4300 digits)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(file)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{str(file)!r} cannot be read: {e}") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{str(file)!r} is not valid JSON: {str(e)[:200]}") from None


def _int(value: Any, key: str, source: str, minimum: int = 1, maximum: int = _MAX_SIZE) -> int:
    """``value`` (an int, or a float holding one: some configs write 4096.0) in [minimum, maximum)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < maximum:
        raise ValueError(f"{source}: {key}={value!r} must be an integer in [{minimum}, {maximum})")
    return value


def _float(value: Any, key: str, source: str, positive: bool = False) -> float:
    """``value`` as a finite float (positive where asked)."""
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if not isinstance(value, int) or abs(value) < 1 << 1000 else math.inf
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{source}: {key}={value!r} must be a {'positive' if positive else 'finite'} number")
    return number
