"""``tidal train``: a DeepSpeed-config training job on the embedded default model (the demo's Llama
architecture and its corpus, the Python standard library's source), resumable and elastic.

Run it as one process, or under torchrun (``torchrun --nnodes MIN:MAX ... -m tidal train ...``: one
worker per GPU, Gloo ranks on CPUs). Each time a worker (re)starts it loads the latest checkpoint in
``OUT/checkpoints`` if there is one (resharding ZeRO state for the world size in hand), and its
sampler (:class:`tidal.train.data.ElasticSampler`, saved in the checkpoint) resumes at the first
sample no completed step has seen; the config's ``elasticity`` section keeps the global batch valid at
every world size in its range. A checkpoint is written every ``save_interval`` steps and at the end
(asynchronously with ``async_save``: training goes on while a thread writes it), keeping the newest
``keep_last``. At the end rank 0 writes the trained model in Hugging Face format to ``OUT/model``,
which ``tidal.LLM`` and ``tidal serve`` load as they are.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from tidal import demo


def _device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def load_config(path: str) -> dict:
    """The DeepSpeed config at ``path`` (JSON), as a dict; a clear error for a missing or bad file."""
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"config {path!r} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"config {path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config {path!r} must hold a JSON object, not {type(config).__name__}")
    return config


def windows(corpus: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The corpus cut into non-overlapping [seq_len + 1] token windows (inputs and their next tokens)."""
    count = (corpus.numel() - 1) // seq_len
    return corpus[: count * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def run(config_path: str, out: str, steps: int, size: str = "small", seq_len: int | None = None,
        save_interval: int = 50, keep_last: int = 2, async_save: bool = False, device: str = "auto",
        seed: int = 0, log=None) -> dict:
    """Trains to ``steps`` optimizer steps (resuming from ``out``); returns rank 0's summary."""
    import tidal
    from tidal.models.config import ModelConfig
    from tidal.models.llama import LlamaForCausalLM
    from tidal.models.loader import save_model
    from tidal.train.data import ElasticSampler

    for name, value in (("steps", steps), ("save_interval", save_interval), ("keep_last", keep_last)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if size not in demo.SIZES:
        raise ValueError(f"size={size!r} must be one of {', '.join(demo.SIZES)}")
    seq_len = seq_len or demo.SIZES[size]["seq_len"]
    if not 1 <= seq_len < demo.MAX_POSITIONS:
        raise ValueError(f"seq_len={seq_len} must be in [1, {demo.MAX_POSITIONS})")
    config = load_config(config_path)
    if not any(k in config for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "elasticity")):
        config["train_micro_batch_size_per_gpu"] = demo.SIZES[size]["batch_size"]
    dev = _device(device)

    tok = demo.build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    model_config = ModelConfig.from_dict(demo.hf_config(size, vocab), source="demo config")
    data = windows(demo.load_corpus(), seq_len)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config, dtype=torch.float32, device=dev)
    model.initialize_weights(generator=torch.Generator(device=dev).manual_seed(seed))
    engine = tidal.initialize(model, config)
    sampler = ElasticSampler.for_engine(len(data), engine, seed=seed)
    checkpoints = os.path.join(out, "checkpoints")
    resumed = os.path.isfile(os.path.join(checkpoints, "latest"))
    if resumed:
        engine.load_checkpoint(checkpoints)
        sampler.load_state_dict(engine.client_state["sampler"])
    rank0 = engine.rank == 0

    def say(msg: str) -> None:
        if rank0:
            print(msg, file=log or sys.stdout, flush=True)

    cfg = engine.config
    say(f"tidal train: demo model ({size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) "
        f"on {engine.world_size} rank(s), {dev.type}; global batch {cfg.train_batch_size} = micro-batch "
        f"{cfg.train_micro_batch_size_per_gpu} x {cfg.gradient_accumulation_steps} accumulation x "
        f"{engine.world_size} ranks of {seq_len} tokens; "
        + (f"resumed at step {engine.global_steps}" if resumed else "from scratch"))
    batches = iter(sampler)
    start, first_step, last_loss = time.perf_counter(), engine.global_steps, float("nan")
    while engine.global_steps < steps:
        for _ in range(engine.gradient_accumulation_steps):
            window = data[next(batches)].to(dev, non_blocking=True)
            loss = engine(window, labels=window)
            engine.backward(loss)
            engine.step()
        last_loss = float(loss.detach())
        if not math.isfinite(last_loss):
            raise RuntimeError(f"training diverged at step {engine.global_steps} (loss {last_loss})")
        done = engine.global_steps - first_step
        tokens = done * cfg.train_batch_size * seq_len
        say(f"step {engine.global_steps:>6}/{steps}  loss {last_loss:.4f}  "
            f"{tokens / (time.perf_counter() - start):,.0f} tok/s  world {engine.world_size}")
        if engine.global_steps % save_interval == 0 or engine.global_steps == steps:
            engine.save_checkpoint(checkpoints, client_state={"sampler": sampler.state_dict()},
                                   async_save=async_save, keep_last=keep_last)
    engine.wait_for_checkpoint()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in engine.full_state_dict().items()}
    summary = {"steps": engine.global_steps, "world_size": engine.world_size, "last_loss": last_loss,
               "resumed": resumed}
    if rank0:
        final = LlamaForCausalLM(model_config, dtype=torch.float32, device="cpu")
        final.load_state_dict(state, strict=False)
        path = Path(out) / "model"
        path.mkdir(parents=True, exist_ok=True)
        save_model(final, path)
        demo.save_tokenizer(tok, path)
        say(f"done: {engine.global_steps} steps; the model is in {path} (tidal serve {path})")
    return summary
