"""Architecture name (``config.json`` "architectures") -> the tidal model class that runs it."""

from torch import nn

from tidal.models.config import MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from tidal.models.llama import LlamaForCausalLM
from tidal.models.vlm import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,  # mixture-of-experts layers by config (tidal.models.moe)
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}
if set(_MODELS) != set(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES):  # the two lists are edited together
    raise ImportError("tidal.models.registry and config's architecture lists disagree")


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class for ``architecture`` (a ModelConfig's ``multimodal_architecture or architecture``);
    ValueError naming it and the supported ones otherwise."""
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(_MODELS)}") from None


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)
