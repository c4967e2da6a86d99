"""The serving engine's options (vLLM's names) and the device they resolve to."""

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    """The engine options of ``tidal.LLM``.

    ``kv_cache_memory_fraction`` is vLLM's ``gpu_memory_utilization`` (accepted as an alias by
    ``tidal.LLM``): on a GPU, the share of the card that this engine's weights, activations and KV
    cache may take together (what other processes or engines hold is not charged to it, but the KV
    cache never takes more than is free); on the CPU, the share of available host memory the KV
    cache may take (capped at 4 GiB). ``enforce_eager`` turns CUDA graphs off. ``model`` is a
    Hugging Face directory, or a tidal model already built (served in place, its weights shared);
    ``tokenizer`` a directory with tokenizer.json (default: the model's directory; none for a model
    object, which then takes token ids only). ``encoder_cache_bytes`` bounds a vision-language
    model's cache of image and video embeddings (by content hash, least recently used out).
    ``kv_role`` ("prefill" or "decode") makes the engine one half of disaggregated serving
    (tidal.serve.disagg): KV blocks move between the two through ``kv_connector`` ("torch":
    torch.distributed point-to-point over Gloo, a prefill engine hosting its bootstrap store on
    ``kv_host:kv_port``, 0 picking a free port; "nixl": NIXL), and a transfer not done within
    ``kv_transfer_timeout`` seconds fails its request. ``quantization``, ``kv_cache_dtype`` and
    ``tensor_parallel_size``: as ``tidal.LLM`` says. ``async_scheduling`` plans each step while the
    device still computes the previous one (see ``tidal.LLM``); None turns it on where the engine runs
    on a GPU.
    """

    model: "str | torch.nn.Module"
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    scheduling_policy: str = "fcfs"
    enforce_eager: bool = False
    tokenizer: str | None = None
    encoder_cache_bytes: int = 1 << 30
    kv_role: str | None = None
    kv_connector: str = "torch"
    kv_host: str = "127.0.0.1"
    kv_port: int = 0
    kv_transfer_timeout: float = 30.0
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be an integer >= 1")
        if self.kv_cache_dtype == "fp8_e4m3":
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} must be 'auto' (the model's dtype) or 'fp8' "
                             f"(FP8 E4M3 codes, scale 1)")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} must be 'fcfs' or 'priority'")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks!r} must be None or an integer >= 1")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction!r} must be in (0, 1]")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len={self.max_model_len!r} must be None or an integer >= 2")
        if self.kv_role not in (None, "prefill", "decode"):
            raise ValueError(f"kv_role={self.kv_role!r} must be None, 'prefill' or 'decode'")
        if self.kv_connector not in ("torch", "nixl"):
            raise ValueError(f"kv_connector={self.kv_connector!r} must be 'torch' or 'nixl'")
        if not self.kv_transfer_timeout > 0:
            raise ValueError(f"kv_transfer_timeout={self.kv_transfer_timeout!r} must be > 0")
        if not isinstance(self.encoder_cache_bytes, int) or self.encoder_cache_bytes < 0:
            raise ValueError(f"encoder_cache_bytes={self.encoder_cache_bytes!r} must be an integer >= 0")
        from tidal.quant import QUANTIZATION_CHOICES

        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization={self.quantization!r} must be None or one of {QUANTIZATION_CHOICES}")
        if self.quantization is not None and isinstance(self.model, torch.nn.Module):
            raise ValueError(f"quantization={self.quantization!r} applies to a model loaded from a directory; a "
                             f"model object is served as it is (tidal.quant.quantize_model_ quantizes one in place)")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager={self.enforce_eager!r} must be a bool")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling={self.async_scheduling!r} must be None (on for a GPU) or a bool")


def gpu_available() -> bool:
    """A CUDA device torch can use, and a tidal build with CUDA kernels."""
    from tidal import build_info

    return torch.cuda.is_available() and bool(build_info()["cuda"])


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the current CUDA device when there is one (and tidal was built with CUDA), else the
    CPU; ``"cpu"`` and ``"cuda[:N]"`` are taken as given."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if gpu_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a valid device: {e}") from None
    if resolved.type == "cuda":
        if not gpu_available():
            raise ValueError(f"device={device!r} but there is no usable CUDA device (torch.cuda.is_available() is "
                             f"{torch.cuda.is_available()}, tidal built with CUDA: "
                             f"{__import__('tidal').build_info()['cuda']})")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but there are {torch.cuda.device_count()} CUDA devices")
    elif resolved.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; expected 'auto', 'cpu' or 'cuda[:N]'")
    return resolved
