#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Quantization quality: held-out perplexity of tidal's demo models (trained here by the training
engine on the Python standard library's source) in bf16 and under each quantization scheme.

Models: the demo "small" (hidden 192: int4 groups of 64) and "medium" (hidden 512: groups of 128).
Schemes: int8 and FP8 (rounded as they load), int4 rounded to nearest, and int4 by GPTQ and by AWQ
(``tidal quantize``, calibrated on the training corpus). Held-out text: Python source the models never
saw (torch's own modules), scored in disjoint windows of 511 tokens with prompt log-probs
(tidal.serve.eval.perplexity). Targets (the quantization issue): int8 and FP8 within 1% of bf16, int4
(AWQ or GPTQ) within 3%.

    python bench/quant_quality.py --out DIR [--sizes small,medium] [--held-out-bytes 200000] [--steps N]

Writes DIR/quant_quality.md and DIR/quant_quality.jsonl (one row per model and scheme).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import tidal
from report import commit, print_table, write_markdown
from tidal import demo
from tidal.quant.command import quantize
from tidal.serve.eval import perplexity

TARGETS = {"int8": 0.01, "fp8": 0.01, "int4 gptq": 0.03, "int4 awq": 0.03}


def held_out_text(max_bytes: int) -> str:
    root = Path(torch.__file__).parent / "nn" / "modules"
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return "\n".join(chunks)[:max_bytes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--held-out-bytes", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=None, help="training steps (the demo's default when left out)")
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    text = held_out_text(args.held_out_bytes)
    rows, records, cache = [], [], tempfile.mkdtemp(prefix="tidal-quant-quality-")
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        t0 = time.perf_counter()
        path = demo.ensure_model(cache_dir=cache, size=size, steps=args.steps, device=device, out=sys.stderr)
        print(f"[{size}] trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        group = 64 if demo.SIZES[size]["model"]["hidden_size"] % 128 else 128
        schemes = {"bf16": (str(path), None), "int8": (str(path), "int8"), "fp8": (str(path), "fp8"),
                   "int4 rtn": (str(path), "int4")}
        for method in ("gptq", "awq"):
            out = os.path.join(cache, f"{size}-{method}")
            quantize(str(path), method, out, group_size=group, num_samples=args.calib_samples, seq_len=512,
                     device=device,
                     progress=False)
            schemes[f"int4 {method}"] = (out, None)
        base = None
        for scheme, (model, q) in schemes.items():
            if scheme == "int4 rtn" and group != 128:
                continue  # rounding on load groups by 128; this hidden size needs 64 (the calibrated rows have it)
            llm = tidal.LLM(model, dtype="bfloat16", device=device, max_model_len=demo.MAX_POSITIONS,
                            num_kv_blocks=4096, quantization=q)
            result = perplexity(llm, text)
            del llm
            base = result.perplexity if scheme == "bf16" else base
            delta = result.perplexity / base - 1
            target = TARGETS.get(scheme)
            rows.append([size, scheme, f"{result.perplexity:.4f}", f"{100 * delta:+.2f}%",
                         f"<= {100 * target:.0f}%" if target else "-",
                         "-" if target is None else "yes" if delta <= target else "no", str(result.num_tokens)])
            records.append({"workload": "quant_quality", "system": f"tidal {scheme}", "model": f"demo-{size}",
                            "metric": "held_out_perplexity", "value": result.perplexity, "unit": "ppl",
                            "relative_to_bf16": delta, "tokens": result.num_tokens, "card": card,
                            "gpus": 1 if device == "cuda" else 0, "commit": commit(),
                            "date": datetime.date.today().isoformat()})
            print(f"[{size}] {scheme}: perplexity {result.perplexity:.4f} ({100 * delta:+.2f}%)", file=sys.stderr)
    header = ["model", "scheme", "held-out perplexity", "vs bf16", "target", "met", "tokens"]
    print_table(header, rows)
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "quant_quality.md"), f"quantization quality, {card}", header, rows)
    with open(os.path.join(args.out, "quant_quality.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
