"""tidal.rlhf.losses against plain-Python references written element by element (loops over rows and
tokens, no masking tricks): GAE, PPO's clipped policy and value losses, the KL estimators and PPO's
per-token rewards, whitening, the adaptive KL controller, GRPO's group advantages and its three loss
normalisations (values and gradients), entropy and token log-probabilities. A policy equal to the
reference has KL 0 and a ratio of 1 everywhere."""

import math

import pytest
import torch

from tidal.rlhf import losses as L

B, T = 4, 7
LENGTHS = [7, 3, 5, 1]  # response tokens per row; the rest is padding


def _mask():
    return torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_gae_matches_a_loop_per_row():
    rewards, values, mask = _rand(B, T, seed=1), _rand(B, T, seed=2), _mask()
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(LENGTHS):
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + 0.9 * v_next - values[b, t].item()
            a_next = delta + 0.9 * 0.8 * a_next
            assert adv[b, t].item() == pytest.approx(a_next, rel=1e-12, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(a_next + values[b, t].item(), rel=1e-12, abs=1e-12)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def _ref_masked_mean(x, lengths):
    items = [x[b, t] for b, n in enumerate(lengths) for t in range(n)]
    return sum(items) / len(items)


def test_ppo_policy_loss_matches_elementwise():
    logp, old, adv, mask = _rand(B, T, seed=3, scale=0.3), _rand(B, T, seed=4, scale=0.3), _rand(B, T, seed=5), _mask()
    logp.requires_grad_(True)
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    terms, clipped, kls = [], [], []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            r = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            u, c = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(u, c))
            clipped.append(float(c > u))
            kls.append(0.5 * (logp[b, t].item() - old[b, t].item()) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-12)
    loss.backward()
    assert (logp.grad[_mask() == 0] == 0).all()


def test_policy_equal_to_old_and_reference():
    logp, adv, mask = _rand(B, T, seed=6), _rand(B, T, seed=7), _mask()
    loss, stats = L.ppo_policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-L.masked_mean(adv, mask).item(), rel=1e-12)
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    for kind in ("k1", "abs", "mse", "k3"):
        assert (L.kl_estimate(logp, logp.clone(), kind) == 0).all()
    rewards, kl = L.token_rewards(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), logp, logp.clone(), mask,
                                  kl_coef=0.1)
    assert (kl == 0).all()
    g_loss, g_stats = L.grpo_loss(logp, logp.clone(), logp.clone(), adv[:, 0], mask, beta=0.1)
    assert g_stats["kl"].item() == 0 and g_stats["clip_ratio"].item() == 0


def test_kl_estimators_and_token_rewards():
    logp, ref, mask = _rand(B, T, seed=8, scale=0.5), _rand(B, T, seed=9, scale=0.5), _mask()
    d = logp - ref
    torch.testing.assert_close(L.kl_estimate(logp, ref, "k1"), d)
    torch.testing.assert_close(L.kl_estimate(logp, ref, "abs"), d.abs())
    torch.testing.assert_close(L.kl_estimate(logp, ref, "mse"), d * d / 2)
    torch.testing.assert_close(L.kl_estimate(logp, ref, "k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    assert (L.kl_estimate(logp, ref, "k3") >= 0).all()
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    rewards, kl = L.token_rewards(scores, logp, ref, mask, kl_coef=0.05)
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            want = -0.05 * d[b, t].item() if t < n else 0.0
            if t == n - 1:
                want += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="kind='k9'"):
        L.kl_estimate(logp, ref, "k9")
    with pytest.raises(ValueError, match="at least one response token"):
        L.token_rewards(scores, logp, ref, torch.zeros_like(mask), 0.1)


def test_value_loss_matches_elementwise():
    v, old, ret, mask = _rand(B, T, seed=10), _rand(B, T, seed=11), _rand(B, T, seed=12), _mask()
    loss, stats = L.ppo_value_loss(v, old, ret, mask, clip_range_value=0.3)
    terms, clipped = [], []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            vc = min(max(v[b, t].item(), old[b, t].item() - 0.3), old[b, t].item() + 0.3)
            u, c = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
            terms.append(max(u, c))
            clipped.append(float(c > u))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))


