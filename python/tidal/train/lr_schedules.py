"""DeepSpeed's per-step learning-rate schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR) as plain
objects: no optimizer inside, the engine reads ``get_lr()`` and writes it into its optimizer.

Semantics follow DeepSpeed's ``runtime/lr_schedules.py``: ``last_batch_iteration`` starts at -1,
``step()`` advances it by one, and ``get_lr()`` is the rate at ``last_batch_iteration`` (0.0 before
the first ``step()``, as DeepSpeed returns). DeepSpeed's engine calls ``scheduler.step()`` right after
every optimizer step, so optimizer step ``k`` (0-based) runs with the rate set after ``k`` scheduler
steps. A warmup of fewer than 2 steps is raised to 2, as DeepSpeed does (``log(1) = 0``).
"""

import math
from collections.abc import Mapping

WARMUP_TYPES = ("log", "linear")

#: Parameters each schedule takes (the ``scheduler.params`` keys) and their defaults; ``None`` marks a
#: required one. ``last_batch_iteration`` is DeepSpeed's resume argument.
SCHEDULER_PARAMS: dict[str, dict[str, object]] = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                 "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupDecayLR": {"total_num_steps": None, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                      "warmup_num_steps": 1000, "warmup_type": "log", "last_batch_iteration": -1},
    "WarmupCosineLR": {"total_num_steps": None, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 0.0001, "warmup_type": "log", "last_batch_iteration": -1},
}


def _check_number(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} must be <= {maximum}")
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return value


def _check_warmup_type(value) -> str:
    # NOTE(tidal): DeepSpeed logs a warning and falls back to "log" on an unknown type; a typo in a
    # config is an error here, like every other key.
    if value not in WARMUP_TYPES:
        raise ValueError(f"warmup_type={value!r} must be 'log' or 'linear'")
    return value


class _Schedule:
    """Shared step counter and state of the three schedules."""

    def __init__(self, warmup_num_steps: int, warmup_type: str, last_batch_iteration: int):
        self.warmup_num_steps = max(2, _check_int("warmup_num_steps", warmup_num_steps, 0))
        self.warmup_type = _check_warmup_type(warmup_type)
        self.last_batch_iteration = _check_int("last_batch_iteration", last_batch_iteration, -1)

    def _warmup_fraction(self, step: int) -> float:
        """0 at step 0, rising to (almost) 1 at ``warmup_num_steps``; only for ``step < warmup_num_steps``."""
        if self.warmup_type == "log":
            return math.log(step + 1) / math.log(self.warmup_num_steps)
        return step / self.warmup_num_steps

    def _lr_at(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self, step: int | None = None) -> float:
        """The learning rate at ``step`` (default: ``last_batch_iteration``); 0.0 for a negative step."""
        step = self.last_batch_iteration if step is None else step
        if step < 0:
            return 0.0
        return self._lr_at(step)

    def step(self) -> float:
        """Advance one step and return the new rate."""
        self.last_batch_iteration += 1
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_batch_iteration = _check_int("last_batch_iteration", state["last_batch_iteration"], -1)


