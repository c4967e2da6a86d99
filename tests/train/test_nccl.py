"""The training engine on GPUs over NCCL: every ZeRO stage on 2 GPUs equals the single-process
AdamW reference (computed on the CPU, so the tolerance allows for GPU matmul rounding), and a
checkpoint saved on 2 GPUs resumes on 1."""

import pytest
import torch

from train_util import assert_state_close, reference, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_gpus_match_reference(stage, tmp_path):
    result = run(2, stage, [("train", 0, 3)], str(tmp_path / "out.pt"), device="cuda")
    assert result["global_steps"] == 3
    assert_state_close(result["state"], reference(3), rtol=1e-4, atol=1e-5)


def test_checkpoint_from_two_gpus_resumes_on_one(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run(2, 3, [("train", 0, 2), ("save", ckpt, None)], str(tmp_path / "a.pt"), device="cuda")
    result = run(1, 1, [("load", ckpt, None), ("train", 2, 4)], str(tmp_path / "b.pt"), device="cuda")
    assert_state_close(result["state"], reference(4), rtol=1e-4, atol=1e-5)
