"""Model definitions and the Hugging Face loader.

``load_model(path)`` reads a Hugging Face directory (config.json + safetensors) into the model class
its architecture maps to; every class serves (flat batch, paged KV cache, tidal ops) and trains
(batched, differentiable) with the same weights.
"""

from tidal.models.attention import AttentionMetadata
from tidal.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from tidal.models.llama import LlamaForCausalLM
from tidal.models.loader import load_model, save_model
from tidal.models.registry import get_model_class, supported_architectures
from tidal.models.rope import build_cos_sin_cache

__all__ = ["AttentionMetadata", "LlamaForCausalLM", "ModelConfig", "SUPPORTED_ARCHITECTURES",
           "build_cos_sin_cache", "get_model_class", "load_model", "save_model",
           "supported_architectures"]
