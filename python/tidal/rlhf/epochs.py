"""The epoch loop SFTTrainer and RewardTrainer share: rows shuffled per epoch, each rank's
micro-batches of every global batch, metrics averaged over a step's micro-batches."""

import random
import time
from collections.abc import Callable


def train_epochs(engine, num_rows: int, epochs: int, seed: int, micro_step: Callable[[list[int]], dict],
                 line: Callable[[dict], str], max_steps: int | None = None,
                 log: Callable[[str], None] | None = None, start_step: int = 0,
                 after_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Epochs over ``num_rows`` rows, shuffled per epoch from ``seed + epoch``, in the engine's
    global batches (a remainder short of one is dropped); ``micro_step(indices)`` trains this rank's
    micro-batch and returns its metrics. After each optimizer step: a row of the step's metrics
    averaged over its micro-batches (with "step", "epoch" and "seconds"), on rank 0
    ``log(line(row))``, then ``after_step(row)`` (on every rank: a checkpoint is collective). Stops
    after step ``max_steps`` when given. ``start_step`` (a resumed run) skips the batches of the
    steps already taken: the order is the same, so the run continues where it stopped."""
    cfg = engine.config
    micro, world, rank, accumulation = (cfg.train_micro_batch_size_per_gpu, engine.world_size, engine.rank,
                                        cfg.gradient_accumulation_steps)
    if max_steps is not None and start_step >= max_steps:
        return []
    history, metrics, micro_steps, start = [], {}, 0, time.perf_counter()
    skip = start_step * accumulation
    for epoch in range(epochs):
        order = list(range(num_rows))
        random.Random(seed + epoch).shuffle(order)
        usable = num_rows - num_rows % cfg.train_batch_size
        for lo in range(rank * micro, usable, world * micro):
            micro_steps += 1
            if micro_steps <= skip:
                continue
            for name, value in micro_step(order[lo:lo + micro]).items():
                metrics[name] = metrics.get(name, 0.0) + value / accumulation
            if micro_steps % accumulation == 0:
                history.append({"step": start_step + len(history) + 1, "epoch": epoch, **metrics,
                                "seconds": time.perf_counter() - start})
                metrics = {}
                if log is not None and rank == 0:
                    log(line(history[-1]))
                if after_step is not None:
                    after_step(history[-1])
                if max_steps is not None and history[-1]["step"] >= max_steps:
                    return history
    return history
