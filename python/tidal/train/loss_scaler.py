"""fp16 loss scaling with DeepSpeed's semantics: a dynamic scaler (back off on overflow after a
hysteresis, grow after a window of good steps), a static one, and the inf/nan check that feeds them.

Either scaler's ``update(found_overflow)`` returns whether the optimizer step must be skipped. As in
DeepSpeed's ZeRO and fused fp16 optimizers, a step with inf/nan gradients is skipped under a static
scale too; only the dynamic scaler changes its scale. Skipped steps are logged on logger
``tidal.train`` once per run of consecutive skips (its first, then every ``LOG_EVERY_SKIPS``-th).
"""

import logging
from collections.abc import Iterable, Mapping

import torch

logger = logging.getLogger("tidal.train")

#: In a run of consecutive skipped steps, log the first and then one line per this many.
LOG_EVERY_SKIPS = 100


def has_overflow(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether any tensor holds an inf or a nan (None entries are ignored).

    One ``isfinite().all()`` reduction per tensor, stacked and reduced on the device, then a single
    device-to-host read, so a CUDA caller pays one synchronisation whatever the number of tensors.
    """
    flags = [t.isfinite().all() for t in tensors if t is not None and t.is_floating_point()]
    if not flags:
        return False
    device = flags[0].device
    return not bool(torch.stack([f.to(device, non_blocking=True) for f in flags]).all())


class _SkipLog:
    """Counts consecutive skipped steps and logs a compact line at the first and every Nth."""

    def __init__(self):
        self.num_consecutive_skips = 0

    def skipped(self, iteration: int, old_scale: float, new_scale: float) -> None:
        self.num_consecutive_skips += 1
        n = self.num_consecutive_skips
        if n == 1:
            logger.warning("fp16 step %d skipped: inf/nan gradients; loss scale %g -> %g",
                           iteration, old_scale, new_scale)
        elif n % LOG_EVERY_SKIPS == 0:
            logger.warning("fp16 step %d skipped: %d consecutive steps with inf/nan gradients; loss scale %g",
                           iteration, n, new_scale)

    def good(self) -> None:
        self.num_consecutive_skips = 0


class DynamicLossScaler:
    """DeepSpeed's dynamic loss scaler.

    On an overflow the step is skipped; while more than one unit of hysteresis is left it is spent
    (``cur_hysteresis -= 1``) and the scale is kept, otherwise the scale becomes
    ``max(scale / scale_factor, min_scale)`` (hysteresis stays exhausted). After ``scale_window``
    consecutive good steps since the last overflow (and every ``scale_window`` good steps after), the
    scale becomes ``scale * scale_factor`` and the hysteresis refills. With ``consecutive_hysteresis``
    the hysteresis refills on every good step instead, so only ``hysteresis`` overflows in a row back
    off. An overflow with the scale already at ``min_scale`` and no hysteresis left raises
    RuntimeError when ``raise_error_at_min_scale`` (DeepSpeed's default): training cannot recover.

    Parameters
    ----------
    initial_scale
        ``2 ** fp16.initial_scale_power`` (DeepSpeed's default power: 16).
    scale_window, hysteresis, min_scale
        ``fp16.loss_scale_window``, ``fp16.hysteresis``, ``fp16.min_loss_scale``.
    """

    def __init__(self, initial_scale: float = 2.0**16, scale_window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, scale_factor: float = 2.0, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = True):
        if not initial_scale > 0:
            raise ValueError(f"initial_scale={initial_scale} must be > 0")
        if isinstance(scale_window, bool) or not isinstance(scale_window, int) or scale_window < 1:
            raise ValueError(f"scale_window={scale_window!r} must be an integer >= 1")
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
            raise ValueError(f"hysteresis={hysteresis!r} must be an integer >= 1")
        if not min_scale > 0:
            raise ValueError(f"min_scale={min_scale} must be > 0")
        if not scale_factor > 1:
            raise ValueError(f"scale_factor={scale_factor} must be > 1")
        self.scale = float(initial_scale)
        self.scale_window = scale_window
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.scale_factor = float(scale_factor)
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_hysteresis = hysteresis
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self._skip_log = _SkipLog()

    @property
    def loss_scale(self) -> float:
        return self.scale

    def update(self, found_overflow: bool) -> bool:
        """Record one optimizer step's outcome; returns True when that step must be skipped."""
        old_scale = self.scale
        if found_overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError(f"fp16 gradients overflow at the minimum loss scale {self.min_scale:g} "
                                       f"(step {self.cur_iter}); training cannot continue")
                self.scale = max(self.scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
            self._skip_log.skipped(self.cur_iter, old_scale, self.scale)
        else:
            self._skip_log.good()
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_hysteresis = self.hysteresis
                self.scale *= self.scale_factor
        self.cur_iter += 1
        return bool(found_overflow)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "cur_hysteresis": self.cur_hysteresis, "cur_iter": self.cur_iter,
                "last_overflow_iter": self.last_overflow_iter, "scale_window": self.scale_window,
                "hysteresis": self.hysteresis, "min_scale": self.min_scale, "scale_factor": self.scale_factor,
                "consecutive_hysteresis": self.consecutive_hysteresis}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the running state (scale, hysteresis, counters); the settings stay this object's,
        so a resumed run may change ``loss_scale_window`` and the rest in its config."""
        self.scale = float(state["scale"])
        self.cur_hysteresis = min(int(state["cur_hysteresis"]), self.hysteresis)
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])


class StaticLossScaler:
    """A fixed loss scale (``fp16.loss_scale > 0``). The scale never changes, but a step with inf/nan
    gradients is still skipped (and logged), as DeepSpeed's fp16 optimizers do."""

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"scale={scale} must be > 0")
        self.scale = float(scale)
        self.cur_iter = 0
        self._skip_log = _SkipLog()

    @property
    def loss_scale(self) -> float:
        return self.scale

    def update(self, found_overflow: bool) -> bool:
        """Record one optimizer step's outcome; returns True when that step must be skipped."""
        if found_overflow:
            self._skip_log.skipped(self.cur_iter, self.scale, self.scale)
        else:
            self._skip_log.good()
        self.cur_iter += 1
        return bool(found_overflow)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "cur_iter": self.cur_iter}

    def load_state_dict(self, state: Mapping) -> None:
        self.cur_iter = int(state["cur_iter"])
