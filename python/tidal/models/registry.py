"""Architecture name (``config.json`` "architectures") -> the tidal model class that runs it."""

from torch import nn

from tidal.models.config import SUPPORTED_ARCHITECTURES
from tidal.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,  # mixture-of-experts layers by config (tidal.models.moe)
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
}
if set(_MODELS) != set(SUPPORTED_ARCHITECTURES):  # the two lists are edited together
    raise ImportError("tidal.models.registry and config.SUPPORTED_ARCHITECTURES disagree")


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for ``architecture``; ValueError naming it and the supported ones otherwise."""
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(_MODELS)}") from None


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)
