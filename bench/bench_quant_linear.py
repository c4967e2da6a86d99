#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark tidal's quantized linear layer (int8, int4 with groups of 128, FP8 E4M3 codes) at decode
batch sizes against the bf16 weight through cuBLAS (F.linear), on one CUDA card.

Per Llama-3-8B projection and batch of 1, 4 and 8 rows: each format's decode kernel, checked against a
dequantize-then-matmul fp32 reference first (exit status 1 on a mismatch), then timed with CUDA events,
L2 flushed before each repeat. Bandwidth counts the bytes the kernel must read: codes, scales and zero
points (what its floor is made of), next to the copy ceiling. Then the prefill path (2048 rows):
dequantize + cuBLAS for int8/int4, FP8 tensor cores for fp8, against bf16 cuBLAS. Last, at 1 and 2
rows, the decode kernel against ops.skinny_linear over the same codes (on sm_90 the codes streamed
through shared memory by bulk copies), each checked the same way.

    python bench/bench_quant_linear.py [--out FILE.md] [--repeats 100]
    ncu --kernel-name regex:quant_linear python bench/bench_quant_linear.py --profile gate_up:1:int4
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import tidal.ops
from report import copy_ceiling_gbs, print_table, time_us, write_markdown
from tidal.ops.quant import _fp8_linear
from tidal.quant import quantize_weight

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
FORMATS = [("int8", None), ("int4", 128), ("fp8", None)]


def weight_bytes(codes, scales, zeros) -> int:
    return sum(t.numel() * t.element_size() for t in (codes, scales, zeros) if t is not None)


def profile(spec: str) -> int:
    name, m, fmt = spec.split(":")
    (n, k), = [(n, k) for shape, n, k in SHAPES if shape == name]
    group = dict(FORMATS)[fmt]
    torch.inference_mode().__enter__()
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    codes, scales, zeros = quantize_weight(w, fmt, group)
    x = torch.randn(int(m), k, device="cuda").to(torch.bfloat16)
    for _ in range(3):
        tidal.ops.quant_linear(x, codes, scales, zeros, None, fmt)
    torch.cuda.synchronize()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file for the table")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--skinny-only", action="store_true",
                    help="only the last table: the decode kernel against skinny_linear at 1 and 2 rows")
    ap.add_argument("--profile", default=None, metavar="NAME:M:FORMAT",
                    help="only call that projection's kernel a few times (e.g. gate_up:1:int4), for a profiler")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_quant_linear.py: no CUDA device", file=sys.stderr)
        return 2
    if args.profile:
        return profile(args.profile)
    copy = copy_ceiling_gbs()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows, failed = [], False
    torch.inference_mode().__enter__()
    for name, n, k in [] if args.skinny_only else SHAPES:
        g = torch.Generator(device="cuda").manual_seed(n + k)
        w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
        quantized = {fmt: quantize_weight(w, fmt, group) for fmt, group in FORMATS}
        for m in (1, 4, 8, 2048):
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            t_bf16 = time_us(lambda: F.linear(x, w), args.repeats, flush)
            row = [name, f"{m}x{n}x{k}", f"{t_bf16:.1f}"]
            for fmt, _ in FORMATS:
                codes, scales, zeros = quantized[fmt]
                out = tidal.ops.quant_linear(x, codes, scales, zeros, None, fmt).float()
                w_ref = tidal.ops.dequantize_weight(codes, scales, zeros, fmt, torch.float32)
                expected = x.float() @ w_ref.t()
                err = (out - expected).abs().max().item()
                scale = expected.abs().max().item()
                w8a8 = fmt == "fp8" and m > tidal.ops.quant.fp8_weight_only_rows(x, codes, scales)  # x rounded too
                if not err <= (6e-2 if w8a8 else 2e-2) * max(scale, 1.0):
                    print(f"MISMATCH {name} m={m} {fmt}: max error {err:.3g} (scale {scale:.3g})", file=sys.stderr)
                    failed = True
                t = time_us(lambda: tidal.ops.quant_linear(x, codes, scales, zeros, None, fmt), args.repeats, flush)
                nbytes = weight_bytes(codes, scales, zeros)
                row += [f"{t:.1f}", f"{nbytes / t / 1e3 / copy:.0%}" if m <= 8 else f"{t_bf16 / t:.2f}x"]
            # FP8 through per-token quantization + torch._scaled_mm at every m (past GEMV_MAX_ROWS it is
            # what quant_linear runs): where it overtakes the decode kernel
            codes, scales, zeros = quantized["fp8"]
            t = time_us(lambda: _fp8_linear(x, codes, scales, None, None), args.repeats, flush)
            row.append(f"{t:.1f}")
            rows.append(row)
    skinny_rows = []
    for name, n, k in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(n + k)
        w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
        for m in (1, 2):
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            row = [name, f"{m}x{n}x{k}"]
            for fmt, group in FORMATS:
                codes, scales, zeros = quantize_weight(w, fmt, group)
                expected = x.float() @ tidal.ops.dequantize_weight(codes, scales, zeros, fmt, torch.float32).t()
                fused = lambda: tidal.ops.skinny_linear(x, codes, weight_format=fmt, scales=scales,  # noqa: E731
                                                        zeros=zeros)
                err = (fused().float() - expected).abs().max().item()
                if not err <= 2e-2 * max(expected.abs().max().item(), 1.0):
                    print(f"MISMATCH skinny_linear {name} m={m} {fmt}: max error {err:.3g}", file=sys.stderr)
                    failed = True
                nbytes = weight_bytes(codes, scales, zeros)
                t_q = time_us(lambda: tidal.ops.quant_linear(x, codes, scales, zeros, None, fmt), args.repeats, flush)
                t_s = time_us(fused, args.repeats, flush)
                row += [f"{t_q:.1f} ({nbytes / t_q / 1e3 / copy:.0%})", f"{t_s:.1f} ({nbytes / t_s / 1e3 / copy:.0%})"]
            skinny_rows.append(row)
    skinny_header = ["projection", "m x n x k"]
    for fmt, _ in FORMATS:
        skinny_header += [f"{fmt} quant_linear us (% of copy)", f"{fmt} skinny_linear us (% of copy)"]
    header = ["projection", "m x n x k", "bf16 cuBLAS us"]
    for fmt, _ in FORMATS:
        header += [f"{fmt} us", f"{fmt} % of copy (m<=8) / speedup vs bf16"]
    header.append("fp8 scaled_mm us")
    print(f"copy ceiling {copy:,.0f} GB/s ({torch.cuda.get_device_name()})")
    if rows:
        print_table(header, rows)
    print_table(skinny_header, skinny_rows)
    if args.out:
        if rows:
            write_markdown(args.out, f"quant_linear, {torch.cuda.get_device_name()}, copy ceiling {copy:,.0f} GB/s",
                           header, rows)
        write_markdown(args.out.removesuffix(".md") + "_skinny.md", "quant_linear against skinny_linear over the same "
                       f"codes, {torch.cuda.get_device_name()}", skinny_header, skinny_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
