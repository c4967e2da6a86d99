"""Activation checkpointing, as ``deepspeed.checkpointing`` offers it.

``checkpoint(function, *args)`` runs ``function`` without keeping its intermediate activations and
runs it again in the backward pass, from the inputs it kept, to get the gradients (the random number
generators are restored first, so dropout draws the same masks). ``configure(...)`` sets how, with
DeepSpeed's argument names; the training engine calls it from the config's ``activation_checkpointing``
section:

- ``cpu_checkpointing`` (``checkpoint_in_cpu``): the kept inputs of CUDA functions move to pinned host
  memory in the forward pass; in the backward pass, while one checkpoint is recomputed, the inputs of
  the one before it are copied back on a side stream, so the copy is ready when its turn comes;
- ``synchronize_checkpoint_boundary`` (``synchronize``): a device synchronisation at each checkpoint's
  forward and recompute;
- ``profile``: per-call timings of the forward passes and recomputes, and the bytes offloaded, in
  :func:`profile_stats` (with device synchronisation around each, as DeepSpeed's profile does);
- ``partition_activations``, ``contiguous_memory_optimization`` and ``number_checkpoints`` are
  accepted and change nothing: partitioning splits checkpoints across model-parallel ranks, which
  tidal's training does not have, and the contiguous buffer works around fragmentation that torch's
  caching allocator already avoids.

Models of tidal (the Llama family) also checkpoint per layer through
``model.set_activation_checkpointing(policy)``: ``"full"`` recomputes whole layers, ``"attention"``
only the attention half of each layer, ``"mlp"`` only the MLP half (selective checkpointing).
"""

import time
import weakref
from dataclasses import dataclass

import torch

__all__ = ["checkpoint", "configure", "is_configured", "reset", "profile_stats"]


@dataclass
class _Settings:
    configured: bool = False
    cpu_checkpointing: bool = False
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize: bool = False
    profile: bool = False


@dataclass
class _Profile:
    forward_calls: int = 0
    forward_seconds: float = 0.0
    recompute_calls: int = 0
    recompute_seconds: float = 0.0
    offloaded_bytes: int = 0
    prefetched: int = 0  # recomputes whose inputs were already on their way back when needed


_settings = _Settings()
_profile = _Profile()
_offloaded: list = []  # weak references to the _Offloaded inputs of the live checkpoints, forward order
_side_streams: dict = {}


def configure(mpu_=None, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None) -> None:
    """Sets how :func:`checkpoint` works (DeepSpeed's signature). ``deepspeed_config`` (a dict, or the
    ``activation_checkpointing`` section's keys) supplies what the keyword arguments leave None."""
    if mpu_ is not None:
        raise ValueError("mpu_: tidal's training has no model parallelism to partition checkpoints over")
    section = {}
    if deepspeed_config is not None:
        section = dict(deepspeed_config.get("activation_checkpointing", deepspeed_config))

    def pick(value, key, default):
        return value if value is not None else section.get(key, default)

    _settings.partition_activations = bool(pick(partition_activations, "partition_activations", False))
    _settings.contiguous_memory_optimization = bool(
        pick(contiguous_checkpointing, "contiguous_memory_optimization", False))
    _settings.number_checkpoints = pick(num_checkpoints, "number_checkpoints", None)
    _settings.cpu_checkpointing = bool(pick(checkpoint_in_cpu, "cpu_checkpointing", False))
    _settings.synchronize = bool(pick(synchronize, "synchronize_checkpoint_boundary", False))
    _settings.profile = bool(pick(profile, "profile", False))
    _settings.configured = True


def is_configured() -> bool:
    return _settings.configured


def reset() -> None:
    """Back to the defaults (no offload, no profiling) and zeroed :func:`profile_stats`."""
    global _settings, _profile
    _settings, _profile = _Settings(), _Profile()
    _offloaded.clear()


