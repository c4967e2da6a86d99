"""RewardTrainer: the pairwise (Bradley-Terry) loss and accuracy against a plain formula; training on
pairs whose chosen side says "yes" raises pairwise accuracy on held-out pairs to 1; the saved
checkpoint is a transformers LlamaForSequenceClassification whose scores equal the trained model's."""

import math

import pytest
import torch
import transformers

from tidal.rlhf import RewardConfig, RewardTrainer
from tidal.rlhf.reward import pairwise_loss
from tiny_models import build_model


def _pairs(indices):
    return [{"prompt": f"item {i}:", "chosen": f" yes yes {i}", "rejected": f" no no {i}"} for i in indices]


def test_pairwise_loss():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    loss, accuracy = pairwise_loss(chosen, rejected)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6) and accuracy.item() == pytest.approx(1 / 3)
    centred, _ = pairwise_loss(chosen, rejected, center_coef=0.1)
    assert centred.item() == pytest.approx(want + 0.1 * torch.cat((chosen, rejected)).square().mean().item(), rel=1e-6)


def test_training_ranks_the_chosen_side_and_saves_for_transformers(tmp_path):
    build_model(str(tmp_path / "lm"))
    config = RewardConfig(num_train_epochs=8, device="cpu", train={"train_micro_batch_size_per_gpu": 4,
                                                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    trainer = RewardTrainer(str(tmp_path / "lm"), _pairs(range(16)), config)
    history = trainer.train(log=None)
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.evaluate(_pairs(range(100, 116))) == 1.0
    trainer.save_model(str(tmp_path / "rm"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32)
    rows = [trainer.encode(p, side) for p in _pairs([200, 201]) for side in ("chosen", "rejected")]
    with torch.no_grad():
        ours = trainer._rewards(rows)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [trainer.pad_id] * (width - len(r)) for r in rows])
        want = hf(ids).logits[:, 0]
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_errors(tmp_path):
    build_model(str(tmp_path))
    with pytest.raises(ValueError, match="a pair needs 'chosen' and 'rejected'"):
        RewardTrainer(str(tmp_path), [{"chosen": "a"}])
    with pytest.raises(ValueError, match="holds no pairs"):
        RewardTrainer(str(tmp_path), [])
