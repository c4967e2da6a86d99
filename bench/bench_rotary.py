#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark the serving step's rotary op (``tidal.ops.rotary_embedding_and_cache_``: Qwen3's per-head
q/k RMSNorm where given, rotary, the key and value written into their cache slots) on one CUDA card.

Cases: Qwen3-0.6B heads (16 q / 8 kv, head_dim 128, q/k norm) at a prefill step of 8192 tokens and a
decode step of 256, Llama-3-8B heads (32 / 8, no norm) at 8192 tokens; bf16, block_size 16, the slots
a random permutation of the pool. Each case runs the op twice on the same bytes: with q, k and v as
16-byte aligned views of one qkv buffer (what the qkv projection leaves; the GPU takes the kernel
that holds a head in registers) and with the buffer's rows one element longer (heads unaligned: the
warp-per-head kernel). The two must agree (same arithmetic per element up to the norm's summation
order), then each is timed with CUDA events, L2 flushed before each repeat, median of --repeats.

Bytes counted: q read and written, k and v read, their cache slots written (positions, slots and
cos/sin rows left out).

    python bench/bench_rotary.py [--out FILE.md] [--repeats 50]
"""
from __future__ import annotations

import sys

import torch

import tidal.ops
from report import print_table, start_bandwidth_bench, time_us, write_markdown
from tidal.models import rope

HEAD_DIM, BLOCK_SIZE, DTYPE = 128, 16, torch.bfloat16
CASES = [("Qwen3-0.6B prefill", 8192, 16, 8, True), ("Qwen3-0.6B decode", 256, 16, 8, True),
         ("Llama-3-8B prefill", 8192, 32, 8, False)]  # (name, tokens, q heads, kv heads, q/k norm)


def make_case(num_tokens: int, heads: int, kv_heads: int, norm: bool, pad: int, gen) -> dict:
    width = (heads + 2 * kv_heads) * HEAD_DIM
    qkv = torch.zeros(num_tokens, width + pad, device="cuda", dtype=DTYPE)
    qkv[:, :width] = torch.randn(num_tokens, width, generator=gen, device="cuda", dtype=DTYPE)
    q, k, v, _ = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM, pad], dim=1)
    num_blocks = (num_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE + 1
    cache_shape = (num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
    weight = (lambda: (1 + 0.1 * torch.randn(HEAD_DIM, generator=gen, device="cuda")).to(DTYPE)) if norm else None
    return dict(
        positions=torch.randint(0, 4096, (num_tokens,), generator=gen, device="cuda"),
        query=q.view(num_tokens, heads, HEAD_DIM), key=k.view(num_tokens, kv_heads, HEAD_DIM),
        value=v.view(num_tokens, kv_heads, HEAD_DIM),
        key_cache=torch.zeros(cache_shape, device="cuda", dtype=DTYPE),
        value_cache=torch.zeros(cache_shape, device="cuda", dtype=DTYPE),
        slot_mapping=torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:num_tokens],
        cos_sin_cache=rope.build_cos_sin_cache(HEAD_DIM, 4096, 1e6, None, device="cuda"),
        q_norm_weight=weight() if norm else None, k_norm_weight=weight() if norm else None)


def run(case: dict) -> None:
    tidal.ops.rotary_embedding_and_cache_(**case)


def main() -> int:
    started = start_bandwidth_bench("bench_rotary", __doc__.splitlines()[0])
    if started is None:
        return 2
    args, card, ceiling, flush = started
    rows = []
    for name, tokens, heads, kv_heads, norm in CASES:
        nbytes = 2 * tokens * (heads + 2 * kv_heads) * HEAD_DIM * DTYPE.itemsize
        cells, outs, times = [f"{name}, {tokens} tokens"], [], []
        for pad in (8, 1):  # aligned heads (register kernel), unaligned (warp-per-head kernel)
            case = make_case(tokens, heads, kv_heads, norm, pad, torch.Generator(device="cuda").manual_seed(tokens))
            run(case)
            outs.append((case["query"].clone(), case["key_cache"].clone(), case["value_cache"].clone()))
            us = time_us(lambda: run(case), args.repeats, flush)
            gbs = nbytes / us / 1e3
            cells += [f"{us:.1f}", f"{gbs:.0f}", f"{100 * gbs / ceiling:.0f}%"]
            times.append(us)
        for a, b in zip(*outs):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=1e-2)
        rows.append(cells + [f"{times[1] / times[0]:.2f}x"])
        print("  ".join(cells), flush=True)
    header = ["case", "register kernel us", "GB/s", "% copy", "warp-per-head kernel us", "GB/s", "% copy", "speedup"]
    print()
    print_table(header, rows)
    if args.out:
        write_markdown(args.out, f"rotary_embedding_and_cache_ (bf16, head_dim 128), {card}, "
                       f"torch {torch.__version__}, copy ceiling {ceiling:.0f} GB/s, "
                       f"`python bench/bench_rotary.py --repeats {args.repeats}`",
                       header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
