"""Building a model too big for one device: ``tidal.zero.Init``, as ``deepspeed.zero.Init``.

Inside ``with tidal.zero.Init():`` a model's parameters are created on the meta device (shapes only,
no memory); so are tidal's models loaded with :func:`tidal.models.load_model`, which then only
record where their checkpoint is. ``tidal.initialize(model, config)`` (ZeRO stage 3) materialises one
parameter or one module at a time, keeps this rank's slice of it in its shard (host memory under
``offload_param``) and lets the rest go, so no rank holds the whole model at any point of building
it. The values come from the checkpoint (each Hugging Face tensor read once, straight from its file),
else from the module's own initialisation (``initialize_module`` of tidal's models, else
``reset_parameters()``), with rank 0's values broadcast so every rank agrees.

Note: gradients are still accumulated in a full-size fp32 buffer on every rank (see
tidal.train.stage3), so training memory is not yet divided by the world size for them.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["Init", "is_active"]

_active = 0
_device: torch.device | None = None


class Init:
    """Context under which parameters are created on the meta device (see the module docstring).

    ``device``: where :func:`tidal.initialize` puts the shards (default: the current CUDA device
    when there is one, else the CPU; DeepSpeed's ``remote_device="cpu"`` is ``offload_param`` in the
    config here). ``config_dict_or_path`` and ``enabled`` are DeepSpeed's arguments: the config is
    read by ``tidal.initialize``; ``enabled=False`` makes the context a no-op."""

    def __init__(self, config_dict_or_path=None, enabled: bool = True, device: torch.device | str | None = None):
        self.enabled = enabled
        self.device = None if device is None else torch.device(device)
        self._meta = None

    def __enter__(self) -> "Init":
        global _active, _device
        if self.enabled:
            self._meta = torch.device("meta")
            self._meta.__enter__()
            _active += 1
            _device = self.device
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self._meta is not None:
            self._meta.__exit__(*exc)
            self._meta = None
            _active -= 1


def is_active() -> bool:
    """Whether a ``tidal.zero.Init`` context is open."""
    return _active > 0


def target_device() -> torch.device:
    """Where the shards of a model built under ``Init`` go."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Materializer:
    """Full fp32 values of a meta model's parameters, a module at a time, on the CPU."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.files = getattr(model, "_tidal_checkpoint_files", None)
        self.targets = {}
        if self.files is not None:
            self._index = self._tensor_files(self.files)
            tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
            for name, (view, lo, hi) in model._hf_targets().items():
                if name == "lm_head.weight" and tied:
                    continue
                base = view if view._base is None else view._base
                self.targets.setdefault(id(base), []).append((name, view, lo, hi))

    @staticmethod
    def _tensor_files(files: list[Path]) -> dict[str, Path]:
        from safetensors import safe_open

        index = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    index[name] = f
        return index

    def module_values(self, module: torch.nn.Module) -> dict[int, torch.Tensor]:
        """``{id(param): full fp32 CPU value}`` for the meta parameters ``module`` owns directly."""
        params = [p for p in module.parameters(recurse=False) if p.is_meta]
        if not params:
            return {}
        if self.files is not None:
            return {id(p): self._from_checkpoint(p) for p in params}
        return self._from_init(module, params)

    def _from_checkpoint(self, param: torch.nn.Parameter) -> torch.Tensor:
        from safetensors import safe_open

        full = torch.empty(param.shape, dtype=torch.float32)
        entries = self.targets.get(id(param))
        if not entries:
            raise ValueError(f"no checkpoint tensor fills a parameter of shape {tuple(param.shape)}")
        for name, view, lo, hi in entries:
            if name not in self._index:
                raise ValueError(f"tensor {name!r} is missing from the checkpoint")
            region = full.as_strided(view.shape, view.stride(), view.storage_offset() - param.storage_offset())
            dst = region if lo is None else region[lo:hi]
            with safe_open(str(self._index[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
        return full

    def _from_init(self, module: torch.nn.Module, params: list) -> dict[int, torch.Tensor]:
        init = getattr(self.model, "initialize_module", None)
        owned = {name: p for name, p in module.named_parameters(recurse=False) if p.is_meta}
        originals = dict(owned)
        for name, p in owned.items():
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32),
                                                     requires_grad=p.requires_grad))
        try:
            with torch.no_grad():
                if init is not None:
                    init(module)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    raise ValueError(f"{type(module).__name__} has meta parameters and no reset_parameters(): build it "
                                     "outside tidal.zero.Init or load its weights from a checkpoint")
            values = {id(originals[name]): getattr(module, name).detach().clone() for name in owned}
        finally:
            for name, p in originals.items():
                setattr(module, name, p)
        return values
