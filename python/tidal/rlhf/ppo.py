"""PPO with a critic (TRL's PPOTrainer names), on one engine pair: the actor trains under
``tidal.initialize`` and its rollouts come from ``tidal.LLM`` serving the same module in place (at
ZeRO stage 3 a copy refreshed from the gathered weights after each step).

A step: each prompt is sampled once per ``num_generations``; the score of a completion comes from
the reward functions (their scores add up) or a :class:`~tidal.rlhf.reward.RewardModel`; each
response token's reward is ``-kl_coef * KL`` to the frozen reference, plus the score at the last
token; the critic's values give advantages by GAE (whitened) and returns; then ``num_ppo_epochs``
passes over the batch in minibatches of the engines' micro-batch train the actor on the clipped
policy loss and the critic on the clipped value loss. The KL coefficient is fixed, or adaptive
(``target_kl`` set) as in Ziegler et al.
"""

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from tidal.rlhf import losses, rollout
from tidal.rlhf.reward import scalar_head
from tidal.serve.config import resolve_device


@dataclasses.dataclass
class PPOConfig:
    """``train`` / ``critic_train``: DeepSpeed-style configs of the actor's and the critic's engines;
    ``llm``: the serving engine's keyword arguments; ``release_kv_cache``: the serving engine's KV
    cache memory is given back during training (``LLM.sleep``) and taken again for each rollout."""

    num_generations: int = 1
    max_completion_length: int = 64
    num_ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    target_kl: float | None = None
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    seed: int = 0
    device: str = "auto"  # where the model trains: "auto" (a GPU when there is one), "cpu", "cuda:N"
    logprob_tolerance: float = 1e-3
    train: dict = dataclasses.field(default_factory=lambda: {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "gradient_clipping": 1.0})
    critic_train: dict | None = None
    llm: dict = dataclasses.field(default_factory=dict)
    release_kv_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("num_generations", "max_completion_length", "num_ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


class ValueModel(nn.Module):
    """A causal LM's body with a per-token scalar head: the critic."""

    def __init__(self, lm: nn.Module, seed: int = 0):
        super().__init__()
        self.lm, self.head = lm, scalar_head(lm, seed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Values [batch, seq] (fp32): position t's value of the sequence so far."""
        return self.head(self.lm.hidden_states(input_ids)).squeeze(-1).float()


class PPOTrainer:
    """Trains the causal LM in ``model`` (a Hugging Face directory) with a critic initialised from
    ``value_model`` (default: the same weights) against ``reward_funcs`` (callables as GRPOTrainer's)
    or ``reward_model`` (a :class:`~tidal.rlhf.reward.RewardModel`, frozen)."""

    def __init__(self, model: str, reward_funcs: Callable | list[Callable] | None = None,
                 args: PPOConfig | None = None, reward_model: nn.Module | None = None,
                 value_model: str | None = None, tokenizer: str | None = None):
        import tidal
        from tidal.models import load_model

        self.args = args = args or PPOConfig()
        self.reward_funcs = rollout.reward_functions(reward_funcs, reward_model)
        self.reward_model = reward_model
        actor, _ = load_model(model, device=resolve_device(args.device))
        actor.train()
        self.actor = tidal.initialize(actor, args.train)
        device = next(actor.parameters()).device
        self.reference, _ = load_model(model, device=device)
        self.reference.requires_grad_(False)
        critic_lm, _ = load_model(value_model or model, device=device)
        critic_lm.train()
        self.critic = tidal.initialize(ValueModel(critic_lm, args.seed), args.critic_train or args.train)
        self.kl_ctl = (losses.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
                       if args.target_kl is not None else losses.FixedKLController(args.kl_coef))
        self.served = rollout.ServedPolicy(self.actor, model, tokenizer, args.llm, args.release_kv_cache)
        self.llm = self.served.llm
        self.step_count = 0

    def step(self, prompts: list) -> dict:
        """One PPO step over ``prompts`` (strings, or token-id lists); returns its metrics."""
        import tidal

        args = self.args
        t0 = time.perf_counter()
        repeated = [p for p in prompts for _ in range(args.num_generations)]
        params = [tidal.SamplingParams(temperature=1.0, max_tokens=args.max_completion_length, logprobs=0,
                                       seed=args.seed + self.step_count * len(repeated) + i)
                  for i in range(len(repeated))]
        outputs = self.served.generate(repeated, params)
        generation_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        completions = [o.outputs[0] for o in outputs]
        completion_ids = [list(c.token_ids) for c in completions]
        prompt_ids = [list(o.prompt_token_ids) for o in outputs]
        texts = [c.text for c in completions] if self.llm.tokenizer is not None else completion_ids
        ids, mask = rollout.batch(prompt_ids, completion_ids)
        device = next(self.actor.module.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], device=device)
        scores = rollout.score(self.reward_funcs, repeated, texts, completion_ids, self.reward_model, ids,
                               lengths).float().to(device)
        micro = self.actor.config.train_micro_batch_size_per_gpu
        with torch.no_grad():
            old_logprobs = rollout.next_token_logprobs(self.actor, ids, chunk=micro)
            ref_logprobs = rollout.next_token_logprobs(self.reference, ids, chunk=micro)
            old_values = torch.cat([self.critic(ids[lo:lo + micro]) for lo in range(0, ids.shape[0], micro)])
        logprob_error = rollout.check_logprobs(rollout.serving_logprobs(prompt_ids, completions, mask.shape),
                                               old_logprobs, mask, args.logprob_tolerance)
        rewards, kl = losses.token_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl_ctl.value,
                                           args.kl_estimator)
        advantages, returns = losses.gae(rewards, old_values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask) * mask

        if len(repeated) % micro:
            raise ValueError(f"{len(repeated)} sequences per step must be a multiple of "
                             f"train_micro_batch_size_per_gpu={micro}")
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                                    "entropy": 0.0}
        share = micro / len(repeated) / args.num_ppo_epochs
        gen = torch.Generator().manual_seed(args.seed + self.step_count)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(repeated), generator=gen).to(device)
            for lo in range(0, len(repeated), micro):
                part = order[lo:lo + micro]
                logits = self.actor(ids[part])
                logp = rollout.logprobs_from_logits(logits, ids[part])
                policy_loss, p = losses.ppo_policy_loss(logp, old_logprobs[part], advantages[part], mask[part],
                                                        args.cliprange)
                self.actor.backward(policy_loss)
                self.actor.step()
                values = self.critic(ids[part])
                value_loss, v = losses.ppo_value_loss(values, old_values[part], returns[part], mask[part],
                                                      args.cliprange_value)
                self.critic.backward(args.vf_coef * value_loss)
                self.critic.step()
                with torch.no_grad():
                    entropy = losses.masked_mean(losses.entropy_from_logits(logits[:, :-1]),
                                                 mask[part][:, :-1])
                for name, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                                    ("clipfrac", p["clipfrac"]), ("approx_kl", p["approx_kl"]), ("entropy", entropy)):
                    stats[name] += float(value.detach()) * share
        mean_kl = float((kl * mask).sum(1).mean())
        self.kl_ctl.update(mean_kl, len(repeated))
        training_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        self.served.sync()
        sync_s = time.perf_counter() - t2
        self.step_count += 1
        tokens = sum(len(c) for c in completion_ids)
        return {"step": self.step_count, "reward": float(scores.mean()), "kl": mean_kl, "kl_coef": self.kl_ctl.value,
                **stats, "completion_tokens": tokens, "generation_s": generation_s, "training_s": training_s,
                "sync_s": sync_s, "kv_wake_up_s": self.served.wake_up_s,
                "generation_tokens_per_s": tokens / max(generation_s, 1e-9),
                "training_tokens_per_s": int(lengths.sum()) * args.num_ppo_epochs / max(training_s, 1e-9),
                "logprob_error": logprob_error}

    def train(self, prompts: list, steps: int, log: Callable[[str], None] | None = print) -> list[dict]:
        """``steps`` steps over all of ``prompts``; a log line per step; the metrics of each."""
        return rollout.train_loop(self.step, prompts, steps, lambda m: (
            f"step {m['step']:>4}  reward {m['reward']:.3f}  kl {m['kl']:.4f} (coef {m['kl_coef']:.4f})  "
            f"policy {m['policy_loss']:+.4f}  value {m['value_loss']:.4f}  entropy {m['entropy']:.3f}  "
            f"generation {m['generation_s']:.2f} s ({m['generation_tokens_per_s']:,.0f} tok/s)  "
            f"training {m['training_s']:.2f} s ({m['training_tokens_per_s']:,.0f} tok/s)  sync {m['sync_s']:.3f} s"), log)
