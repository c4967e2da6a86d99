#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""GRPO on one GPU (BENCHMARKS.md / the RLHF target): tidal's GRPOTrainer, whose rollouts come from
tidal.LLM serving the weights being trained, against the same step with transformers ``generate()``
for the rollouts, in the same call.

Model: Qwen2.5-1.5B's architecture (hidden 1536, 28 layers, 12 q / 2 kv heads, inter 8960, vocab
151936, tied embeddings, q/k/v biases) with random bf16 weights, saved with save_pretrained and loaded
by GRPOTrainer as a user would. No EOS token, so every completion is exactly 512 tokens long.

A step: 8 prompts of 256 random token ids x 8 samples (temperature 1, no top-k/top-p), 512 tokens
each; a programmatic reward (the share of even token ids); group-normalised advantages; the old and
reference log-probabilities (training forwards in micro-batches of 8); one optimizer step over the 64
sequences (micro-batch 8 x 8 accumulation steps, bf16 with fp32 master weights, ZeRO stage 1, AdamW);
the serving engine's weights made current (``sync``: the module is shared, so this only drops the
prefix cache) and, between rollouts, its KV cache memory given back (``LLM.sleep``) and re-taken.
Timed: one warm-up step, then ``--steps`` steps; the medians of the split reported by the trainer
(generation, training, sync) and of the whole step.

Peer: transformers ``generate()`` (bf16, SDPA) of the same 64 x 512 sampled tokens from the same
prompts (``do_sample=True, temperature=1, top_k=0, min_new_tokens=max_new_tokens=512``), one warm-up
call of 8 tokens then one timed call; the peer's step is that generation plus tidal's own training
time (the same training work: only the rollout engine differs).

The serving engine's log-probabilities of the sampled tokens are checked against the training forward
on every step (the largest gap over all 32,768 tokens is reported; bf16 on both sides).

    python bench/rlhf.py --out DIR [--steps 3]

Writes DIR/rlhf.md and DIR/rlhf.jsonl (one JSON object per measurement).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tidal  # noqa: E402
from report import commit, print_table  # noqa: E402
from tidal.rlhf import GRPOConfig, GRPOTrainer  # noqa: E402

