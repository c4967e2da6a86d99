"""tidal: one runtime for training and serving large language models.

The native core (``libtidal_core``) holds the KV cache, the scheduler and the kernels; this package
registers its kernels as ``torch.library`` ops (namespace ``tidal``) and exposes the public API.
"""

__version__ = "0.1.0"

import os as _os

# NOTE(tidal): torch is imported before the native module: with torch 2.11 (CUDA 13), loading a
# pybind11 module first and torch second crashed the interpreter; torch first is safe everywhere.
import torch as _torch  # noqa: F401

from tidal import _core
from tidal._core import CudaError, Error, OutOfMemoryError

#: Directory to put on ``CMAKE_PREFIX_PATH`` so that ``find_package(tidal CONFIG)`` finds
#: ``libtidal_core`` and its headers (``tidal::tidal_core``) inside this installed package.
cmake_prefix_path = _os.path.join(_os.path.dirname(_core.__file__), "lib", "cmake")


def build_info() -> dict:
    """What this build of tidal contains.

    Returns
    -------
    dict
        ``version``, ``cuda`` (CUDA kernels compiled in), ``cuda_archs``, ``cuda_version``,
        ``cuda_compiler``, ``hip`` (HIP kernels usable at run time), ``hip_checked_archs``
        (archs the HIP compile check passed for), ``compiler``, ``build_type``, and
        ``torch`` / ``torch_cuda_available`` from the torch this process imported.
    """
    info = dict(_core.build_info())
    info["torch"] = _torch.__version__
    info["torch_cuda_available"] = bool(_torch.cuda.is_available())
    return info


from tidal import ops  # noqa: E402  (registers the torch ops; needs torch)

_LAZY = {
    "LLM": "tidal.serve",
    "SamplingParams": "tidal.serve",
    "RequestOutput": "tidal.serve",
    "CompletionOutput": "tidal.serve",
    "initialize": "tidal.train.engine",
    "checkpoint": "tidal.checkpoint",  # a module: tidal.checkpoint.to_hf
    "checkpointing": "tidal.checkpointing",  # a module: activation checkpointing (deepspeed.checkpointing)
    "zero": "tidal.zero",  # a module: tidal.zero.Init (deepspeed.zero.Init)
}


def __getattr__(name: str):
    # The serving and training APIs import on first use, so `import tidal` stays light.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tidal' has no attribute {name!r}")
    import importlib

    imported = importlib.import_module(module)
    return imported if module == f"tidal.{name}" else getattr(imported, name)


__all__ = [*_LAZY, "CudaError", "Error", "OutOfMemoryError", "build_info", "cmake_prefix_path", "ops", "__version__"]
