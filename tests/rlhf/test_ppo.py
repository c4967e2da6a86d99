"""PPOTrainer on a tiny random model on the CPU: actor rollouts from tidal.LLM serving it in place
(serving log-probabilities checked against the training forward every step), a critic from the same
weights, a frozen reference: a programmatic reward rises within 16 steps; the adaptive KL
coefficient moves; a RewardModel can stand in for the reward functions; bad settings are errors."""

import pytest

from tidal.models import load_model
from tidal.rlhf import PPOConfig, PPOTrainer, RewardModel
from tiny_models import assert_pool_whole, build_model

PROMPTS = [[5, 17, 33, 2], [40, 41, 42], [7, 7, 9, 100, 3], [250, 12]] * 4


def low_ids(prompts, completions, completion_ids):
    return [sum(t < 100 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _config(**kw):
    base = dict(max_completion_length=6, num_ppo_epochs=2, kl_coef=0.01, seed=1, device="cpu",
                train={"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}},
                critic_train={"train_micro_batch_size_per_gpu": 8,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}},
                llm={"device": "cpu", "num_kv_blocks": 128, "block_size": 4, "max_model_len": 64})
    base.update(kw)
    return PPOConfig(**base)


def test_reward_rises(tmp_path):
    build_model(str(tmp_path))
    trainer = PPOTrainer(str(tmp_path), low_ids, _config())
    history = trainer.train(PROMPTS, steps=16, log=None)
    assert history[0]["kl"] == 0.0  # the actor starts as its reference
    assert all(m["logprob_error"] < 1e-3 for m in history)
    first, last = history[0]["reward"], sum(m["reward"] for m in history[-3:]) / 3
    assert last > first + 0.2, [round(m["reward"], 3) for m in history]
    assert_pool_whole(trainer.llm)


def test_adaptive_kl_and_reward_model(tmp_path):
    build_model(str(tmp_path))
    lm, _ = load_model(str(tmp_path))
    trainer = PPOTrainer(str(tmp_path), args=_config(target_kl=0.001, kl_horizon=100),
                         reward_model=RewardModel(lm).requires_grad_(False))
    history = trainer.train(PROMPTS, steps=3, log=None)
    assert history[-1]["kl"] > 0.001 and history[-1]["kl_coef"] > 0.01  # above target: the coefficient grows


def test_errors(tmp_path):
    build_model(str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of reward_funcs and reward_model"):
        PPOTrainer(str(tmp_path), args=_config())
    with pytest.raises(ValueError, match="num_ppo_epochs=0 must be at least 1"):
        PPOConfig(num_ppo_epochs=0)
    trainer = PPOTrainer(str(tmp_path), low_ids, _config(train={"train_micro_batch_size_per_gpu": 5,
                                                                "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="16 sequences per step must be a multiple of "
                                         "train_micro_batch_size_per_gpu=5"):
        trainer.step(PROMPTS)
