"""Reinforcement learning from feedback on tidal's two engines (its own folder: it may use both, and
neither imports it): the loss arithmetic of PPO and GRPO (:mod:`tidal.rlhf.losses`), supervised
fine-tuning (:class:`SFTTrainer`), reward models (:class:`RewardTrainer`), and PPO with a critic
(:class:`PPOTrainer`) and GRPO (:class:`GRPOTrainer`) with rollouts served from the weights being
trained."""

from tidal.rlhf import losses
from tidal.rlhf.grpo import GRPOConfig, GRPOTrainer
from tidal.rlhf.ppo import PPOConfig, PPOTrainer, ValueModel
from tidal.rlhf.reward import RewardConfig, RewardModel, RewardTrainer
from tidal.rlhf.sft import SFTConfig, SFTTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardModel", "RewardTrainer",
           "SFTConfig", "SFTTrainer", "ValueModel", "losses"]
