"""The training half of tidal: the DeepSpeed-style config, learning-rate schedules and fp16 loss scaling."""

from tidal.train.config import TrainConfig, load_config
from tidal.train.loss_scaler import DynamicLossScaler, StaticLossScaler, has_overflow
from tidal.train.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler

__all__ = ["DynamicLossScaler", "StaticLossScaler", "TrainConfig", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "build_scheduler", "has_overflow", "load_config"]
