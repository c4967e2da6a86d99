#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark W8A8's activation quantizers on one CUDA card: the fused kernels that write a projection's
FP8 input themselves (``ops.quant.fused_add_rms_norm_quant_fp8_`` after a norm,
``ops.quant.silu_and_mul_quant_fp8_`` after the MLP's activation) against the two kernels each replaces
(the norm or the activation, then ``ops.quant.quantize_fp8_per_token``).

Shapes: Llama-3-8B's (hidden 4096, intermediate 14336), bf16, at the row counts of S3's decode steps
(64, 256) and of a prefill step (8192). Each pair must agree bit for bit, then each is timed with CUDA
events, L2 flushed before each repeat, median of --repeats. Bytes counted: the fused kernel's (its
inputs read once, residual written for the norm, codes and scales written): the floor both sides
are measured against. Each side is timed on the same buffers over and over (the ops write them in
place).

    python bench/bench_fp8_quant.py [--out FILE.md] [--repeats 50]
"""
from __future__ import annotations

import sys

import torch

import tidal.ops
from report import print_table, start_bandwidth_bench, time_us, write_markdown
from tidal.ops import quant

HIDDEN, INTER, DTYPE = 4096, 14336, torch.bfloat16
ROWS = (64, 256, 8192)


def norm_case(rows: int, gen):
    x = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
    residual = torch.randn(rows, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).to(DTYPE)
    nbytes = rows * HIDDEN * (3 * DTYPE.itemsize + 1) + 4 * rows  # x, residual read; residual, codes written

    def fused(x, residual):
        return quant.fused_add_rms_norm_quant_fp8_(x, residual, weight, 1e-6)

    def apart(x, residual):
        tidal.ops.fused_add_rms_norm_(x, residual, weight, 1e-6)
        return quant.quantize_fp8_per_token(x)
    return fused, apart, (x, residual), nbytes


def act_case(rows: int, gen):
    x = torch.randn(rows, 2 * INTER, generator=gen, device="cuda", dtype=DTYPE)
    nbytes = rows * INTER * (2 * DTYPE.itemsize + 1) + 4 * rows  # gate and up read, codes written

    def fused(x):
        return quant.silu_and_mul_quant_fp8_(x)

    def apart(x):
        return quant.quantize_fp8_per_token(tidal.ops.silu_and_mul(x))
    return fused, apart, (x,), nbytes


def main() -> int:
    started = start_bandwidth_bench("bench_fp8_quant", __doc__.splitlines()[0])
    if started is None:
        return 2
    args, card, ceiling, flush = started
    rows_out = []
    for name, make in (("norm -> qkv / gate_up", norm_case), ("silu_and_mul -> down", act_case)):
        for rows in ROWS:
            fused, apart, inputs, nbytes = make(rows, torch.Generator(device="cuda").manual_seed(rows))
            (codes_f, scale_f) = fused(*(t.clone() for t in inputs))
            (codes_a, scale_a) = apart(*(t.clone() for t in inputs))
            same = torch.equal(codes_f.view(torch.uint8), codes_a.view(torch.uint8)) and torch.equal(scale_f, scale_a)
            if not same:
                print(f"MISMATCH: {name}, {rows} rows: the fused kernel's codes differ from the two kernels'",
                      file=sys.stderr)
                return 1
            # timed on the same buffers over and over (the ops write them in place; the values drift,
            # the bytes moved do not)
            us_fused = time_us(lambda: fused(*inputs), args.repeats, flush)
            us_apart = time_us(lambda: apart(*inputs), args.repeats, flush)
            floor = nbytes / ceiling / 1e3
            cells = [f"{name}, {rows} rows", f"{us_fused:.1f}", f"{us_apart:.1f}", f"{us_apart / us_fused:.2f}x",
                     f"{floor:.1f}"]
            rows_out.append(cells)
            print("  ".join(cells), flush=True)
    header = ["case", "fused us", "two kernels us", "speedup", "floor us (fused bytes / copy ceiling)"]
    print()
    print_table(header, rows_out)
    if args.out:
        write_markdown(args.out, f"W8A8 activation quantizers (bf16, Llama-3-8B shapes), {card}, "
                       f"torch {torch.__version__}, copy ceiling {ceiling:.0f} GB/s, "
                       f"`python bench/bench_fp8_quant.py --repeats {args.repeats}`", header, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
