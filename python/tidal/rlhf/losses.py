"""The arithmetic of RLHF on per-token tensors ``[batch, tokens]`` with a response mask (1 on the
tokens the policy generated, 0 on prompt and padding): masked statistics, KL estimators, the
per-token rewards of PPO, generalised advantage estimation, PPO's clipped policy and value losses,
the adaptive KL controller, and GRPO's group-normalised advantages and clipped objective. Pure torch
and differentiable where a loss needs it; TRL's definitions, so its users' numbers carry over.
"""

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (along ``dim``, or all of them)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"masked_var needs at least 2 masked values for an unbiased variance, got {int(count)}")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``x`` scaled to unit variance over the masked positions (and centred when ``shift_mean``)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities:
    ``k1`` = log p - log q; ``abs`` = |k1|; ``mse`` = k1^2 / 2; ``k3`` = exp(-k1) - 1 + k1 (never
    negative, unbiased; what GRPO uses). Zero wherever the two agree."""
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "k3":
        return torch.exp(-diff) - 1 + diff
    raise ValueError(f"kind={kind!r} must be one of 'k1', 'abs', 'mse', 'k3'")


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token rewards: ``-kl_coef * KL`` at every response token, plus the sequence's score
    (``scores`` [batch]) at its last response token. Returns (rewards, per-token KL), both masked."""
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores.shape={tuple(scores.shape)} must be [batch={mask.shape[0]}]")
    maskf = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, kind) * maskf
    rewards = -kl_coef * kl
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every sequence needs at least one response token in mask")
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions[None, :] * (mask > 0)).argmax(1)  # the last masked position of each row
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens of each row (a value after the last
    response token counts as 0): ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam
    A_{t+1}``. Returns (advantages, returns = advantages + values), zero outside the mask."""
    maskf = mask.to(values.dtype)
    values, rewards = values * maskf, rewards * maskf
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * maskf[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * maskf


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: ``mean(max(-A r, -A clip(r, 1 - c, 1 + c)))`` over the masked tokens,
    ``r = exp(logprobs - old_logprobs)``. Returns (loss, {"clipfrac", "approx_kl"}) (approx_kl:
    the masked mean of (log r)^2 / 2)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio.square(), mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The critic's clipped loss: ``0.5 mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2))`` over the
    masked tokens. Returns (loss, {"clipfrac"})."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped = (values - returns).square()
    clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution of each position's logits (in fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, num_steps: int) -> None:
        pass


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): moved towards keeping the measured KL at
    ``target``, proportionally to the error clipped to +-20%, at a rate set by ``horizon`` (samples)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not (target > 0 and horizon > 0):
            raise ValueError(f"target={target} and horizon={horizon} must be positive")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, num_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_steps / self.horizon


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean (``group_size`` consecutive samples of
    one prompt), divided by the group's standard deviation (unbiased) + ``eps`` when ``scale``."""
    if rewards.dim() != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards.shape={tuple(rewards.shape)} must be [num_prompts * group_size={group_size}]")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.04, loss_type: str = "grpo", max_completion_length: int | None = None
              ) -> tuple[torch.Tensor, dict]:
    """GRPO's clipped objective with a k3 KL term to the reference (TRL's GRPOTrainer):
    per token ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta KL``, with ``A`` the sequence's
    advantage. ``loss_type``: "grpo" averages each sequence over its tokens, then over sequences;
    "bnpo" averages over all tokens of the batch; "dr_grpo" sums and divides by batch *
    ``max_completion_length``. Returns (loss, {"kl", "clip_ratio"})."""
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages.shape={tuple(advantages.shape)} must be [batch={logprobs.shape[0]}]")
    maskf = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * maskf).sum(1) / maskf.sum(1).clamp_min(1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * maskf).sum() / maskf.sum().clamp_min(1)
    elif loss_type == "dr_grpo":
        length = max_completion_length or mask.shape[1]
        loss = (per_token * maskf).sum() / (mask.shape[0] * length)
    else:
        raise ValueError(f"loss_type={loss_type!r} must be 'grpo', 'bnpo' or 'dr_grpo'")
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        stats = {"kl": masked_mean(kl, mask) if kl is not None else torch.zeros((), dtype=logprobs.dtype),
                 "clip_ratio": masked_mean(clipped.to(logprobs.dtype), mask)}
    return loss, stats


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token under ``logits`` (``[batch, T, vocab]`` predicting
    ``tokens`` ``[batch, T]``), in fp32, at the sampling ``temperature``."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature} must be positive and finite")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)
