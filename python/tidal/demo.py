"""``tidal demo``: the embedded default (ARCHITECTURE.md, "The embedded default").

Needs no download. It builds a byte-level tokenizer, trains a small Llama-architecture model with
``tidal.initialize`` on text already on the machine (the Python standard library's ``.py`` sources),
saves it in Hugging Face format to a cache directory, then generates completions of Python-looking
prompts with ``tidal.LLM`` and prints them with the throughput. A second run reuses the cached model
unless asked to retrain. ``tidal serve`` with no model serves the same directory.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

#: Special tokens after the 256 byte tokens (ids 256, 257, ...).
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
EOS_ID = 256

#: Model shapes (Hugging Face LlamaConfig keys) and training defaults per size. "small" is sized for
#: two CPU cores (about 2 minutes of training); "medium" for one GPU in about the same time.
SIZES = {
    "small": dict(model=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                             intermediate_size=512),
                  steps=450, batch_size=16, seq_len=256, lr=3e-3),
    "medium": dict(model=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                              intermediate_size=1408),
                   steps=2000, batch_size=32, seq_len=256, lr=1.5e-3),
}
PROMPTS = ["def ", "class ", "import ", "    self."]
MAX_POSITIONS = 512
_MARKER = "tidal_demo.json"  # written last: a directory without it is an unfinished run


def default_cache_dir() -> Path:
    """``$TIDAL_CACHE/demo`` when TIDAL_CACHE is set, else ``~/.cache/tidal/demo``."""
    root = os.environ.get("TIDAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tidal")
    return Path(root) / "demo"


def default_size() -> str:
    return "medium" if torch.cuda.is_available() else "small"


def model_dir(cache_dir: str | os.PathLike | None = None, size: str | None = None) -> Path:
    """Where the demo model of ``size`` lives (``<cache_dir>/<size>``)."""
    return Path(cache_dir or default_cache_dir()) / (size or default_size())


def is_trained(path: Path) -> bool:
    return all((path / name).is_file() for name in
               (_MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


# ---- tokenizer ---------------------------------------------------------------------------------

def build_tokenizer():
    """A byte-level tokenizer: token id ``b`` is byte ``b`` (0..255), then :data:`SPECIAL_TOKENS`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer emits), by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def save_tokenizer(tok, path: Path) -> None:
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL_TOKENS[0], "pad_token": SPECIAL_TOKENS[1],
        "model_max_length": MAX_POSITIONS, "clean_up_tokenization_spaces": False}, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_ID, "pad_token_id": EOS_ID + 1},
                                                            indent=2))


# ---- corpus ------------------------------------------------------------------------------------

def load_corpus(max_bytes: int = 12 << 20) -> torch.Tensor:
    """The standard library's ``.py`` sources as token ids (bytes, files joined by <|endoftext|>),
    in a fixed order, at most about ``max_bytes``. Tests, site-packages and idlelib are left out."""
    root = os.path.dirname(os.__file__)
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                data = Path(dirpath, name).read_bytes()
            except OSError:
                continue
            chunks.append(data)
            total += len(data) + 1
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    if total < 4096:
        raise RuntimeError(f"found too little Python source under {root!r} to train the demo on")
    sep = bytes([0])  # placeholder, replaced by the <|endoftext|> id below
    joined = torch.frombuffer(bytearray(sep.join(chunks)), dtype=torch.uint8).to(torch.int64)
    starts = torch.tensor([0] + [len(c) + 1 for c in chunks[:-1]]).cumsum(0)[1:] - 1
    joined[starts] = EOS_ID
    return joined


# ---- training ----------------------------------------------------------------------------------

def hf_config(size: str, vocab_size: int) -> dict:
    shape = SIZES[size]["model"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "vocab_size": vocab_size,
            "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
            "bos_token_id": None, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID + 1, "dtype": "float32"}


