"""DeepSpeed's ``elasticity`` config section: one global batch size valid for every world size in a
range, and the micro-batch size and accumulation steps for the world size in hand.

A job that may run on anywhere between ``min_gpus`` and ``max_gpus`` ranks keeps its optimisation the
same (the global batch) only if that batch splits evenly as ``micro * accumulation * world_size`` for
each world size it meets. The computation here is DeepSpeed's (versions 0.1 and 0.2), so a config
resolves to the same numbers under both:

- version 0.1: candidate batches are each micro-batch size, and their least common multiple, scaled
  by the largest highly composite number that keeps them under ``max_train_batch_size``; the
  candidate divisible by the most world sizes in ``[min_gpus, max_gpus]`` wins (ties: the larger
  batch with ``prefer_larger_batch``, else the smaller).
- version 0.2: the same over nodes (``num_gpus_per_node`` ranks each); a world size outside the valid
  list still gets a batch: the largest (smallest) multiple of ``micro * world_size`` under the cap.

Then the micro-batch is the largest configured size that divides the per-rank share, and the
accumulation steps make up the rest.
"""

import dataclasses
import math

# Highly composite numbers: every candidate batch is a base times one of these, so it divides
# evenly among as many world sizes as possible.
_HIGHLY_COMPOSITE = (1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040, 7560,
                     10080, 15120, 20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320, 221760, 277200,
                     332640, 498960, 554400, 665280, 720720)
LATEST_VERSION = 0.2


@dataclasses.dataclass(frozen=True)
class ElasticityConfig:
    """The ``elasticity`` section, DeepSpeed's keys and defaults (validated by
    tidal.train.config.load_config)."""

    enabled: bool = False
    max_train_batch_size: int = 2000
    micro_batch_sizes: tuple[int, ...] = (2, 4, 6)
    min_gpus: int = 1
    max_gpus: int = 10000
    num_gpus_per_node: int = 1
    model_parallel_size: int = 1
    min_time: int = 0
    prefer_larger_batch: bool = True
    ignore_non_elastic_batch_info: bool = False
    version: float = LATEST_VERSION


KEYS = tuple(f.name for f in dataclasses.fields(ElasticityConfig))


def valid_world_sizes(batch: int, micro_batches, min_gpus: int, max_gpus: int) -> list[int]:
    """World sizes in ``[min_gpus, max_gpus]`` that ``batch`` splits among with some micro-batch size
    (DeepSpeed counts each micro-batch's full split, batch / micro, and the divisors of that split up
    to half of it)."""
    sizes = set()
    for micro in micro_batches:
        if batch % micro:
            continue
        ways = batch // micro
        if min_gpus <= ways <= max_gpus:
            sizes.add(ways)
        sizes.update(d for d in range(max(min_gpus, 1), min(ways // 2, max_gpus) + 1) if ways % d == 0)
    return sorted(sizes)


def _scaled_by_highly_composite(base: int, cap: int) -> int:
    """``base`` times the largest highly composite number that keeps it <= ``cap`` (``base < cap``)."""
    limit = cap // base
    return base * max(h for h in _HIGHLY_COMPOSITE if h <= limit)


def _batch_v01(micro_batches, cap: int, min_gpus: int, max_gpus: int, prefer_larger: bool):
    """(batch, its valid world sizes): the candidate valid for the most world sizes; among those, the
    largest (``prefer_larger``) or the smallest."""
    if max(micro_batches) > cap:
        raise ValueError(f"elasticity.micro_batch_sizes={list(micro_batches)} must all be <= the batch cap {cap}")
    min_gpus = min_gpus or 1
    max_gpus = max_gpus or cap // min(micro_batches)
    bases = list(micro_batches) + [math.lcm(*micro_batches)]
    candidates = {base if base == cap else _scaled_by_highly_composite(base, cap) for base in bases if base <= cap}
    best, best_sizes = min(micro_batches), []
    for batch in sorted(candidates):
        sizes = valid_world_sizes(batch, micro_batches, min_gpus, max_gpus)
        better_tie = batch > best if prefer_larger else batch < best
        if len(sizes) > len(best_sizes) or (len(sizes) == len(best_sizes) and better_tie):
            best, best_sizes = batch, sizes
    return best, best_sizes


def compute(config: ElasticityConfig, world_size: int) -> tuple[int, list[int], int]:
    """(global batch, valid world sizes, micro-batch size) for ``world_size`` ranks; a ValueError names
    the world size when it is not among the valid ones."""
    micro_batches, cap = config.micro_batch_sizes, config.max_train_batch_size
    if config.version == 0.1:
        batch, sizes = _batch_v01(micro_batches, cap, config.min_gpus, config.max_gpus, config.prefer_larger_batch)
    else:
        per_node = config.num_gpus_per_node // config.model_parallel_size
        batch, nodes = _batch_v01(micro_batches, int(cap / per_node), int(config.min_gpus / config.num_gpus_per_node),
                                  int(config.max_gpus / config.num_gpus_per_node), config.prefer_larger_batch)
        batch, sizes = batch * per_node, [n * per_node for n in nodes]
        if world_size // config.model_parallel_size not in sizes:
            dp = (world_size / config.num_gpus_per_node) * per_node
            options = [math.floor(cap / (m * dp)) * m * dp for m in micro_batches]
            batch = int(max(options) if config.prefer_larger_batch else min(options))
            sizes = [int(dp)]
    if world_size not in sizes:
        raise ValueError(f"world_size={world_size} is not one elasticity allows: {sizes} (from "
                         f"elasticity.max_train_batch_size={cap}, micro_batch_sizes={list(micro_batches)}, "
                         f"min_gpus={config.min_gpus}, max_gpus={config.max_gpus})")
    micro = next((m for m in sorted(set(micro_batches), reverse=True) if batch // world_size % m == 0), None)
    if micro is None:
        raise ValueError(f"no elasticity.micro_batch_sizes entry divides the global batch {batch} split over "
                         f"world_size={world_size}")
    return batch, sizes, micro
