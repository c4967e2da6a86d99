"""GRPOTrainer on a tiny random model on the CPU: rollouts from tidal.LLM serving the training
engine's module in place; the serving engine's log-probabilities of the sampled tokens equal the
training forward's (checked inside every step); the first step's KL to the reference is 0; the mean
reward of a programmatic reward rises within a dozen steps, at ZeRO stage 1 (the module served in place)
and 3 (a serving copy synced after every step); bad settings are clear errors."""

import pytest
import torch

from tidal.models import load_model
from tidal.rlhf import GRPOConfig, GRPOTrainer, RewardModel
from tiny_models import assert_pool_whole, build_model

PROMPTS = [[5, 17, 33, 2], [40, 41, 42], [7, 7, 9, 100, 3], [250, 12]]


def low_ids(prompts, completions, completion_ids):
    """The share of a completion's tokens below 100: about 0.3 for a random model."""
    return [sum(t < 100 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _config(**kw):
    base = dict(num_generations=8, max_completion_length=6, beta=0.04, seed=1, device="cpu",
                train={"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
                       "optimizer": {"type": "AdamW", "params": {"lr": 2e-2}}, "gradient_clipping": 1.0},
                llm={"device": "cpu", "num_kv_blocks": 128, "block_size": 4, "max_model_len": 64})
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize("stage", [1, 3])
def test_reward_rises_and_logprobs_agree(tmp_path, stage):
    """Stage 1 serves the engine's module in place; stage 3 a copy synced after each step."""
    build_model(str(tmp_path))
    config = _config()
    config.train["zero_optimization"] = {"stage": stage}
    trainer = GRPOTrainer(str(tmp_path), low_ids, config)
    assert (trainer.served.copy is None) == (stage != 3)
    history = trainer.train(PROMPTS, steps=12, log=None)
    assert history[0]["kl"] < 1e-6  # the policy starts equal to its reference
    assert all(m["logprob_error"] < 1e-3 for m in history)
    first, last = history[0]["reward"], sum(m["reward"] for m in history[-3:]) / 3
    assert last > first + 0.2, [round(m["reward"], 3) for m in history]
    assert history[-1]["kl"] > 0
    if stage == 3:  # the serving copy holds the trained weights
        state = trainer.engine.full_state_dict()
        for name, param in trainer.served.copy.named_parameters():
            torch.testing.assert_close(param, state[name], rtol=0, atol=0)
    assert_pool_whole(trainer.llm)


def test_a_reward_model_scores_the_rollouts(tmp_path):
    build_model(str(tmp_path))
    lm, _ = load_model(str(tmp_path))
    reward_model = RewardModel(lm).requires_grad_(False)
    trainer = GRPOTrainer(str(tmp_path), args=_config(), reward_model=reward_model)
    seen = []
    original = reward_model.forward
    reward_model.forward = lambda ids, lengths: seen.append(original(ids, lengths)) or seen[-1]
    metrics = trainer.step(PROMPTS)
    assert len(seen) == 1 and seen[0].shape == (32,)
    assert metrics["reward"] == pytest.approx(float(seen[0].double().mean()), rel=1e-6)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="num_generations=1 must be at least 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="temperature=0"):
        GRPOConfig(temperature=0)
    build_model(str(tmp_path))
    with pytest.raises(ValueError, match="reward_funcs must be a callable"):
        GRPOTrainer(str(tmp_path), [], _config())
    with pytest.raises(ValueError, match="exactly one of reward_funcs and reward_model"):
        GRPOTrainer(str(tmp_path), args=_config())
    trainer = GRPOTrainer(str(tmp_path), lambda prompts, completions, completion_ids: [1.0], _config(beta=0.0))
    with pytest.raises(ValueError, match="returned 1 scores for 32 completions"):
        trainer.step(PROMPTS)