class _Progress:
    """A tqdm bar on a terminal; otherwise a compact line every ``every`` steps (quiet logs)."""

    def __init__(self, total: int, out=sys.stderr):
        self.total, self.out, self.bar = total, out, None
        self.every = max(1, total // 10)
        if out.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=out)
            except ImportError:
                pass

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, {tokens_per_s:,.0f} tok/s, lr {lr:.2e}", refresh=False)
            self.bar.update(1)
        elif step == 1 or step % self.every == 0 or step == self.total:
            print(f"step {step:>5}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  lr {lr:.2e}",
                  file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(path: Path, size: str, steps: int, device: torch.device, seed: int = 0, out=sys.stdout) -> dict:
    """Trains the demo model and saves it to ``path`` in Hugging Face format. Returns a summary."""
    import tidal
    from tidal.models.config import ModelConfig
    from tidal.models.llama import LlamaForCausalLM
    from tidal.models.loader import save_model

    spec = SIZES[size]
    batch, seq = spec["batch_size"], spec["seq_len"]
    tok = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = ModelConfig.from_dict(hf_config(size, vocab), source="demo config")

    t0 = time.perf_counter()
    corpus = load_corpus()
    print(f"corpus: {corpus.numel() / 1e6:.1f} MB of Python from {os.path.dirname(os.__file__)}", file=out, flush=True)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config, dtype=torch.float32, device=device)
    model.initialize_weights(generator=torch.Generator(device=device).manual_seed(seed) if device.type != "cpu"
                             else torch.Generator().manual_seed(seed))
    num_params = sum(p.numel() for p in model.parameters())
    bf16 = device.type == "cuda"
    warmup = max(1, min(100, steps // 10))
    engine = tidal.initialize(model, {
        "train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": spec["lr"], "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(steps, warmup + 1), "warmup_num_steps": warmup, "warmup_type": "linear", "warmup_min_ratio": 0.05,
            "cos_min_ratio": 0.1}},
        "bf16": {"enabled": bf16}, "zero_optimization": {"stage": 0},
    })
    print(f"model: Llama, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{num_params / 1e6:.2f}M parameters, vocab {vocab} (bytes); training {steps} steps of "
          f"{batch}x{seq} tokens on {device.type} ({'bf16' if bf16 else 'fp32'})", file=out, flush=True)

    progress = _Progress(steps)
    losses, tokens, t_train = [], 0, time.perf_counter()
    try:
        for step in range(1, steps + 1):
            starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=gen)
            idx = starts[:, None] + torch.arange(seq + 1)[None, :]
            window = corpus[idx].to(device, non_blocking=True)
            x, y = window[:, :-1], window[:, 1:]
            logits = engine(x)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
            engine.backward(loss)
            lr = engine.get_lr()[0]
            engine.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"training diverged at step {step} (loss {value})")
            losses.append(value)
            tokens += batch * seq
            progress.update(step, value, tokens / (time.perf_counter() - t_train), lr)
    finally:
        progress.close()
    train_s = time.perf_counter() - t_train

    # Save the fp32 master weights (the model's own parameters are bf16 on a GPU).
    state = {k: v.detach().to("cpu", torch.float32) for k, v in engine.full_state_dict().items()}
    final = LlamaForCausalLM(config, dtype=torch.float32, device="cpu")
    final.load_state_dict(state, strict=False)
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).unlink(missing_ok=True)
    save_model(final, path)
    save_tokenizer(tok, path)
    tail = losses[-min(10, len(losses)):]
    summary = {"size": size, "steps": steps, "first_loss": losses[0], "last_loss": sum(tail) / len(tail),
               "train_seconds": round(train_s, 1), "tokens_per_second": round(tokens / train_s),
               "parameters": num_params, "device": device.type}
    (path / _MARKER).write_text(json.dumps(summary, indent=2))
    print(f"trained {steps} steps in {train_s:.1f} s ({tokens / train_s:,.0f} tokens/s); "
          f"loss: first {losses[0]:.4f} last {summary['last_loss']:.4f}", file=out, flush=True)
    print(f"saved the model in Hugging Face format to {path} (total {time.perf_counter() - t0:.1f} s)",
          file=out, flush=True)
    return summary


def ensure_model(cache_dir=None, size: str | None = None, steps: int | None = None, retrain: bool = False,
                 device: str = "auto", out=sys.stdout) -> Path:
    """The demo model's directory, training it first when it is not cached (or ``retrain``)."""
    size = size or default_size()
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {', '.join(SIZES)}")
    path = model_dir(cache_dir, size)
    if is_trained(path) and not retrain:
        summary = json.loads((path / _MARKER).read_text())
        print(f"using the cached demo model in {path} (trained {summary.get('steps')} steps, loss: first "
              f"{summary.get('first_loss', float('nan')):.4f} last {summary.get('last_loss', float('nan')):.4f}; "
              f"--retrain trains it again)", file=out, flush=True)
        return path
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    train(path, size, steps if steps is not None else SIZES[size]["steps"], dev, out=out)
    return path


def generate(path: Path, prompts: list[str], max_tokens: int = 96, out=sys.stdout, device: str = "auto") -> list[str]:
    """Completions of ``prompts`` from the model at ``path`` with tidal.LLM (on the GPU when there is
    one), printed with throughput."""
    import tidal

    t0 = time.perf_counter()
    llm = tidal.LLM(str(path), dtype="float32", num_kv_blocks=max(64, 4 * len(prompts) * MAX_POSITIONS // 16),
                    max_model_len=MAX_POSITIONS, max_num_seqs=max(1, len(prompts)), device=device)
    load_s = time.perf_counter() - t0
    params = [tidal.SamplingParams(temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=i)
              for i in range(len(prompts))]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t1
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    texts = []
    print(f"\ngenerating with tidal.LLM on {llm.engine.device} (loaded in {load_s:.2f} s):", file=out)
    for prompt, o in zip(prompts, outs):
        text = o.outputs[0].text
        texts.append(text)
        print("-" * 60, file=out)
        print(prompt + text, file=out)
    print("-" * 60, file=out)
    print(f"generated {n_tokens} tokens for {len(prompts)} prompts in {gen_s:.2f} s "
          f"({n_tokens / max(gen_s, 1e-9):,.1f} tokens/s)", file=out, flush=True)
    return texts


def run(steps: int | None = None, size: str | None = None, cache_dir=None, retrain: bool = False,
        prompts: list[str] | None = None, max_tokens: int = 96, device: str = "auto") -> int:
    t0 = time.perf_counter()
    path = ensure_model(cache_dir, size, steps, retrain, device)
    generate(path, prompts or PROMPTS, max_tokens, device=device)
    print(f"demo done in {time.perf_counter() - t0:.1f} s; serve it with `tidal serve` or "
          f"`tidal serve {path}`", flush=True)
    return 0
