"""tidal's kernels as torch ops.

Every kernel is registered once in the ``tidal`` namespace of ``torch.library`` (so it appears as
``torch.ops.tidal.<name>``, works under ``torch.compile`` through its fake implementation, and is
captured by CUDA graphs), and exposed here as a plain function.
"""

from tidal.ops.norm import fused_add_rms_norm, fused_add_rms_norm_, rms_norm

__all__ = ["fused_add_rms_norm", "fused_add_rms_norm_", "rms_norm"]
