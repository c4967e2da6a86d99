"""The fp16 loss scalers: DeepSpeed's trajectory step by step, hysteresis, floor, growth, logging, state."""

import logging

import pytest
import torch

from tidal.train import DynamicLossScaler, StaticLossScaler, has_overflow

O, G = True, False  # an overflowing step, a good step


def run(scaler, seq):
    return [(scaler.update(x), scaler.scale) for x in seq]


def test_scripted_trajectory():
    s = DynamicLossScaler(initial_scale=2.0**10, scale_window=3, hysteresis=2, min_scale=1.0)
    got = run(s, [G, G, G, O, O, O, G, G, G, G, G, G, O, O])
    assert got == [
        (False, 1024), (False, 1024), (False, 2048),  # 3 good steps from the start: grow
        (True, 2048),                                 # first overflow spends the hysteresis
        (True, 1024), (True, 512),                    # then every overflow halves
        (False, 512), (False, 512), (False, 1024),    # window since the last overflow: grow, refill
        (False, 1024), (False, 1024), (False, 2048),  # and again every window
        (True, 2048), (True, 1024),                   # hysteresis was refilled by the growth
    ]


def test_hysteresis_not_refilled_by_good_steps():
    s = DynamicLossScaler(initial_scale=64.0, scale_window=100, hysteresis=3)
    assert run(s, [O, G, O, G, O, O]) == [(True, 64), (False, 64), (True, 64), (False, 64), (True, 32), (True, 16)]


def test_consecutive_hysteresis():
    s = DynamicLossScaler(initial_scale=64.0, scale_window=100, hysteresis=2, consecutive_hysteresis=True)
    assert run(s, [O, G, O, G, O, O, O]) == [(True, 64), (False, 64), (True, 64), (False, 64), (True, 64),
                                             (True, 32), (True, 16)]


def test_min_scale_floor():
    s = DynamicLossScaler(initial_scale=8.0, scale_window=100, hysteresis=1, min_scale=2.0)
    assert run(s, [O, O]) == [(True, 4.0), (True, 2.0)]
    with pytest.raises(RuntimeError, match="minimum loss scale 2"):
        s.update(True)
    s = DynamicLossScaler(initial_scale=8.0, scale_window=100, hysteresis=1, min_scale=3.0,
                          raise_error_at_min_scale=False)
    assert run(s, [O, O, O]) == [(True, 4.0), (True, 3.0), (True, 3.0)]


def test_window_growth():
    s = DynamicLossScaler(initial_scale=1.0, scale_window=5, hysteresis=1)
    scales = [scale for _, scale in run(s, [G] * 15)]
    assert scales == [1.0] * 4 + [2.0] * 5 + [4.0] * 5 + [8.0]


def test_skip_logged_once_per_run(caplog):
    caplog.set_level(logging.INFO, logger="tidal.train")
    s = DynamicLossScaler(initial_scale=2.0**16, scale_window=1000, hysteresis=1, raise_error_at_min_scale=False)
    s.update(True)
    assert len(caplog.records) == 1
    assert "skipped" in caplog.records[0].getMessage() and "65536 -> 32768" in caplog.records[0].getMessage()
    for _ in range(249):
        s.update(True)
    assert len(caplog.records) == 3  # the first, the 100th and the 200th of the run
    assert all(r.name == "tidal.train" and "\n" not in r.getMessage() for r in caplog.records)
    s.update(False)
    s.update(True)  # a new run of skips logs again
    assert len(caplog.records) == 4


def test_static_scaler_skips_on_overflow(caplog):
    caplog.set_level(logging.INFO, logger="tidal.train")
    s = StaticLossScaler(128.0)
    assert run(s, [G, O, O, G]) == [(False, 128.0), (True, 128.0), (True, 128.0), (False, 128.0)]
    assert len(caplog.records) == 1
    t = StaticLossScaler(1.0)
    t.load_state_dict(s.state_dict())
    assert t.cur_iter == 4 and t.scale == 1.0


def test_state_round_trip():
    a = DynamicLossScaler(initial_scale=256.0, scale_window=4, hysteresis=2)
    run(a, [G, O, G, G, O, O, G])
    b = DynamicLossScaler(initial_scale=256.0, scale_window=4, hysteresis=2)
    b.load_state_dict(a.state_dict())
    seq = [G, G, G, O, G, O, O, G, G, G, G, G]
    assert run(b, seq) == run(a, seq)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hysteresis=0"):
        DynamicLossScaler(hysteresis=0)
    with pytest.raises(ValueError, match="scale_window=0"):
        DynamicLossScaler(scale_window=0)
    with pytest.raises(ValueError, match="scale=0"):
        StaticLossScaler(0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_has_overflow(bad, dtype):
    ts = [torch.ones(3, 4, dtype=dtype), torch.full((5,), 60000.0).to(dtype), None]
    assert not has_overflow(ts)
    ts.append(torch.zeros(7, dtype=dtype))
    ts[-1][3] = bad
    assert has_overflow(ts)
    assert not has_overflow([])
    assert not has_overflow([torch.arange(4)])
