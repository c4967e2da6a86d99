"""GRPO on the GPU: a bf16 policy trained by tidal.initialize, its rollouts served from the same module
by tidal.LLM with CUDA graphs, the KV cache released during training and re-taken for each rollout at
the same address; the serving engine's log-probabilities of the sampled tokens agree with the training
forward's within bf16 tolerance (checked inside every step); a model directory without a tokenizer
takes and returns token ids."""

import torch

from conftest import gpu_only
from tidal.rlhf import GRPOConfig, GRPOTrainer
from tiny_models import assert_pool_whole, build_model

PROMPTS = [[5, 17, 33, 2], [40, 41, 42], [7, 7, 9, 100, 3], [250, 12]]
BF16_LOGPROB_TOLERANCE = 0.1  # nats; a wrong token or position would be off by ~1 or more


def low_ids(prompts, completions, completion_ids):
    return [sum(t < 100 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@gpu_only
def test_grpo_on_the_gpu_in_bf16_with_the_kv_cache_released(tmp_path):
    build_model(str(tmp_path))  # fp32 on disk; the engine trains it in bf16 and serves that
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink(missing_ok=True)
    config = GRPOConfig(num_generations=8, max_completion_length=24, beta=0.04, seed=1, device="cuda",
                        logprob_tolerance=BF16_LOGPROB_TOLERANCE,
                        train={"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
                               "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                               "optimizer": {"type": "AdamW", "params": {"lr": 2e-2}}, "gradient_clipping": 1.0},
                        llm={"num_kv_blocks": 256, "block_size": 16, "max_model_len": 64, "max_num_seqs": 32})
    trainer = GRPOTrainer(str(tmp_path), low_ids, config)
    llm = trainer.llm
    assert llm.tokenizer is None and llm.engine.runner.use_graphs and llm.is_sleeping
    assert next(trainer.engine.module.parameters()).dtype == torch.bfloat16
    address = llm.engine.kv_caches[0][0].data_ptr()
    history = trainer.train(PROMPTS, steps=4, log=None)
    assert all(m["logprob_error"] < BF16_LOGPROB_TOLERANCE for m in history), [m["logprob_error"] for m in history]
    assert all(m["completion_tokens"] > 0 for m in history)
    assert history[-1]["kl"] > 0  # it trained
    assert llm.is_sleeping and llm.engine.kv_caches[0][0].data_ptr() == address
    assert_pool_whole(llm)
