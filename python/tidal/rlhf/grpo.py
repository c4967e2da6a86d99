"""GRPO (group relative policy optimisation) on one engine pair: the policy trains under
``tidal.initialize`` and its rollouts come from ``tidal.LLM`` serving the same module in place, so no
weights are copied between the two (at ZeRO stage 3, whose parameters exist only while gathered, the
serving engine holds a copy refreshed from the gathered weights after each step).

A step: every prompt is sampled ``num_generations`` times; the reward functions score each completion
(their scores add up); each score minus its group's mean (divided by the group's standard deviation)
is the completion's advantage; the policy takes ``num_iterations`` optimizer steps on GRPO's clipped
objective (:func:`tidal.rlhf.losses.grpo_loss`) with a k3 KL term to a frozen reference copy of the
initial weights (``beta`` 0 skips the reference). At temperature 1 the old policy's log-probabilities
are the serving engine's own, checked against the training forward on the same tokens.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from tidal.rlhf import losses, rollout
from tidal.serve.config import resolve_device

RewardFunc = Callable[..., Sequence[float]]


@dataclasses.dataclass
class GRPOConfig:
    """TRL's GRPOConfig names. ``train`` is the DeepSpeed-style config of the policy's training
    engine (its micro-batch splits each step's ``num_prompts * num_generations`` sequences); ``llm``
    the keyword arguments of the serving engine (``num_kv_blocks``, ``block_size``, ...);
    ``release_kv_cache`` gives the serving engine's KV cache memory back during training
    (``LLM.sleep``) and takes it again for each rollout."""

    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    num_iterations: int = 1
    scale_rewards: bool = True
    seed: int = 0
    device: str = "auto"  # where the model trains: "auto" (a GPU when there is one), "cpu", "cuda:N"
    logprob_tolerance: float = 1e-3
    train: dict = dataclasses.field(default_factory=lambda: {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "gradient_clipping": 1.0})
    llm: dict = dataclasses.field(default_factory=dict)
    release_kv_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations} must be at least 2 (advantages are relative "
                             "to the group)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be positive")


class GRPOTrainer:
    """Trains ``model`` (a Hugging Face directory) against ``reward_funcs``: callables taking
    ``prompts`` and ``completions`` (lists of strings, or of token-id lists when the model has no
    tokenizer) and ``completion_ids``, returning one float per completion; or against
    ``reward_model`` (a :class:`~tidal.rlhf.reward.RewardModel`, frozen) scoring prompt + completion."""

    def __init__(self, model: str, reward_funcs: RewardFunc | list[RewardFunc] | None = None,
                 args: GRPOConfig | None = None, tokenizer: str | None = None, reward_model=None):
        import tidal
        from tidal.models import load_model

        self.args = args or GRPOConfig()
        self.reward_funcs = rollout.reward_functions(reward_funcs, reward_model)
        self.reward_model = reward_model
        policy, _ = load_model(model, device=resolve_device(self.args.device))
        policy.train()
        self.engine = tidal.initialize(policy, self.args.train)
        self.reference = None
        if self.args.beta != 0.0:
            self.reference, _ = load_model(model, device=next(policy.parameters()).device)
            self.reference.requires_grad_(False)
        self.served = rollout.ServedPolicy(self.engine, model, tokenizer, self.args.llm, self.args.release_kv_cache)
        self.llm = self.served.llm
        self.step_count = 0

    # ---- one step ---------------------------------------------------------------------------------

    def step(self, prompts: list) -> dict:
        """One GRPO step over ``prompts`` (strings, or token-id lists); returns its metrics."""
        import tidal

        args, g = self.args, self.args.num_generations
        t0 = time.perf_counter()
        repeated = [p for p in prompts for _ in range(g)]
        params = [tidal.SamplingParams(temperature=args.temperature, max_tokens=args.max_completion_length,
                                       seed=args.seed + self.step_count * len(repeated) + i,
                                       logprobs=0 if args.temperature == 1.0 else None)
                  for i in range(len(repeated))]
        outputs = self.served.generate(repeated, params)
        generation_s = time.perf_counter() - t0

        completions = [o.outputs[0] for o in outputs]
        completion_ids = [list(c.token_ids) for c in completions]
        texts = [c.text for c in completions] if self.llm.tokenizer is not None else completion_ids
        t1 = time.perf_counter()
        prompt_ids = [list(o.prompt_token_ids) for o in outputs]
        ids, mask = rollout.batch(prompt_ids, completion_ids)
        device = next(self.engine.module.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], device=device)
        rewards = rollout.score(self.reward_funcs, repeated, texts, completion_ids, self.reward_model, ids, lengths)
        advantages = losses.group_advantages(rewards, g, scale=args.scale_rewards).float().to(device)
        micro = self.engine.config.train_micro_batch_size_per_gpu
        with torch.no_grad():
            old = rollout.next_token_logprobs(self.engine, ids, args.temperature, chunk=micro)
            ref = (None if self.reference is None
                   else rollout.next_token_logprobs(self.reference, ids, args.temperature, chunk=micro))
        logprob_error = 0.0
        if args.temperature == 1.0:  # the serving engine's logprobs are of the untempered distribution
            logprob_error = rollout.check_logprobs(rollout.serving_logprobs(prompt_ids, completions, mask.shape), old,
                                                   mask, args.logprob_tolerance)

        if len(repeated) % micro:
            raise ValueError(f"{len(prompts)} prompts x num_generations={g} = {len(repeated)} sequences must be a "
                             f"multiple of train_micro_batch_size_per_gpu={micro}")
        stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0}
        for _ in range(args.num_iterations):
            for lo in range(0, len(repeated), micro):
                part = slice(lo, lo + micro)
                logp = rollout.next_token_logprobs(self.engine, ids[part], args.temperature)
                loss, s = losses.grpo_loss(logp, old[part], None if ref is None else ref[part], advantages[part],
                                           mask[part], epsilon_low=args.epsilon,
                                           epsilon_high=args.epsilon_high or args.epsilon, beta=args.beta,
                                           loss_type=args.loss_type, max_completion_length=args.max_completion_length)
                self.engine.backward(loss)
                self.engine.step()
                share = micro / len(repeated) / args.num_iterations
                stats["loss"] += float(loss.detach()) * share
                stats["kl"] += float(s["kl"]) * share
                stats["clip_ratio"] += float(s["clip_ratio"]) * share
        training_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        self.served.sync()
        sync_s = time.perf_counter() - t2
        self.step_count += 1
        tokens = sum(len(c) for c in completion_ids)
        return {"step": self.step_count, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                **stats, "completion_tokens": tokens, "generation_s": generation_s, "training_s": training_s,
                "sync_s": sync_s, "kv_wake_up_s": self.served.wake_up_s,
                "generation_tokens_per_s": tokens / max(generation_s, 1e-9),
                "training_tokens_per_s": int(lengths.sum()) * args.num_iterations / max(training_s, 1e-9),
                "logprob_error": logprob_error}

    def train(self, prompts: list, steps: int, log: Callable[[str], None] | None = print) -> list[dict]:
        """``steps`` steps, each over all of ``prompts``; a log line per step; the metrics of each."""
        return rollout.train_loop(self.step, prompts, steps, lambda m: (
            f"step {m['step']:>4}  reward {m['reward']:.3f}  kl {m['kl']:.4f}  loss {m['loss']:+.4f}  "
            f"generation {m['generation_s']:.2f} s ({m['generation_tokens_per_s']:,.0f} tok/s)  "
            f"training {m['training_s']:.2f} s ({m['training_tokens_per_s']:,.0f} tok/s)  sync {m['sync_s']:.3f} s"), log)