def test_whiten_and_masked_statistics():
    x, mask = _rand(B, T, seed=13, scale=3.0) + 5, _mask()
    items = [x[b, t].item() for b, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(items) / len(items)
    var = sum((i - mean) ** 2 for i in items) / (len(items) - 1)
    assert L.masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-12)
    assert L.masked_var(x, mask).item() == pytest.approx(var, rel=1e-12)
    w = L.masked_whiten(x, mask)
    assert L.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert L.masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert L.masked_mean(L.masked_whiten(x, mask, shift_mean=False), mask).item() == pytest.approx(mean, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 masked values"):
        L.masked_var(x, torch.zeros_like(mask))


def test_adaptive_kl_controller():
    c = L.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(9.0, 256)  # error 0.5 clipped to 0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    c.update(5.4, 100)  # error -0.1
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target=0"):
        L.AdaptiveKLController(0.1, target=0, horizon=1)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, -1.0, 3.0], dtype=torch.float64)
    adv = L.group_advantages(rewards, group_size=4)
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        for i, r in enumerate(group):
            assert adv[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-12, abs=1e-12)
    assert (adv[4:8] == 0).all()  # a group of equal rewards teaches nothing
    torch.testing.assert_close(L.group_advantages(rewards, 4, scale=False),
                               rewards - rewards.view(3, 4).mean(1).repeat_interleave(4))
    with pytest.raises(ValueError, match="group_size=5"):
        L.group_advantages(rewards, 5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_matches_elementwise(loss_type):
    logp, old, ref = (_rand(B, T, seed=s, scale=0.3) for s in (14, 15, 16))
    mask = _mask()
    adv = _rand(B, seed=17)
    logp.requires_grad_(True)
    loss, stats = L.grpo_loss(logp, old, ref, adv, mask, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
                              loss_type=loss_type, max_completion_length=10)

    def per_token(b, t, lp):
        r = torch.exp(lp - old[b, t])
        a = adv[b]
        kl = torch.exp(ref[b, t] - lp) - (ref[b, t] - lp) - 1
        return -torch.minimum(r * a, r.clamp(0.8, 1.28) * a) + 0.04 * kl

    lp = logp.detach().clone().requires_grad_(True)
    rows = [[per_token(b, t, lp[b, t]) for t in range(n)] for b, n in enumerate(LENGTHS)]
    if loss_type == "grpo":
        want = sum(sum(r) / len(r) for r in rows) / B
    elif loss_type == "bnpo":
        want = sum(sum(r) for r in rows) / sum(LENGTHS)
    else:
        want = sum(sum(r) for r in rows) / (B * 10)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    want.backward()
    torch.testing.assert_close(logp.grad, lp.grad, rtol=1e-12, atol=1e-15)
    assert 0 <= stats["clip_ratio"].item() <= 1 and stats["kl"].item() > 0
    with pytest.raises(ValueError, match="loss_type='sum'"):
        L.grpo_loss(logp, old, ref, adv, mask, loss_type="sum")
    with pytest.raises(ValueError, match="beta != 0 needs ref_logprobs"):
        L.grpo_loss(logp, old, None, adv, mask, beta=0.1)


def test_entropy_and_sequence_logprobs():
    logits = _rand(2, 3, 11, seed=18, scale=2.0)
    torch.testing.assert_close(L.entropy_from_logits(logits),
                               torch.distributions.Categorical(logits=logits.float()).entropy())
    tokens = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(19))
    got = L.sequence_logprobs(logits, tokens, temperature=0.7)
    for b in range(2):
        for t in range(3):
            row = (logits[b, t] / 0.7).tolist()
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            assert got[b, t].item() == pytest.approx(row[tokens[b, t]] - lse, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="temperature=0"):
        L.sequence_logprobs(logits, tokens, temperature=0)
