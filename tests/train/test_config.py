"""load_config: DeepSpeed's keys and defaults, the batch triple, and errors that name the key."""

import dataclasses
import json

import pytest

from tidal.train import TrainConfig, load_config


def test_defaults_match_deepspeed():
    c = load_config({"train_micro_batch_size_per_gpu": 2}, world_size=4)
    assert isinstance(c, TrainConfig)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (8, 2, 1)
    assert c.gradient_clipping == 0.0 and c.steps_per_print == 10 and c.wall_clock_breakdown is False
    assert c.optimizer is None and c.scheduler is None and c.precision == "fp32"
    f = c.fp16
    assert (f.enabled, f.loss_scale, f.initial_scale_power, f.loss_scale_window, f.hysteresis,
            f.consecutive_hysteresis, f.min_loss_scale) == (False, 0.0, 16, 1000, 2, False, 1.0)
    assert f.dynamic_loss_scale and f.initial_scale == 65536.0
    z = c.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size, z.stage3_prefetch_bucket_size,
            z.stage3_max_live_parameters, z.overlap_comm, z.contiguous_gradients) == (
        0, 500_000_000, 500_000_000, 50_000_000, 1_000_000_000, False, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.gradient_clipping = 1.0


@pytest.mark.parametrize("given, world, expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 2, (32, 4, 4)),
    ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5}, 3, (45, 3, 5)),
    ({"train_batch_size": 12}, 3, (12, 4, 1)),
    ({"train_micro_batch_size_per_gpu": 3}, 1, (3, 3, 1)),
])
def test_batch_triple(given, world, expected):
    c = load_config(given, world)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == expected


@pytest.mark.parametrize("given, world, match", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2,
     r"train_batch_size=32 must equal train_micro_batch_size_per_gpu=4 \* "
     r"gradient_accumulation_steps=2 \* world_size=2"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 1, "train_batch_size=10 is not divisible"),
    ({"train_batch_size": 10}, 4, "train_batch_size=10 is not divisible"),
    ({"gradient_accumulation_steps": 4}, 1, "train_batch_size or train_micro_batch_size_per_gpu must be given"),
    ({}, 1, "must be given"),
    ({"train_batch_size": 0}, 1, "train_batch_size=0 must be >= 1"),
    ({"train_micro_batch_size_per_gpu": "auto"}, 1, "train_micro_batch_size_per_gpu='auto' must be an integer"),
    ({"train_batch_size": 4}, 0, "world_size=0"),
])
def test_batch_errors(given, world, match):
    with pytest.raises(ValueError, match=match):
        load_config(given, world)


def test_full_config_from_json(tmp_path):
    cfg = {
        "train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "steps_per_print": 5,
        "wall_clock_breakdown": True,
        "optimizer": {"type": "adamw", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                 "hysteresis": 3, "min_loss_scale": 0.5, "consecutive_hysteresis": True},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7, "allgather_bucket_size": 2e8,
                              "stage3_prefetch_bucket_size": 1e6, "stage3_max_live_parameters": 1e8,
                              "contiguous_gradients": False},
    }
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    for source in (path, str(path), cfg):
        c = load_config(source, world_size=2)
        assert c.train_micro_batch_size_per_gpu == 4 and c.gradient_clipping == 1.0 and c.steps_per_print == 5
        o = c.optimizer
        assert (o.type, o.lr, o.betas, o.eps, o.weight_decay, o.adam_w_mode) == (
            "AdamW", 3e-4, (0.8, 0.95), 1e-6, 0.1, True)
        assert c.scheduler.type == "WarmupDecayLR" and c.scheduler.params["total_num_steps"] == 100
        assert c.scheduler.params["warmup_type"] == "log" and c.scheduler.params["warmup_max_lr"] == 0.001
        assert c.precision == "fp16" and c.fp16.initial_scale == 4096.0 and c.fp16.hysteresis == 3
        z = c.zero_optimization
        assert z.stage == 3 and z.reduce_bucket_size == 50_000_000 and isinstance(z.reduce_bucket_size, int)
        assert z.overlap_comm is True and z.contiguous_gradients is False  # overlap_comm defaults on at stage 3


def test_optimizer_adam_mode():
    base = {"train_batch_size": 1}
    assert load_config({**base, "optimizer": {"type": "Adam"}}, 1).optimizer.adam_w_mode is True
    adam = load_config({**base, "optimizer": {"type": "ADAM", "params": {"adam_w_mode": False}}}, 1).optimizer
    assert adam.type == "Adam" and adam.adam_w_mode is False
    adamw = load_config({**base, "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, 1).optimizer
    assert adamw.adam_w_mode is True  # DeepSpeed: type AdamW forces decoupled weight decay


def test_static_loss_scale():
    f = load_config({"train_batch_size": 1, "fp16": {"enabled": True, "loss_scale": 128}}, 1).fp16
    assert not f.dynamic_loss_scale and f.initial_scale == 128.0


@pytest.mark.parametrize("extra, match", [
    ({"zero_optimization": {"stagee": 1}},
     r"zero_optimization\.stagee is not a known key; did you mean zero_optimization\.stage\?"),
    ({"train_batchsize": 4}, r"^train_batchsize is not a known key; did you mean train_batch_size\?"),
    ({"optimizer": {"type": "Adam", "params": {"lrr": 1e-3}}},
     r"optimizer\.params\.lrr is not a known key; did you mean optimizer\.params\.lr\?"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max": 1.0}}},
     r"scheduler\.params\.warmup_max is not a known key; did you mean scheduler\.params\.warmup_max_lr\?"),
    ({"fp16": {"enabled": True, "xyz": 1}}, r"fp16\.xyz is not a known key"),
    ({"bf16": {"enable": True}}, r"bf16\.enable is not a known key; did you mean bf16\.enabled\?"),
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization\.stage=4 must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": True}}, r"zero_optimization\.stage=True must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"reduce_bucket_size": 0}}, r"zero_optimization\.reduce_bucket_size=0 must be >= 1"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": -1}},
     r"zero_optimization\.stage3_prefetch_bucket_size=-1 must be >= 0"),
    ({"zero_optimization": {"overlap_comm": 1}}, r"zero_optimization\.overlap_comm=1 must be true or false"),
    ({"zero_optimization": 2}, r"zero_optimization=2 must be an object"),
    ({"gradient_clipping": -1.0}, r"gradient_clipping=-1\.0 must be >= 0"),
    ({"optimizer": {"type": "SGD"}}, r"optimizer\.type='SGD' is not supported"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}}, r"optimizer\.params\.betas=\[0\.9\] must be a pair"),
    ({"optimizer": {"type": "Adam", "params": {"eps": 0}}}, r"optimizer\.params\.eps=0 must be > 0"),
    ({"scheduler": {"type": "WarmupLr"}}, r"scheduler\.type='WarmupLr' must be one of .*did you mean WarmupLR\?"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, r"scheduler\.params\.total_num_steps is required"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cos"}}}, r"scheduler\.params\.warmup_type='cos'"),
    ({"fp16": {"enabled": "yes"}}, r"fp16\.enabled='yes' must be true or false"),
    ({"fp16": {"hysteresis": 0}}, r"fp16\.hysteresis=0 must be >= 1"),
    ({"fp16": {"min_loss_scale": 0}}, r"fp16\.min_loss_scale=0 must be > 0"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16\.enabled and bf16\.enabled are both true"),
    ({"steps_per_print": 0}, r"steps_per_print=0 must be >= 1"),
])
def test_errors_name_the_key(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config({"train_batch_size": 8, **extra}, world_size=1)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"train_batch_size\": 4,")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_config(path, 1)
