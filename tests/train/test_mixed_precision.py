"""Mixed precision through tidal.initialize: fp16 with the dynamic loss scaler (an overflow on one rank
skips the step on every rank, backs the scale off per hysteresis, is counted and logged once; the
scale grows after the window), bf16 close to an fp32 reference with fp32 master weights, and fp16 /
fp32 both learning a tiny regression task."""

import logging

import pytest
import torch

import precision_util as pu

STEPS = 6


def _scales(result):
    return [r["loss_scale"] for r in result["records"]]


@pytest.mark.parametrize("stage,hysteresis,overflow,scales", [
    # hysteresis 1: one overflow halves the scale; it doubles again after 3 good steps.
    (2, 1, {1: (1,)}, [256, 128, 128, 128, 256, 256]),
    # hysteresis 2: the first overflow spends the hysteresis, the second in a row backs off.
    (1, 2, {1: (1,), 2: (1,)}, [256, 256, 128, 128, 128, 256]),
])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(stage, hysteresis, overflow, scales, tmp_path):
    cfg = pu.config("fp16", stage, fp16={"hysteresis": hysteresis})
    results = pu.run(2, pu.train, (cfg, STEPS, overflow, True), str(tmp_path))
    skipped = set(overflow)
    for result in results:
        assert result["world"] == 2
        assert _scales(result) == scales, f"rank {result['rank']}"
        assert [r["skipped_steps"] for r in result["records"]] == \
            [sum(s <= step for s in skipped) for step in range(STEPS)]
        assert [r["global_steps"] for r in result["records"]] == list(range(1, STEPS + 1))
        # The rank with finite gradients did not step either: its own fp16 parameters are untouched.
        assert [r["local_params_changed"] for r in result["records"]] == [s not in skipped for s in range(STEPS)]
    for step, record in enumerate(results[0]["records"]):
        if step in skipped:
            pu.assert_states_equal(record["after"], record["before"])
        else:  # training goes on: the weights move, before and after the skipped steps
            assert any(not torch.equal(record["after"][k], record["before"][k]) for k in record["before"])
    pu.assert_states_equal(results[1]["state"], results[0]["state"])
    assert all(torch.isfinite(t).all() for t in results[0]["state"].values())


def test_fp16_scale_grows_after_the_window_without_overflow(caplog):
    with caplog.at_level(logging.WARNING, logger="tidal.train"):
        result = pu.run(1, pu.train, (pu.config("fp16"), STEPS), "")[0]
    assert _scales(result) == [256, 256, 512, 512, 512, 1024]  # window 3: doubles after every 3 good steps
    assert result["records"][-1]["skipped_steps"] == 0
    assert not [r for r in caplog.records if r.name == "tidal.train"]


def test_fp16_consecutive_skips_are_logged_once_in_a_compact_line(caplog):
    cfg = pu.config("fp16", fp16={"hysteresis": 2})
    with caplog.at_level(logging.DEBUG, logger="tidal.train"):
        result = pu.run(1, pu.train, (cfg, 4, {1: (0,), 2: (0,)}), "")[0]
    assert result["records"][-1]["skipped_steps"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "tidal.train"]
    assert len(lines) == 1, lines
    (line,) = lines
    assert "skipped" in line and "\n" not in line and len(line) < 120, line
    assert "256" in line and "step 1" in line, line


def test_fp16_static_loss_scale_value_does_not_change_the_trajectory():
    """Scaling the loss by a power of two scales every fp16 gradient exactly; unscaled, the updates match."""
    a = pu.run(1, pu.train, (pu.config("fp16", fp16={"loss_scale": 16.0}), 4), "")[0]
    b = pu.run(1, pu.train, (pu.config("fp16", fp16={"loss_scale": 64.0}), 4), "")[0]
    pu.assert_states_equal(a["state"], b["state"])


def test_fp16_dynamic_scale_growth_unscales_with_the_scale_backward_used():
    dynamic = pu.run(1, pu.train, (pu.config("fp16", fp16={"initial_scale_power": 4, "loss_scale_window": 2}),
                                   STEPS), "")[0]
    assert _scales(dynamic) == [16, 32, 32, 64, 64, 128]
    static = pu.run(1, pu.train, (pu.config("fp16", fp16={"loss_scale": 16.0}), STEPS), "")[0]
    pu.assert_states_equal(dynamic["state"], static["state"])


@pytest.mark.parametrize("world,stage", [(1, 0), (2, 2)])
def test_bf16_trains_close_to_the_fp32_reference(world, stage, tmp_path):
    steps = 10
    results = pu.run(world, pu.train, (pu.config("bf16", stage), steps), str(tmp_path))
    want, want_losses = pu.reference(steps)
    for result in results:
        assert result["world"] == world
        assert result["master_dtype"] == torch.float32
        assert result["param_dtypes"] == ["torch.bfloat16"]
        assert all(t.dtype == torch.float32 for t in result["state"].values())
        losses = [r["loss"] for r in result["records"]]
        assert losses[-1] == pytest.approx(want_losses[-1], rel=3e-2)
        for name, tensor in want.items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=2e-2, atol=2e-3,
                                       msg=lambda m: f"{name}: {m}")
    if world > 1:
        pu.assert_states_equal(results[1]["state"], results[0]["state"])


def test_fp16_and_fp32_both_learn_a_tiny_regression_task():
    steps = 40
    final = {}
    for precision in ("fp32", "fp16"):
        losses = [r["loss"] for r in pu.run(1, pu.train, (pu.config(precision), steps), "")[0]["records"]]
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        assert last < 0.2 * first, (precision, first, last)
        final[precision] = last
    assert final["fp16"] == pytest.approx(final["fp32"], rel=0.2)
