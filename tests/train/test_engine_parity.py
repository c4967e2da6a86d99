"""tidal.initialize trains exactly like a single-process torch AdamW reference on the same global
batch: ZeRO stages 0-2, 1-3 ranks over Gloo, gradient accumulation and global-norm clipping (fp32,
within 1e-5 relative)."""

import pytest

from train_util import ACCUM, assert_state_close, reference, run

STEPS = 4


@pytest.mark.parametrize("world,stage", [(1, 0), (1, 2), (2, 0), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_matches_single_process_adamw(world, stage, tmp_path):
    result = run(world, stage, [("train", 0, STEPS)], str(tmp_path / "out.pt"))
    assert result["global_steps"] == STEPS
    assert result["boundaries"] == ([False] * (ACCUM - 1) + [True]) * STEPS
    assert_state_close(result["state"], reference(STEPS))
