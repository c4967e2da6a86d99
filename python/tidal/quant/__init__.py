"""Quantized serving: int8 and int4 weights with float activations, FP8 weights and activations,
the published GPTQ, AWQ and compressed-tensors checkpoints, and the calibration that makes them.

``tidal.LLM(model, quantization="int8" | "int4" | "fp8")`` rounds a float checkpoint's decoder
weights as they load; a checkpoint with a ``quantization_config`` is read in its own layout.
"""

from tidal.quant.config import QUANTIZATION_CHOICES, QuantConfig, resolve
from tidal.quant.formats import quantization_config, read_tensors, save_quantized_model, write_tensors
from tidal.quant.linear import QuantLinear, finalize_act_order_, prepare_model, quantize_model_, quantize_weight

__all__ = ["QUANTIZATION_CHOICES", "QuantConfig", "QuantLinear", "finalize_act_order_", "prepare_model",
           "quantization_config",
           "quantize_model_", "quantize_weight", "read_tensors", "resolve", "save_quantized_model", "write_tensors"]
