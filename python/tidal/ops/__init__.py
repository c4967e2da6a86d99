"""tidal's kernels as torch ops.

Every kernel is registered once in the ``tidal`` namespace of ``torch.library`` (so it appears as
``torch.ops.tidal.<name>``, works under ``torch.compile`` through its fake implementation, and is
captured by CUDA graphs), and exposed here as a plain function.
"""

from tidal.ops.activation import silu_and_mul, silu_and_mul_backward
from tidal.ops.attention import paged_attention
from tidal.ops.kv_cache import reshape_and_cache_
from tidal.ops.linear import skinny_linear
from tidal.ops.loss import softmax_cross_entropy_
from tidal.ops.moe import fused_moe
from tidal.ops.norm import fused_add_rms_norm, fused_add_rms_norm_, rms_norm
from tidal.ops.optim import adam_step_
from tidal.ops.quant import dequantize_weight, quant_linear
from tidal.ops.rotary import rotary_embedding, rotary_embedding_, rotary_embedding_and_cache_
from tidal.ops.sampling import seeded_exponential_

__all__ = ["adam_step_", "dequantize_weight", "fused_add_rms_norm", "fused_add_rms_norm_", "fused_moe", "paged_attention", "quant_linear", "reshape_and_cache_",
           "rms_norm", "rotary_embedding", "rotary_embedding_", "rotary_embedding_and_cache_", "seeded_exponential_", "silu_and_mul", "silu_and_mul_backward", "skinny_linear",
           "softmax_cross_entropy_"]
