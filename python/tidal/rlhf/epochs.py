"""The epoch loop SFTTrainer and RewardTrainer share: rows shuffled per epoch, each rank's
micro-batches of every global batch, metrics averaged over a step's micro-batches."""

import random
import time
from collections.abc import Callable


def train_epochs(engine, num_rows: int, epochs: int, seed: int, micro_step: Callable[[list[int]], dict],
                 line: Callable[[dict], str], max_steps: int | None = None,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Epochs over ``num_rows`` rows, shuffled per epoch from ``seed + epoch``, in the engine's
    global batches (a remainder short of one is dropped); ``micro_step(indices)`` trains this rank's
    micro-batch and returns its metrics. After each optimizer step: a row of the step's metrics
    averaged over its micro-batches (with "step", "epoch" and "seconds"), and on rank 0
    ``log(line(row))``. Stops after ``max_steps`` steps when given."""
    cfg = engine.config
    micro, world, rank, accumulation = (cfg.train_micro_batch_size_per_gpu, engine.world_size, engine.rank,
                                        cfg.gradient_accumulation_steps)
    history, metrics, micro_steps, start = [], {}, 0, time.perf_counter()
    for epoch in range(epochs):
        order = list(range(num_rows))
        random.Random(seed + epoch).shuffle(order)
        usable = num_rows - num_rows % cfg.train_batch_size
        for lo in range(rank * micro, usable, world * micro):
            for name, value in micro_step(order[lo:lo + micro]).items():
                metrics[name] = metrics.get(name, 0.0) + value / accumulation
            micro_steps += 1
            if micro_steps % accumulation == 0:
                history.append({"step": len(history) + 1, "epoch": epoch, **metrics,
                                "seconds": time.perf_counter() - start})
                metrics = {}
                if log is not None and rank == 0:
                    log(line(history[-1]))
                if max_steps is not None and len(history) >= max_steps:
                    return history
    return history
