"""Reinforcement learning from feedback on tidal's two engines (its own folder: it may use both, and
neither imports it). Today: the loss arithmetic of PPO and GRPO (:mod:`tidal.rlhf.losses`)."""

from tidal.rlhf import losses

__all__ = ["losses"]
