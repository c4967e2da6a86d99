"""Training checkpoints -> Hugging Face checkpoints: ``tidal.checkpoint.to_hf(checkpoint_dir, out_dir)``.

A checkpoint written by ``engine.save_checkpoint`` (see :mod:`tidal.train.checkpoint`) holds the fp32
master weights sharded across ranks, keyed by the trained module's parameter names, and, in its
index.json, the module's Hugging Face config (``"hf"``). :func:`to_hf` consolidates the shards (checking
every file's SHA-256) and writes a directory that ``transformers``' ``from_pretrained``,
:func:`tidal.models.load_model` and ``tidal.LLM`` read: config.json plus ``model.safetensors`` (or
shards and ``model.safetensors.index.json``) in Hugging Face's tensor names.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from tidal.models.config import ModelConfig
from tidal.models.loader import save_model
from tidal.models.registry import get_model_class
from tidal.train import checkpoint as _train_checkpoint

__all__ = ["to_hf"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KINDS = ("tidal", "transformers")


def to_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None,
          dtype: str | torch.dtype = "float32", max_shard_bytes: int = 2 << 30) -> str:
    """Write the weights of a training checkpoint as a Hugging Face model directory.

    Parameters
    ----------
    checkpoint_dir : str or PathLike
        The directory given to ``engine.save_checkpoint``.
    out_dir : str or PathLike
        Where to write config.json and the safetensors (created if needed; safetensors files of an
        earlier model there are replaced).
    tag : str or None
        The checkpoint's tag; None reads ``checkpoint_dir/latest``.
    dtype : "float32", "bfloat16", "float16" or torch.dtype
        The dtype of the written tensors (rounded once from the fp32 master weights); config.json's
        ``dtype`` says the same.
    max_shard_bytes : int
        Above this many bytes the weights go into ``model-0000k-of-0000n.safetensors`` files plus
        ``model.safetensors.index.json`` instead of one ``model.safetensors``.

    Returns
    -------
    str
        ``out_dir``.

    Raises
    ------
    ValueError
        The checkpoint records no Hugging Face config (its module was not tidal's model nor a
        transformers ``PreTrainedModel``), a shard is corrupt or truncated (naming the file), or its
        parameters do not match the model the config describes.
    FileNotFoundError
        The checkpoint, its index or a shard is missing (naming it).
    """
    target = _resolve_dtype(dtype)
    path = _train_checkpoint._resolve(str(checkpoint_dir), tag)
    source = _hf_source(path)
    # Consolidate the exact directory resolved above, even if `latest` moves meanwhile.
    _, full = _train_checkpoint.read_full_state(os.path.dirname(path), os.path.basename(path))
    weights = full["master"]
    del full  # the Adam moments are not needed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale_files = [out / "model.safetensors", out / "model.safetensors.index.json",
                   *out.glob("model-*-of-*.safetensors")]
    for stale in stale_files:
        if stale.is_file():  # a sharded leftover would shadow (or mix with) the new weights
            stale.unlink()
    hf_config = source["hf_config"]
    if source["kind"] == "tidal":
        model = _tidal_model(hf_config, weights, target, path)
    else:
        model = _NamedTensors(weights, hf_config, target)
    save_model(model, out, max_shard_bytes=max_shard_bytes)
    return str(out_dir)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; expected 'float32', 'bfloat16' or 'float16'")


def _hf_source(path: str) -> dict:
    """The checkpoint's ``"hf"`` record, checked before any shard is read."""
    source = _train_checkpoint.read_index(path).get("hf")
    if not isinstance(source, dict) or not isinstance(source.get("hf_config"), dict):
        raise ValueError(f"checkpoint {path} has no Hugging Face config (index.json's 'hf'): the module it was "
                         f"saved from was not a known model (tidal's Llama-family model or a transformers "
                         f"PreTrainedModel), so its parameters have no Hugging Face names to convert to")
    if not isinstance(source.get("kind"), str) or source["kind"] not in _KINDS:
        raise ValueError(f"checkpoint {path}: unknown model kind {source.get('kind')!r} in index.json; "
                         f"expected one of {', '.join(_KINDS)}")
    return source


def _tidal_model(hf_config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype, path: str):
    """tidal's model for ``hf_config`` holding ``weights`` (keyed by its own parameter names) in ``dtype``."""
    config = ModelConfig.from_dict(hf_config, source=f"{path}/index.json hf_config")
    model = get_model_class(config.multimodal_architecture or config.architecture)(config, dtype=dtype, device="cpu")
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding: listed once, saved once
    _check_names(set(params), set(weights), path)
    with torch.no_grad():
        for name, param in params.items():
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {tuple(weights[name].shape)}, "
                                 f"the model its config describes expects {tuple(param.shape)}")
            param.copy_(weights[name])
    return model


def _check_names(expected: set[str], saved: set[str], path: str) -> None:
    if expected != saved:
        raise ValueError(f"checkpoint {path}: its parameters differ from the model its config describes: "
                         f"missing {sorted(expected - saved)[:5]}, unexpected {sorted(saved - expected)[:5]} "
                         f"(frozen parameters are not saved in training checkpoints)")


class _NamedTensors:
    """Already Hugging Face-named weights (a transformers model's parameters) in the shape
    :func:`tidal.models.save_model` reads: ``hf_state_dict()``, ``config.hf_config`` and ``dtype``.
    A tied ``lm_head.weight`` is not among the parameters, as transformers' own save leaves it out:
    ``from_pretrained`` ties it to the embedding again."""

    def __init__(self, weights: dict[str, torch.Tensor], hf_config: dict, dtype: torch.dtype):
        self._weights = weights
        self.config = SimpleNamespace(hf_config=hf_config)
        self.dtype = dtype

    def hf_state_dict(self):
        for name, tensor in self._weights.items():
            yield name, tensor.to(self.dtype)
