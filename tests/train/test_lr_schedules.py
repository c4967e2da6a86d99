"""The learning-rate schedules against DeepSpeed's formulas, written out independently here."""

import math

import pytest

from tidal.train import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


def warmup_gamma(t, w, kind):
    return math.log(t + 1) / math.log(w) if kind == "log" else t / w


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr(kind):
    lo, hi, w = 1e-5, 1e-3, 10
    s = WarmupLR(warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=w, warmup_type=kind)
    assert s.get_lr() == 0.0  # before the first step(), as DeepSpeed
    for t in (0, 1, 5, 9):
        assert s.get_lr(t) == pytest.approx(lo + (hi - lo) * warmup_gamma(t, w, kind), rel=1e-12)
    assert s.get_lr(0) == pytest.approx(lo)
    for t in (10, 11, 1000):
        assert s.get_lr(t) == pytest.approx(hi)
    assert [s.step() for _ in range(3)] == [s.get_lr(0), s.get_lr(1), s.get_lr(2)]
    assert s.last_batch_iteration == 2


def test_warmup_min_steps_is_two():
    s = WarmupLR(warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=1, warmup_type="linear")
    assert s.get_lr(1) == pytest.approx(0.5) and s.get_lr(2) == 1.0


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_decay_lr(kind):
    lo, hi, w, total = 1e-4, 2e-3, 8, 40
    s = WarmupDecayLR(total_num_steps=total, warmup_min_lr=lo, warmup_max_lr=hi, warmup_num_steps=w, warmup_type=kind)
    assert s.get_lr(0) == pytest.approx(lo)
    assert s.get_lr(4) == pytest.approx(lo + (hi - lo) * warmup_gamma(4, w, kind))
    assert s.get_lr(w) == pytest.approx(hi)  # end of warmup: gamma = (T - W) / (T - W)
    mid = 24
    assert s.get_lr(mid) == pytest.approx(lo + (hi - lo) * (total - mid) / (total - w))
    assert s.get_lr(total) == pytest.approx(lo)
    assert s.get_lr(total + 5) == pytest.approx(lo)


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_cosine_lr(kind):
    base, w, total, r0, rmin = 3e-4, 10, 110, 0.1, 0.01
    s = WarmupCosineLR(base, total_num_steps=total, warmup_min_ratio=r0, warmup_num_steps=w, cos_min_ratio=rmin,
                       warmup_type=kind)
    assert s.get_lr(0) == pytest.approx(base * r0)
    assert s.get_lr(5) == pytest.approx(base * (r0 + (1 - r0) * warmup_gamma(5, w, kind)))

    def cosine(t):
        progress = (t - w + 1) / (total - w)
        return base * (rmin + (1 - rmin) * 0.5 * (1 + math.cos(math.pi * progress)))

    assert s.get_lr(w) == pytest.approx(cosine(w)) and s.get_lr(w) < base
    assert s.get_lr(w - 1 + 50) == pytest.approx(base * (rmin + (1 - rmin) * 0.5))  # halfway: cos = 0
    assert s.get_lr(total - 1) == pytest.approx(base * rmin)  # the end of the cosine


def test_state_round_trip():
    a = WarmupDecayLR(total_num_steps=100, warmup_num_steps=10, warmup_type="linear")
    for _ in range(17):
        a.step()
    b = WarmupDecayLR(total_num_steps=100, warmup_num_steps=10, warmup_type="linear")
    b.load_state_dict(a.state_dict())
    assert b.get_lr() == a.get_lr() and b.step() == a.step()
    assert a.state_dict() == {"last_batch_iteration": 17}


def test_build_scheduler():
    cosine = build_scheduler({"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 5}}, 0.5)
    assert isinstance(cosine, WarmupCosineLR) and cosine.base_lr == 0.5 and cosine.cos_min_ratio == 0.0001
    warm = build_scheduler({"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}, 0.5)
    assert warm.get_lr(10_000) == 0.01  # WarmupLR sets the rate itself, ignoring base_lr
    assert build_scheduler(None, 0.1) is None


@pytest.mark.parametrize("make, match", [
    (lambda: WarmupLR(warmup_type="cosine"), "warmup_type='cosine'"),
    (lambda: WarmupLR(warmup_num_steps=-1), "warmup_num_steps=-1"),
    (lambda: WarmupLR(warmup_max_lr=-0.1), "warmup_max_lr=-0.1"),
    (lambda: WarmupDecayLR(total_num_steps=0), "total_num_steps=0"),
    (lambda: WarmupCosineLR(1.0, total_num_steps=10, warmup_num_steps=10), "total_num_steps=10"),
    (lambda: WarmupCosineLR(1.0, total_num_steps=100, cos_min_ratio=1.5), "cos_min_ratio=1.5"),
    (lambda: build_scheduler({"type": "WarmupDecayLR", "params": {}}, 1.0), "total_num_steps"),
    (lambda: build_scheduler({"type": "WarmupLR", "params": {"warmup_max": 1.0}}, 1.0), "warmup_max"),
    (lambda: build_scheduler({"type": "OneCycle", "params": {}}, 1.0), "OneCycle"),
])
def test_bad_params(make, match):
    with pytest.raises(ValueError, match=match):
        make()
