#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""GRPO on the demo model with a programmatic reward, on the CPU in a few minutes.

The demo model (``tidal demo``'s small Llama trained on the Python standard library; trained first
when it is not cached) completes Python-looking prompts; the reward is 1 for a completion that
contains the word ``--target`` (default ``return``) and 0 otherwise. GRPOTrainer samples each prompt
8 times from tidal.LLM serving the policy's own weights, and the policy learns to say the word:
the mean reward climbs within a few dozen steps, drawn at the end as a small curve (on 2 CPU cores:
from 0.02 to above 0.9 in 10 steps, after the demo model's 2-minute training). Nothing else being
rewarded, the policy ends up saying little but the word: the greedy completion printed at the end
shows that reward hacking plainly.

    python examples/rlhf/grpo_demo.py [--steps 30] [--target return]
"""

import argparse

import tidal
from tidal import demo
from tidal.rlhf import GRPOConfig, GRPOTrainer

PROMPTS = ["def ", "class ", "import ", "    self.", "for ", "if ", "x = ", "    def "]


def curve(values: list[float], width: int = 40) -> str:
    lines = []
    for step, v in enumerate(values, 1):
        lines.append(f"{step:>4} {v:5.2f} |{'#' * round(v * width)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--target", default="return", help="the word the reward asks for")
    ap.add_argument("--cache-dir", default=None, help="where the demo model is kept")
    args = ap.parse_args()
    path = demo.ensure_model(args.cache_dir, size="small", device="cpu")

    def says_target(prompts, completions, completion_ids):
        return [1.0 if args.target in text else 0.0 for text in completions]

    config = GRPOConfig(
        num_generations=8, max_completion_length=24, temperature=1.0, beta=0.02, seed=0,
        train={"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "weight_decay": 0.0}}},
        llm={"device": "cpu", "num_kv_blocks": 512, "block_size": 16, "max_model_len": 128})
    trainer = GRPOTrainer(str(path), says_target, config)
    history = trainer.train(PROMPTS, steps=args.steps)
    print(f"\nmean reward per step (completions containing {args.target!r}):")
    print(curve([m["reward"] for m in history]))
    sample = trainer.llm.generate(["def "], tidal.SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    print("\na greedy completion of 'def ' now:", repr(sample[0].outputs[0].text))


if __name__ == "__main__":
    main()
