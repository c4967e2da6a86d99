"""Load a Hugging Face model directory (config.json + safetensors) into a tidal model, and save one back.

Tensors are read lazily, one shard and one tensor at a time (``safetensors.safe_open``), and copied
straight into the model's (fused) parameters in the requested dtype and device, so peak extra memory
is one tensor, not one checkpoint.
"""

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidal.models.config import ModelConfig
from tidal.models.registry import get_model_class

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROGRESS_MIN_BYTES = 1 << 30  # NOTE(models): below ~1 GB loading takes seconds; a bar is noise


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """``"auto"`` -> the config's dtype (float32 when it has none); a name or torch.dtype -> itself."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype={dtype} is not supported; expected float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return config.dtype or torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected 'auto', 'float32', 'bfloat16', "
                         f"'float16' or a torch.dtype")
    return _DTYPE_NAMES[dtype]


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names, in name order. FileNotFoundError naming what is missing."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{str(index)!r} is not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {str(file)!r} named by {str(index)!r} does not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r} "
                            f"(only safetensors checkpoints are supported)")


def iter_safetensors(files: list[Path], progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from each file in turn, each tensor read only when reached.

    ``progress=None`` shows a tqdm bar when the files exceed 1 GB, stderr is a terminal and tqdm is
    installed; True/False force it on/off (still needs tqdm).
    """
    if progress is None:
        progress = sum(f.stat().st_size for f in files) > _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                       desc="Loading weights", file=sys.stderr)
    try:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    if bar is not None:
                        bar.update(tensor.numel() * tensor.element_size())
    finally:
        if bar is not None:
            bar.close()


def load_model(path: str | Path, dtype: str | torch.dtype = "auto",
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model a Hugging Face directory describes and load its weights.

    Parameters
    ----------
    path : str or Path
        Directory with ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json``
        and its shards).
    dtype : "auto", "float32", "bfloat16", "float16" or torch.dtype
        Parameter dtype; "auto" takes the config's ``dtype`` / ``torch_dtype`` (float32 if absent).
    device : torch.device or str
        Where the parameters go.

    Returns
    -------
    (model, config)
        The model in eval mode, and its :class:`ModelConfig`. Under ``tidal.zero.Init`` the
        parameters are on the meta device and the weights are read by ``tidal.initialize``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    config = ModelConfig.from_pretrained(path)
    files = safetensors_files(path)
    from tidal import zero

    if zero.is_active():  # shapes only: tidal.initialize reads each tensor into the shards
        model = get_model_class(config.multimodal_architecture or config.architecture)(config, dtype=resolve_dtype(dtype, config), device="meta")
        model._tidal_checkpoint_files = files
        return model.eval(), config
    model = get_model_class(config.multimodal_architecture or config.architecture)(config, dtype=resolve_dtype(dtype, config), device=device)
    model.load_weights(iter_safetensors(files))
    return model.eval(), config


def save_model(model: torch.nn.Module, path: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write ``model`` as a Hugging Face directory: config.json (the model's ``config.hf_config``,
    with ``dtype`` set to the model's) and safetensors in Hugging Face's unfused names, one
    ``model.safetensors`` or, past ``max_shard_bytes``, shards plus ``model.safetensors.index.json``.
    ``transformers``' ``from_pretrained`` and :func:`load_model` both read the result."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in model.hf_state_dict():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().to("cpu", copy=True).contiguous()  # safetensors refuses shared storage
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype_name = {v: k for k, v in _DTYPE_NAMES.items()}[model.dtype]
    raw = {**model.config.hf_config, "dtype": dtype_name}
    raw.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
