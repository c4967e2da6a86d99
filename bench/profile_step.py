#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Where one serving step's time goes: kernel time by op (torch profiler), host time per step and the
GPU's busy time per step, for decode steps of a Qwen3-0.6B-shaped model (random bf16 weights) at
batch 256 x context ~900 (S1's regime) and batch 1 (S2's regime, the same model), and optionally a
Llama-3-8B-shaped model at batch 1 (--llama), and S3's regime on Llama-3-8B per weight scheme (--s3
bf16,fp8,fp8/fp8kv: decode at batch 256 over 256-token prompts, one prefill step of 16 x 512 tokens), and
S2's regime on Llama-3-8B per weight scheme (--s2 bf16,int4,int8,fp8: decode at batch 1, prompt 128).
What METHOD.md asks for before optimising: which op, how far from its floor, and how much of the step
is host time or launch gaps.

    python bench/profile_step.py --out FILE.md [--llama] [--s3 bf16,fp8] [--s2 bf16,int4]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tidal  # noqa: E402
from serve import LLAMA_3_8B, QWEN3_0_6B  # noqa: E402


def build(config_kwargs, cls, root):
    path = tempfile.mkdtemp(prefix="tidal_prof_", dir=root)
    config = cls(**config_kwargs)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def decode_steps(engine, num_steps):
    """Runs until every request decodes, then times num_steps steps: wall and GPU-busy per step."""
    while True:
        batch_before = engine.scheduler.num_waiting
        engine.step(return_unfinished=False)
        if batch_before == 0 and all(engine.scheduler.request(r).num_computed_tokens >= engine.scheduler.request(r).num_prompt_tokens
                                     for r in engine.scheduler.running_ids):
            break
    walls, gpus = [], []
    for _ in range(num_steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        engine.step(return_unfinished=False)
        end.record()
        end.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        gpus.append(start.elapsed_time(end))
    return sorted(walls)[len(walls) // 2], sorted(gpus)[len(gpus) // 2]


def profile(engine, num_steps, lines, title):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step(return_unfinished=False)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    lines += [f"### {title}: {num_steps} steps, kernel time by op", "", "```", table, "```", ""]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:
        busy = sum(e.device_time for e in kernels) / 1e3
        first, last = min(e.time_range.start for e in kernels), max(e.time_range.end for e in kernels)
        lines.append(f"kernels: {len(kernels) / num_steps:.0f} per step, busy {busy / num_steps:.3f} ms per step, "
                     f"span {(last - first) / 1e3 / num_steps:.3f} ms per step (span - busy = gaps)")
        lines.append("")
        gap_table(kernels, num_steps, lines)


def short_name(name: str, width: int = 48) -> str:
    """A kernel's name without its template arguments and parameter list, cut to width."""
    depth, out = 0, []
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    text = "".join(out).replace("void ", "").strip()
    return text[:width]


def gap_table(kernels, num_steps, lines, host_gap_us=20.0, rows=12):
    """Idle time between consecutive kernels, split into the host's gaps between steps (longer than
    host_gap_us) and the gaps inside a step, the latter by (previous kernel -> next kernel) pair: which
    kernel boundaries cost the most, so the fusion or launch change that pays is the one attacked."""
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    host, inside, pairs = 0.0, 0.0, {}
    for prev, nxt in zip(ordered, ordered[1:]):
        gap = max(nxt.time_range.start - prev.time_range.end, 0.0)  # us
        if gap > host_gap_us:
            host += gap
            continue
        inside += gap
        key = (short_name(prev.name), short_name(nxt.name))
        total, count = pairs.get(key, (0.0, 0))
        pairs[key] = (total + gap, count + 1)
    lines.append(f"gaps per step: inside the step {inside / num_steps / 1e3:.3f} ms, "
                 f"host gaps (> {host_gap_us:.0f} us) {host / num_steps / 1e3:.3f} ms")
    lines += ["", "| previous kernel | next kernel | per step | mean gap us | us per step |",
              "| --- | --- | --- | --- | --- |"]
    for (a, b), (total, count) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {a} | {b} | {count / num_steps:.0f} | {total / count:.2f} | {total / num_steps:.1f} |")
    lines.append("")


def scheme_kwargs(scheme: str) -> dict:
    """tidal.LLM arguments of a scheme "WEIGHTS[/fp8kv]" (bench/serve.py's names)."""
    weights, _, cache = scheme.partition("/")
    return dict(quantization=None if weights == "bf16" else weights, kv_cache_dtype="fp8" if cache else "auto")


def run_case(path, lines, title, num_seqs, prompt_len, max_tokens, max_model_len, vocab, **llm_kwargs):
    llm = tidal.LLM(path, max_model_len=max_model_len, max_num_seqs=max(num_seqs, 8), **llm_kwargs)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    params = tidal.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"r{i}", torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
    wall, gpu = decode_steps(engine, 20)
    lines.append(f"## {title}")
    lines.append(f"decode step: wall {wall:.3f} ms, GPU (events around the step) {gpu:.3f} ms; "
                 f"{num_seqs / wall * 1e3:,.0f} tokens/s at this batch")
    lines.append("")
    profile(engine, 5, lines, title)
    for rid in list(engine._requests):
        engine.abort_request(rid)
    del llm, engine
    torch.cuda.empty_cache()


def run_prefill_case(path, lines, title, num_seqs, prompt_len, max_model_len, vocab, **llm_kwargs):
    """One step that prefills num_seqs prompts of prompt_len tokens (S1's prefill steps)."""
    llm = tidal.LLM(path, max_model_len=max_model_len, max_num_seqs=256, max_num_batched_tokens=num_seqs * prompt_len,
                    **llm_kwargs)
    engine = llm.engine
    g = torch.Generator().manual_seed(1)
    params = tidal.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for round_ in range(2):  # the first round warms up
        for i in range(num_seqs):
            engine.add_request(f"p{round_}-{i}", torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
        if round_ == 0:
            while engine.has_unfinished_requests():
                engine.step(return_unfinished=False)
            llm.reset_prefix_cache()
    lines.append(f"## {title}")
    profile(engine, 1, lines, title)
    while engine.has_unfinished_requests():
        engine.step(return_unfinished=False)
    del llm, engine
    torch.cuda.empty_cache()


def profile_llama(workload, schemes, out):
    """S3's regime (decode at batch 256, a prefill step) or S2's (decode at batch 1) per weight scheme."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    lines = [f"# {workload}-regime step profile, Llama-3-8B ({torch.cuda.get_device_name()})", ""]
    path = build(LLAMA_3_8B, transformers.LlamaConfig, root)
    vocab = LLAMA_3_8B["vocab_size"]
    try:
        for scheme in schemes:
            kwargs = scheme_kwargs(scheme)
            if workload == "S2":
                run_case(path, lines, f"{scheme}: decode, batch 1, prompt 128", 1, 128, 300, 1024, vocab, **kwargs)
                continue
            run_case(path, lines, f"{scheme}: decode, batch 256, prompt 256", 256, 256, 200, 1024, vocab, **kwargs)
            run_prefill_case(path, lines, f"{scheme}: prefill, 16 prompts of 512 tokens in one step", 16, 512, 1024,
                             vocab, **kwargs)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--llama", action="store_true", help="also Llama-3-8B at batch 1")
    parser.add_argument("--drain", action="store_true", help="also batches 96 and 32 at long contexts")
    parser.add_argument("--s3", default=None, metavar="SCHEMES",
                        help="only Llama-3-8B in S3's regime, per scheme (comma-separated, e.g. bf16,fp8,fp8/fp8kv)")
    parser.add_argument("--s2", default=None, metavar="SCHEMES",
                        help="only Llama-3-8B in S2's regime, per scheme (comma-separated, e.g. bf16,int4,int8,fp8)")
    args = parser.parse_args()
    for workload, schemes in (("S3", args.s3), ("S2", args.s2)):
        if schemes:
            return profile_llama(workload, [s.strip() for s in schemes.split(",") if s.strip()], args.out)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    lines = [f"# Serving step profile ({torch.cuda.get_device_name()})", ""]
    path = build(QWEN3_0_6B, transformers.Qwen3Config, root)
    try:
        run_case(path, lines, "Qwen3-0.6B decode, batch 256, prompt 800", 256, 800, 400, 2048, QWEN3_0_6B["vocab_size"])
        run_case(path, lines, "Qwen3-0.6B decode, batch 1, prompt 128", 1, 128, 400, 2048, QWEN3_0_6B["vocab_size"])
        if args.drain:  # the batch sizes S1 drains through, at the long contexts its survivors have
            for batch, prompt in ((96, 1400), (32, 1700)):
                run_case(path, lines, f"Qwen3-0.6B decode, batch {batch}, prompt {prompt}", batch, prompt, 300, 2048,
                         QWEN3_0_6B["vocab_size"])
        run_prefill_case(path, lines, "Qwen3-0.6B prefill, 16 prompts of 512 tokens in one step", 16, 512, 2048,
                         QWEN3_0_6B["vocab_size"])
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if args.llama:
        path = build(LLAMA_3_8B, transformers.LlamaConfig, root)
        try:
            run_case(path, lines, "Llama-3-8B decode, batch 1, prompt 128", 1, 128, 300, 1024,
                     LLAMA_3_8B["vocab_size"])
        finally:
            shutil.rmtree(path, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