class WarmupLR(_Schedule):
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (W), then hold.

    ``lr(t) = min_lr + (max_lr - min_lr) * g(t)`` with ``g(t) = log(t + 1) / log(W)`` ("log") or
    ``g(t) = t / W`` ("linear") for ``t < W``, and ``g(t) = 1`` for ``t >= W``; ``W = max(2, W)``.
    """

    def __init__(self, warmup_min_lr: float = 0.0, warmup_max_lr: float = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1):
        super().__init__(warmup_num_steps, warmup_type, last_batch_iteration)
        self.warmup_min_lr = _check_number("warmup_min_lr", warmup_min_lr, minimum=0.0)
        self.warmup_max_lr = _check_number("warmup_max_lr", warmup_max_lr, minimum=0.0)

    def _gamma(self, step: int) -> float:
        return self._warmup_fraction(step) if step < self.warmup_num_steps else 1.0

    def _lr_at(self, step: int) -> float:
        return self.warmup_min_lr + (self.warmup_max_lr - self.warmup_min_lr) * self._gamma(step)


class WarmupDecayLR(WarmupLR):
    """WarmupLR's warmup, then a linear decay back to ``warmup_min_lr`` at ``total_num_steps`` (T).

    ``lr(t) = min_lr + (max_lr - min_lr) * g(t)``; for ``t < W`` ``g`` is WarmupLR's, and for
    ``t >= W`` ``g(t) = max(0, (T - t) / max(1, T - W))``, so the rate reaches ``warmup_min_lr``
    (0 by default) at ``t = T`` and stays there.
    """

    def __init__(self, total_num_steps: int, warmup_min_lr: float = 0.0, warmup_max_lr: float = 0.001,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", last_batch_iteration: int = -1):
        super().__init__(warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        self.total_num_steps = _check_int("total_num_steps", total_num_steps, 1)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            return self._warmup_fraction(step)
        return max(0.0, (self.total_num_steps - step) / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """A ratio of the optimizer's own rate ``base_lr``: warmup from ``warmup_min_ratio`` to 1, then a
    cosine down to ``cos_min_ratio`` at step ``total_num_steps - 1``.

    ``lr(t) = base_lr * r(t)``; for ``t < W`` ``r(t) = warmup_min_ratio + (1 - warmup_min_ratio) * g(t)``
    with WarmupLR's ``g``; for ``t >= W``, with ``s = t - W + 1`` and ``S = T - W``,
    ``r(t) = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * s / S)) / 2)``.
    Past ``T`` the cosine continues unclamped, exactly as DeepSpeed's formula does.
    """

    def __init__(self, base_lr: float, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        super().__init__(warmup_num_steps, warmup_type, last_batch_iteration)
        self.base_lr = _check_number("base_lr", base_lr, minimum=0.0)
        self.total_num_steps = _check_int("total_num_steps", total_num_steps, 1)
        self.warmup_min_ratio = _check_number("warmup_min_ratio", warmup_min_ratio, 0.0, 1.0)
        self.cos_min_ratio = _check_number("cos_min_ratio", cos_min_ratio, 0.0, 1.0)
        if self.total_num_steps <= self.warmup_num_steps:
            # NOTE(tidal): DeepSpeed only warns here and then divides by zero (T == W) or runs the
            # cosine backwards (T < W) once warmup ends.
            raise ValueError(f"total_num_steps={total_num_steps} must be greater than "
                             f"warmup_num_steps={self.warmup_num_steps}")

    def get_lr_ratio(self, step: int | None = None) -> float:
        step = self.last_batch_iteration if step is None else step
        if step < 0:
            return 0.0
        if step < self.warmup_num_steps:
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * self._warmup_fraction(step)
        progress = (step - self.warmup_num_steps + 1) / (self.total_num_steps - self.warmup_num_steps)
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def _lr_at(self, step: int) -> float:
        return self.base_lr * self.get_lr_ratio(step)


def validate_scheduler_params(scheduler_type: str, params: Mapping) -> dict:
    """The schedule's parameters with defaults filled in; ValueError naming a missing or bad one.

    """
    if scheduler_type not in SCHEDULER_PARAMS:
        raise ValueError(f"scheduler type {scheduler_type!r} must be one of {', '.join(SCHEDULER_PARAMS)}")
    unknown = sorted(set(params) - set(SCHEDULER_PARAMS[scheduler_type]))
    if unknown:
        raise ValueError(f"{scheduler_type} takes no parameter {unknown[0]!r}; it takes "
                         f"{', '.join(SCHEDULER_PARAMS[scheduler_type])}")
    resolved = {**SCHEDULER_PARAMS[scheduler_type], **params}
    missing = [k for k, v in resolved.items() if v is None]
    if missing:
        raise ValueError(f"{scheduler_type} needs {', '.join(missing)}")
    _build(scheduler_type, resolved, base_lr=1.0)  # runs every range check
    return resolved


def _build(scheduler_type: str, params: Mapping, base_lr: float) -> _Schedule:
    if scheduler_type == "WarmupLR":
        return WarmupLR(**params)
    if scheduler_type == "WarmupDecayLR":
        return WarmupDecayLR(**params)
    if scheduler_type == "WarmupCosineLR":
        return WarmupCosineLR(base_lr, **params)
    raise ValueError(f"scheduler type {scheduler_type!r} must be one of {', '.join(SCHEDULER_PARAMS)}")


def build_scheduler(config, base_lr: float) -> _Schedule | None:
    """The schedule a config names, or None where it names none.

    Parameters
    ----------
    config
        A ``TrainConfig`` (its ``scheduler``), a ``SchedulerConfig``, a ``{"type", "params"}`` dict,
        or None.
    base_lr
        The optimizer's rate (``optimizer.params.lr``); only WarmupCosineLR scales it, the other two
        set the rate from ``warmup_min_lr`` / ``warmup_max_lr`` as DeepSpeed does.
    """
    if config is not None and hasattr(config, "zero_optimization"):  # a TrainConfig
        config = config.scheduler
    if config is None:
        return None
    if isinstance(config, Mapping):
        scheduler_type, params = config["type"], config.get("params", {})
    else:
        scheduler_type, params = config.type, config.params
    return _build(scheduler_type, validate_scheduler_params(scheduler_type, params), base_lr)
