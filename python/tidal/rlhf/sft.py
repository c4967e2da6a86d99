"""Supervised fine-tuning (TRL's SFTTrainer names): next-token cross-entropy on the completion tokens
of prompt/completion pairs, with the prompt's tokens masked out of the loss.

Examples are dicts: ``{"prompt", "completion"}``; ``{"messages": [...]}`` (rendered by the
tokenizer's chat template: every message but the last, which must be the assistant's, is the prompt,
with the generation prompt appended; the last message's content is the completion); or
``{"text"}`` (a loss on every token). The completion ends with the tokenizer's EOS token. With
``packing`` the tokenized examples are concatenated and cut into rows of exactly ``max_length``
tokens (each keeping its own loss mask; a row's later examples attend to its earlier ones, as in
TRL's original packing), so short examples waste no padding.
"""

import dataclasses

import torch

from tidal.rlhf.epochs import train_epochs
from tidal.serve.config import resolve_device

IGNORE = -100


@dataclasses.dataclass
class SFTConfig:
    """``train``: the DeepSpeed-style config of the training engine (its batch sizes set each
    step's rows)."""

    max_length: int = 512
    packing: bool = False
    completion_only_loss: bool = True
    num_train_epochs: int = 1
    seed: int = 0
    device: str = "auto"  # where the model trains: "auto" (a GPU when there is one), "cpu", "cuda:N"
    train: dict = dataclasses.field(default_factory=lambda: {
        "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 2e-5}},
        "gradient_clipping": 1.0})

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be at least 2")
        if self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs={self.num_train_epochs} must be at least 1")


def tokenize_example(tokenizer, example: dict, completion_only_loss: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE (-100) where no loss is taken."""
    eos = tokenizer.eos_token_ids[:1]
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise ValueError("an example's 'messages' must be a non-empty list ending with an assistant message")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        completion = messages[-1].get("content") or ""
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif "prompt" in example and "completion" in example:
        prompt_ids = tokenizer.encode(example["prompt"])
        completion = example["completion"]
    elif "text" in example:
        ids = tokenizer.encode(example["text"]) + eos
        return ids, list(ids)
    else:
        raise ValueError(f"an example needs 'prompt' and 'completion', 'messages' or 'text'; got keys "
                         f"{sorted(example)}")
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + eos
    ids = prompt_ids + completion_ids
    labels = ([IGNORE] * len(prompt_ids) if completion_only_loss else list(prompt_ids)) + completion_ids
    return ids, labels


def pack(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """The examples concatenated in order and cut into rows of ``max_length`` (the tail shorter)."""
    ids = [t for e, _ in examples for t in e]
    labels = [t for _, lab in examples for t in lab]
    return [(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [rows, longest] ids (``pad_id``) and labels (IGNORE on padding)."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for i, (r, lab) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(lab)] = torch.tensor(lab)
    return ids, labels


class SFTTrainer:
    """Fine-tunes ``model`` (a Hugging Face directory) on ``train_dataset`` (a list of example dicts)."""

    def __init__(self, model: str, train_dataset: list[dict], args: SFTConfig | None = None,
                 tokenizer: str | None = None):
        import tidal
        from tidal.models import load_model
        from tidal.tokenizer import Tokenizer

        self.args = args or SFTConfig()
        self.tokenizer_dir = tokenizer or model
        self.tokenizer = Tokenizer(self.tokenizer_dir)
        if not self.tokenizer.eos_token_ids:
            raise ValueError(f"the tokenizer of {tokenizer or model!r} names no EOS token to end completions")
        rows = [tokenize_example(self.tokenizer, e, self.args.completion_only_loss) for e in train_dataset]
        if self.args.packing:
            rows = pack(rows, self.args.max_length)
        else:
            rows = [(ids[:self.args.max_length], labels[:self.args.max_length]) for ids, labels in rows]
        self.rows = [r for r in rows if any(t != IGNORE for t in r[1][1:])]  # rows with a loss to take
        if not self.rows:
            raise ValueError("no example has a completion token within max_length")
        model_obj, _ = load_model(model, device=resolve_device(self.args.device))
        model_obj.train()
        self.engine = tidal.initialize(model_obj, self.args.train)
        self.pad_id = self.tokenizer.eos_token_ids[0]

    def train(self, max_steps: int | None = None, log=print, start_step: int = 0, after_step=None) -> list[dict]:
        """Epochs over the rows (shuffled per epoch from ``seed``) in the engine's batches, or up to
        optimizer step ``max_steps``; returns each step's loss (and the seconds so far).
        ``start_step``: the steps a resumed engine already took (their batches are skipped);
        ``after_step(row)`` runs after every step (a checkpoint, say)."""
        engine = self.engine
        device = next(engine.module.parameters()).device
        tokens = 0  # tokens that carried a loss, on this rank

        def micro_step(indices: list[int]) -> dict:
            nonlocal tokens
            ids, labels = collate([self.rows[i] for i in indices], self.pad_id)
            loss = engine(ids.to(device), labels=labels.to(device))
            engine.backward(loss)
            engine.step()
            tokens += int((labels != IGNORE).sum())
            return {"loss": float(loss.detach())}

        def line(m: dict) -> str:
            return (f"step {m['step']:>5}  epoch {m['epoch']}  loss {m['loss']:.4f}  "
                    f"{tokens / m['seconds']:,.0f} loss tok/s")
        return train_epochs(engine, len(self.rows), self.args.num_train_epochs, self.args.seed, micro_step, line,
                            max_steps, log, start_step, after_step)

    def save_model(self, out: str) -> None:
        """The fine-tuned model in Hugging Face format (with the tokenizer files) in ``out``."""
        import shutil
        from pathlib import Path

        from tidal.models.loader import save_model

        save_model(self.engine.module, out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if Path(self.tokenizer_dir, name).is_file():
                shutil.copy(Path(self.tokenizer_dir, name), Path(out, name))