QWEN25_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
PROMPTS, GENERATIONS, PROMPT_LEN, COMPLETION_LEN, MICRO = 8, 8, 256, 512, 8
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def even_share(prompts, completions, completion_ids, **_):
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def build(root: str | None) -> str:
    path = tempfile.mkdtemp(prefix="tidal_rlhf_", dir=root)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**QWEN25_1_5B),
                                                              torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def run_tidal(path: str, prompts: list[list[int]], steps: int, tolerance: float) -> dict:
    config = GRPOConfig(
        num_generations=GENERATIONS, max_completion_length=COMPLETION_LEN, temperature=1.0, beta=0.04,
        logprob_tolerance=tolerance, device="cuda",
        train={"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": PROMPTS * GENERATIONS // MICRO,
               "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}}},
        llm={"max_model_len": PROMPT_LEN + COMPLETION_LEN, "max_num_seqs": PROMPTS * GENERATIONS,
             "kv_cache_memory_fraction": 0.5})
    t0 = time.perf_counter()
    trainer = GRPOTrainer(path, reward_funcs=even_share, args=config)
    log(f"GRPOTrainer ready in {time.perf_counter() - t0:.1f} s "
        f"(KV pool {trainer.llm.engine.runner.kv_pool.nbytes / 2**30:.1f} GiB, released between rollouts)")
    history = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.step(prompts)
        torch.cuda.synchronize()
        m["step_s"] = time.perf_counter() - t0
        log(f"tidal step {i}{' (warm-up)' if i == 0 else ''}: {m['step_s']:.2f} s = generation "
            f"{m['generation_s']:.2f} (KV wake-up {m['kv_wake_up_s'] * 1e3:.1f} ms) + training {m['training_s']:.2f} + "
            f"sync {m['sync_s'] * 1e3:.1f} ms; {m['completion_tokens']} tokens, reward {m['reward']:.4f}, "
            f"logprob gap {m['logprob_error']:.4f}")
        if m["completion_tokens"] != PROMPTS * GENERATIONS * COMPLETION_LEN:
            raise RuntimeError(f"{m['completion_tokens']} completion tokens, expected "
                               f"{PROMPTS * GENERATIONS * COMPLETION_LEN}")
        if i > 0:
            history.append(m)
    peak = torch.cuda.max_memory_allocated() / 2**30
    out = {k: statistics.median(h[k] for h in history)
           for k in ("step_s", "generation_s", "training_s", "sync_s", "kv_wake_up_s")}
    out["logprob_error"] = max(h["logprob_error"] for h in history)
    out["peak_memory_gib"] = peak
    del trainer
    torch.cuda.empty_cache()
    return out


def run_peer(path: str, prompts: list[list[int]]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").cuda().eval()
    ids = torch.tensor([p for p in prompts for _ in range(GENERATIONS)], device="cuda")
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=COMPLETION_LEN, min_new_tokens=COMPLETION_LEN, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if out.shape != (ids.shape[0], PROMPT_LEN + COMPLETION_LEN):
        raise RuntimeError(f"transformers generated {tuple(out.shape)}")
    del model, out
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for rlhf.md and rlhf.jsonl")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--logprob-tolerance", type=float, default=0.5,
                    help="the largest serving/training log-probability gap a step accepts (bf16)")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/rlhf.py: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    log(f"card {card}; torch {torch.__version__}; transformers {transformers.__version__}; tidal "
        f"{json.dumps(tidal.build_info())}")
    root = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 8 << 30 else None
    path = build(root)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, QWEN25_1_5B["vocab_size"], (PROMPT_LEN,), generator=g).tolist()
               for _ in range(PROMPTS)]
    try:
        ours = run_tidal(path, prompts, args.steps, args.logprob_tolerance)
        peer_gen = None if args.no_peer else run_peer(path, prompts)
    finally:
        shutil.rmtree(path, ignore_errors=True)

    tokens = PROMPTS * GENERATIONS * COMPLETION_LEN
    common = dict(workload="GRPO", card=card, gpus=1, commit=commit(), date=datetime.date.today().isoformat())
    rows = [dict(system="tidal", metric="step_seconds", value=ours["step_s"], unit="s"),
            dict(system="tidal", metric="generation_seconds", value=ours["generation_s"], unit="s"),
            dict(system="tidal", metric="training_seconds", value=ours["training_s"], unit="s"),
            dict(system="tidal", metric="sync_seconds", value=ours["sync_s"], unit="s"),
            dict(system="tidal", metric="kv_wake_up_seconds", value=ours["kv_wake_up_s"], unit="s"),
            dict(system="tidal", metric="sync_share", value=ours["sync_s"] / ours["step_s"], unit="fraction"),
            dict(system="tidal", metric="generation_tokens_per_s", value=tokens / ours["generation_s"], unit="tok/s"),
            dict(system="tidal", metric="logprob_max_abs_gap", value=ours["logprob_error"], unit="nats"),
            dict(system="tidal", metric="peak_memory_gib", value=ours["peak_memory_gib"], unit="GiB")]
    table = [["tidal", f"{ours['step_s']:.2f}", f"{ours['generation_s']:.2f}", f"{tokens / ours['generation_s']:,.0f}",
              f"{ours['training_s']:.2f}", f"{ours['sync_s'] * 1e3:.1f} ms ({100 * ours['sync_s'] / ours['step_s']:.2f}%)",
              "-"]]
    if peer_gen is not None:
        peer_step = peer_gen + ours["training_s"]
        rows += [dict(system="transformers", metric="generation_seconds", value=peer_gen, unit="s"),
                 dict(system="transformers", metric="generation_tokens_per_s", value=tokens / peer_gen, unit="tok/s"),
                 dict(system="transformers", metric="step_seconds", value=peer_step, unit="s",
                      note="transformers generate() + tidal's training time of the same step"),
                 dict(system="tidal", metric="step_speedup", value=peer_step / ours["step_s"], unit="x",
                      note="vs transformers generate() rollouts, same training")]
        table.append(["transformers generate()", f"{peer_step:.2f}", f"{peer_gen:.2f}", f"{tokens / peer_gen:,.0f}",
                      f"{ours['training_s']:.2f} (tidal's)", "-", f"{peer_step / ours['step_s']:.2f}x"])
    header = ["rollouts by", "step s", "generation s", "generation tok/s", "training s", "sync", "tidal speedup"]
    print()
    print_table(header, table)
    print(f"\nlogprob gap (serving vs training forward, bf16, max over every sampled token): "
          f"{ours['logprob_error']:.4f}; KV wake-up {ours['kv_wake_up_s'] * 1e3:.1f} ms; peak memory "
          f"{ours['peak_memory_gib']:.1f} GiB")
    with open(os.path.join(args.out, "rlhf.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, **common}) + "\n")
    with open(os.path.join(args.out, "rlhf.md"), "w") as f:
        f.write(f"{common['date']}, commit {common['commit']}, {card}: GRPO step, Qwen2.5-1.5B architecture, "
                f"{PROMPTS} prompts x {GENERATIONS} samples, {PROMPT_LEN} + {COMPLETION_LEN} tokens "
                f"(`python bench/rlhf.py --steps {args.steps}`)\n\n")
        f.write("| " + " | ".join(header) + " |\n| " + " | ".join("---" for _ in header) + " |\n")
        for line in table:
            f.write("| " + " | ".join(line) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
