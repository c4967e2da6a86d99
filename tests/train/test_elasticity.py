"""DeepSpeed's ``elasticity`` section: tidal computes the global batch, the valid world sizes and the
micro-batch size DeepSpeed computes (versions 0.1 and 0.2; the expected values are DeepSpeed 0.19's
own results for these configs), load_config derives the batch triple from it for the world size in
hand, and bad sections are named."""

import pytest

from tidal.train import elasticity
from tidal.train.config import load_config

# (version, max_train_batch_size, micro_batch_sizes, min_gpus, max_gpus, prefer_larger_batch,
#  num_gpus_per_node), world size, (global batch, micro-batch, valid world sizes)
CASES = [
    ((0.1, 2000, [2, 4, 6], 1, 10000, True, 1), 8, (1680, 6,
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 20, 21, 24, 28, 30, 35, 40, 42, 56, 60, 70, 84, 105, 120,
        140, 168, 210, 280, 420, 840])),
    ((0.1, 2000, [2, 4, 6], 1, 10000, False, 1), 8, (1680, 6,
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 20, 21, 24, 28, 30, 35, 40, 42, 56, 60, 70, 84, 105, 120,
        140, 168, 210, 280, 420, 840])),
    ((0.1, 10000, [8, 12, 16, 17], 32, 1500, True, 1), 64, (9792, 17,
        [32, 34, 36, 48, 51, 64, 68, 72, 96, 102, 136, 144, 153, 192, 204, 272, 288, 306, 408, 576, 612,
        816, 1224])),
    ((0.1, 1024, [1, 2, 3], 2, 6, True, 1), 6, (840, 2, [2, 3, 4, 5, 6])),
    ((0.1, 100, [5], 1, 50, False, 1), 4, (60, 5, [1, 2, 3, 4, 6, 12])),
    ((0.1, 48, [48], 1, 10, True, 1), 1, (48, 48, [1])),
    ((0.2, 2000, [2, 4, 6], 1, 10000, True, 1), 8, (1680, 6,
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 20, 21, 24, 28, 30, 35, 40, 42, 56, 60, 70, 84, 105, 120,
        140, 168, 210, 280, 420, 840])),
    ((0.2, 2000, [2, 4, 6], 1, 10000, True, 1), 7, (1680, 6,
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 20, 21, 24, 28, 30, 35, 40, 42, 56, 60, 70, 84, 105, 120,
        140, 168, 210, 280, 420, 840])),
    ((0.2, 1000, [2, 4], 4, 64, True, 4), 16, (960, 4, [4, 8, 12, 16, 20, 24, 32, 40, 48, 60])),
    ((0.2, 1000, [2, 4], 4, 64, False, 4), 12, (960, 4, [4, 8, 12, 16, 20, 24, 32, 40, 48, 60])),
    ((0.2, 96, [1, 3], 1, 8, True, 2), 3, (96, 1, [3])),
]
KEYS = ("version", "max_train_batch_size", "micro_batch_sizes", "min_gpus", "max_gpus", "prefer_larger_batch",
        "num_gpus_per_node")


def section(values) -> dict:
    return dict(enabled=True, **dict(zip(KEYS, values)))


@pytest.mark.parametrize("values,world,want", CASES)
def test_matches_deepspeed(values, world, want):
    elastic = load_config({"elasticity": section(values)}, world_size=world).elasticity
    batch, sizes, micro = elasticity.compute(elastic, world)
    assert (batch, micro, sizes) == want


@pytest.mark.parametrize("values,world,want", CASES)
def test_load_config_takes_the_batch_from_elasticity(values, world, want):
    batch, micro, _ = want
    config = load_config({"elasticity": section(values)}, world_size=world)
    assert config.train_batch_size == batch and config.train_micro_batch_size_per_gpu == micro
    assert config.gradient_accumulation_steps * micro * world == batch


def test_the_same_global_batch_at_every_valid_world_size():
    elastic = section((0.1, 2000, [2, 4, 6], 1, 64, True, 1))
    batches = set()
    for world in (1, 2, 3, 5, 8, 12):
        config = load_config({"elasticity": elastic}, world_size=world)
        batches.add(config.train_batch_size)
        assert config.train_micro_batch_size_per_gpu * config.gradient_accumulation_steps * world == 1680
    assert batches == {1680}


@pytest.mark.parametrize("extra,match", [
    ({"elasticity": {"enabled": True, "micro_batch_sizes": [2]}}, "elasticity.max_train_batch_size must be given"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [0, 2]}},
     r"elasticity.micro_batch_sizes=\[0, 2\] must be a non-empty list of positive integers"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 4, "micro_batch_sizes": [8]}},
     r"elasticity.micro_batch_sizes=\[8\] must all be <= elasticity.max_train_batch_size=4"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [2], "min_gpus": 9,
                     "max_gpus": 3}}, "elasticity.min_gpus=9 must be <= elasticity.max_gpus=3"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [2], "version": 0.3}},
     "elasticity.version=0.3 must be 0.1 or 0.2"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [2],
                     "model_parallel_size": 2}}, "elasticity.model_parallel_size=2"),
    ({"elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_size": [2]}},
     "elasticity.micro_batch_size is not a known key; did you mean elasticity.micro_batch_sizes"),
    ({"train_batch_size": 8, "elasticity": {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [2]}},
     "train_batch_size cannot be set with elasticity.enabled"),
])
def test_bad_sections_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(extra, world_size=1)


def test_a_world_size_outside_the_range_is_named():
    elastic = {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [5], "min_gpus": 1, "max_gpus": 50,
               "version": 0.1}
    with pytest.raises(ValueError, match=r"world_size=7 is not one elasticity allows: \[1, 2, 3, 4, 6, 12\]"):
        load_config({"elasticity": elastic}, world_size=7)


def test_ignored_batch_keys_and_disabled_section():
    elastic = {"enabled": True, "max_train_batch_size": 100, "micro_batch_sizes": [5], "version": 0.1,
               "ignore_non_elastic_batch_info": True}
    config = load_config({"train_batch_size": 8, "elasticity": elastic}, world_size=4)
    assert config.train_batch_size == 60 and config.train_micro_batch_size_per_gpu == 5
    off = load_config({"train_batch_size": 8, "elasticity": {"enabled": False}}, world_size=4)
    assert off.train_batch_size == 8 and not off.elasticity.enabled
