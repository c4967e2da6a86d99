"""Reward models (TRL's RewardTrainer names): a causal LM's body with a scalar head, trained on
chosen/rejected pairs with the pairwise (Bradley-Terry) loss ``-log sigmoid(r_chosen - r_rejected)``,
reporting pairwise accuracy. Saved as transformers' ``LlamaForSequenceClassification`` (one label):
the score of a sequence is the head applied to its last token's final hidden state.
"""

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from tidal.rlhf.epochs import train_epochs
from tidal.rlhf.sft import collate
from tidal.serve.config import resolve_device


@dataclasses.dataclass
class RewardConfig:
    """``train``: the DeepSpeed-style config of the training engine (its micro-batch counts pairs);
    ``center_rewards_coefficient``: TRL's incentive for rewards centred on 0 (``coef * mean(r^2)``)."""

    max_length: int = 512
    num_train_epochs: int = 1
    seed: int = 0
    device: str = "auto"  # where the model trains: "auto" (a GPU when there is one), "cpu", "cuda:N"
    center_rewards_coefficient: float | None = None
    train: dict = dataclasses.field(default_factory=lambda: {
        "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "gradient_clipping": 1.0})


def scalar_head(lm: nn.Module, seed: int = 0) -> nn.Linear:
    """A [hidden, 1] head on ``lm``'s device and dtype, initialised as TRL's value heads are
    (normal with standard deviation 1 / sqrt(hidden + 1), seeded)."""
    weight = next(lm.parameters())
    hidden = lm.config.hidden_size
    head = nn.Linear(hidden, 1, bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)) / (hidden + 1) ** 0.5)
    return head


class RewardModel(nn.Module):
    """``lm``'s final hidden state at each row's last token, through a [hidden, 1] score head."""

    def __init__(self, lm: nn.Module, seed: int = 0):
        super().__init__()
        self.lm, self.score = lm, scalar_head(lm, seed)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards [batch] (fp32) of right-padded ``input_ids`` [batch, seq] whose rows hold
        ``lengths`` real tokens."""
        hidden = self.lm.hidden_states(input_ids)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.score(last).squeeze(-1).float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float | None = None):
    """(Bradley-Terry loss, pairwise accuracy) of the rewards of chosen and rejected sequences."""
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * torch.cat((chosen, rejected)).square().mean()
    return loss, (chosen > rejected).float().mean()


class RewardTrainer:
    """Trains a reward model from ``model`` (a Hugging Face causal-LM directory) on pairs: dicts with
    ``chosen`` and ``rejected`` texts, and optionally a shared ``prompt`` before both."""

    def __init__(self, model: str, train_dataset: list[dict], args: RewardConfig | None = None,
                 tokenizer: str | None = None):
        import tidal
        from tidal.models import load_model
        from tidal.tokenizer import Tokenizer

        self.args = args or RewardConfig()
        self.model_dir, self.tokenizer_dir = model, tokenizer or model
        self.tokenizer = Tokenizer(self.tokenizer_dir)
        self.pairs = [(self.encode(e, "chosen"), self.encode(e, "rejected")) for e in train_dataset]
        if not self.pairs:
            raise ValueError("train_dataset holds no pairs")
        lm, self.model_config = load_model(model, device=resolve_device(self.args.device))
        lm.train()
        self.engine = tidal.initialize(RewardModel(lm, self.args.seed), self.args.train)
        self.pad_id = (self.tokenizer.eos_token_ids or [0])[0]

    def encode(self, example: dict, side: str) -> list[int]:
        if "chosen" not in example or "rejected" not in example:
            raise ValueError(f"a pair needs 'chosen' and 'rejected' (and optionally 'prompt'); got keys "
                             f"{sorted(example)}")
        ids = self.tokenizer.encode(example.get("prompt", "") + example[side])[: self.args.max_length]
        if not ids:
            raise ValueError(f"an example's {side!r} text encodes to no tokens")
        return ids

    def _rewards(self, rows: list[list[int]]) -> torch.Tensor:
        ids, _ = collate([(r, r) for r in rows], self.pad_id)
        device = next(self.engine.module.parameters()).device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        return self.engine(ids.to(device), lengths)

    def train(self, max_steps: int | None = None, log=print, start_step: int = 0, after_step=None) -> list[dict]:
        """Epochs over the pairs (shuffled per epoch) in the engine's batches, or up to optimizer step
        ``max_steps``; each step's loss and pairwise accuracy. ``start_step`` and ``after_step`` as
        in :meth:`SFTTrainer.train`."""
        engine = self.engine

        def micro_step(indices: list[int]) -> dict:
            batch = [self.pairs[i] for i in indices]
            rewards = self._rewards([c for c, _ in batch] + [r for _, r in batch])
            loss, accuracy = pairwise_loss(rewards[:len(batch)], rewards[len(batch):],
                                           self.args.center_rewards_coefficient)
            engine.backward(loss)
            engine.step()
            return {"loss": float(loss.detach()), "accuracy": float(accuracy)}

        def line(m: dict) -> str:
            return f"step {m['step']:>5}  epoch {m['epoch']}  loss {m['loss']:.4f}  accuracy {m['accuracy']:.3f}"
        return train_epochs(engine, len(self.pairs), self.args.num_train_epochs, self.args.seed, micro_step, line,
                            max_steps, log, start_step, after_step)

    @torch.no_grad()
    def evaluate(self, pairs: list[dict]) -> float:
        """Pairwise accuracy on ``pairs``."""
        encoded = [(self.encode(e, "chosen"), self.encode(e, "rejected")) for e in pairs]
        rewards = self._rewards([c for c, _ in encoded] + [r for _, r in encoded])
        return float((rewards[:len(encoded)] > rewards[len(encoded):]).float().mean())

    def save_model(self, out: str) -> None:
        """A transformers ``LlamaForSequenceClassification`` checkpoint (num_labels 1) in ``out``:
        the body's weights, ``score.weight``, and the tokenizer files."""
        import shutil

        from safetensors.torch import load_file, save_file

        from tidal.models.loader import save_model

        rm = self.engine.module
        save_model(rm.lm, out)
        tensors = {}
        for file in sorted(Path(out).glob("*.safetensors")):
            tensors.update(load_file(file))
            file.unlink()
        index = Path(out, "model.safetensors.index.json")
        index.unlink(missing_ok=True)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
        tensors["score.weight"] = rm.score.weight.detach().to("cpu", tensors["model.norm.weight"].dtype).contiguous()
        save_file(tensors, str(Path(out, "model.safetensors")), metadata={"format": "pt"})
        config = json.loads(Path(out, "config.json").read_text())
        config.update(architectures=[config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")],
                      num_labels=1, pad_token_id=self.pad_id, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        Path(out, "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if Path(self.tokenizer_dir, name).is_file():
                shutil.copy(Path(self.tokenizer_dir, name), Path(out, name))