def profile_stats() -> dict:
    """What ``profile`` measured since the last :func:`reset`: calls and seconds of checkpointed
    forward passes and of recomputes, bytes offloaded to the host, recomputes whose inputs were
    prefetched."""
    return dict(vars(_profile))


def _side_stream(device: torch.device):
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


def _sync(tensors) -> None:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    for d in devices:
        torch.cuda.synchronize(d)


class _Offloaded:
    """A CUDA tensor kept in pinned host memory between a checkpoint's forward and its recompute."""

    def __init__(self, t: torch.Tensor):
        self.device, self.requires_grad = t.device, t.requires_grad
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t.detach(), non_blocking=True)  # ordered after t's producer on this stream
        self.back, self.ready = None, None
        _profile.offloaded_bytes += t.numel() * t.element_size()

    def prefetch(self) -> None:
        """Starts the copy back to the device on a side stream (no-op when started)."""
        if self.back is not None:
            return
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        prefetched = self.back is not None
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        self.back.record_stream(current)
        if prefetched:
            _profile.prefetched += 1
        t, self.back, self.host = self.back, None, None
        return t


def _prefetch_previous(holder: "_Offloaded") -> None:
    """Starts bringing back the offloaded inputs of the checkpoint run just before ``holder``'s."""
    live = [(ref, h) for ref in _offloaded if (h := ref()) is not None]
    _offloaded[:] = [ref for ref, _ in live]
    for i, (_, h) in enumerate(live):
        if h is holder:
            if i > 0:
                live[i - 1][1].prefetch()
            del _offloaded[i]
            return


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, offload, *args):
        ctx.run_function = run_function
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_devices = sorted({a.device.index for a in args if isinstance(a, torch.Tensor)
                                   and a.device.type == "cuda"})
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        start = _begin()
        with torch.no_grad():
            outputs = run_function(*args)
        _end(start, args, "forward")
        kept, ctx.holder = [], None
        for a in args:
            if offload and isinstance(a, torch.Tensor) and a.device.type == "cuda":
                holder = _Offloaded(a)
                kept.append(holder)
                ctx.holder = ctx.holder or holder
            else:
                kept.append(a.detach() if isinstance(a, torch.Tensor) else a)
        if ctx.holder is not None:
            # one holder per checkpoint drives the prefetch chain: the first offloaded input's
            _offloaded.append(weakref.ref(ctx.holder))
        ctx.kept = kept
        ctx.grad_inputs = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        if ctx.holder is not None:
            _prefetch_previous(ctx.holder)
        inputs = []
        for a, needs in zip(ctx.kept, ctx.grad_inputs):
            if isinstance(a, _Offloaded):
                a = a.fetch()
            if isinstance(a, torch.Tensor):
                a = a.detach().requires_grad_(needs)
            inputs.append(a)
        ctx.kept = None
        start = _begin()
        with torch.random.fork_rng(devices=ctx.cuda_devices):
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.cuda_devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        _end(start, inputs, "recompute")
        return (None, None) + tuple(a.grad if isinstance(a, torch.Tensor) and needs else None
                                    for a, needs in zip(inputs, ctx.grad_inputs))


def _begin() -> float | None:
    return time.perf_counter() if _settings.profile else None


def _end(start: float | None, tensors, kind: str) -> None:
    if _settings.synchronize or _settings.profile:
        _sync(tensors)
    if start is None:
        return
    seconds = time.perf_counter() - start
    if kind == "forward":
        _profile.forward_calls += 1
        _profile.forward_seconds += seconds
    else:
        _profile.recompute_calls += 1
        _profile.recompute_seconds += seconds


def checkpoint(function, *args):
    """``function(*args)``, its activations recomputed in the backward pass instead of kept.

    ``function`` returns a tensor or a tuple of tensors; ``args`` may mix tensors and other values.
    Without grad (inference) or when no tensor argument requires grad, it is a plain call."""
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function(*args)
    return _CheckpointFunction.apply(function, _settings.cpu_checkpointing, *args)
