#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark tidal's paged decode attention on one CUDA card, next to torch SDPA on contiguous K/V.

Decode: one query token per sequence, every sequence at the same context length; Llama-3-8B heads
(32 q / 8 kv, head_dim 128), bf16, block_size 16; the block tables are a random permutation of all
the blocks, so consecutive blocks of a sequence lie anywhere in the pool. Shapes (num_seqs x context):
64 x 2048, 64 x 8192, and 256 x 1024 (S1-like).

One run: (1) measures the copy ceiling (2 GiB bf16 ``copy_``, median of 20, bytes read + written);
(2) checks ``tidal.ops.paged_attention`` against a pure-torch fp32 reference (gather through the block
table, softmax attention, GQA by repeat_interleave) on a small batch of mixed context lengths and on
four sequences of every timed shape, and exits 1 on a mismatch; (3) times every shape with CUDA events,
flushing L2 (a 256 MB write) before each repeat, median of --repeats after warm-up; (4) prints the
table and, with ``--out FILE``, writes it as markdown.

Bytes counted: K and V read once (num_seqs * context * 8 heads * 128 * 2 bytes each) plus q read and
out written; block tables and seq_lens are left out (under 0.1%). Peer: torch SDPA
(``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``, q [B, 32, 1, 128], k/v [B, 8, ctx, 128])
on contiguous K/V of the same size, the same bytes counted: what attention costs without paging.

    python bench/bench_attention.py [--out bench/attention.md] [--repeats 50]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import tidal.ops
from report import copy_ceiling_gbs, matmul_ceiling_tflops, print_table, time_us, write_markdown

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SHAPES = [(64, 2048), (64, 8192), (256, 1024)]  # (num_seqs, context)
CHECK_SEQ_LENS = [1, 15, 16, 17, 100, 257, 1000, 3001]  # mixed lengths: partial blocks, one key, long
L2_FLUSH_BYTES = 256 * 1024 * 1024
ATOL, RTOL = 2e-3, 1e-2  # bf16 output rounded once from fp32: |error| <= 2^-8 |out| plus accumulation order


def make_inputs(seq_lens: list[int], gen: torch.Generator, device) -> dict:
    """Random decode inputs for sequences of `seq_lens`, the blocks of all of them shuffled."""
    num_seqs, max_blocks = len(seq_lens), math.ceil(max(seq_lens) / BLOCK_SIZE)
    num_blocks = num_seqs * max_blocks
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        query=torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE),
        key_cache=torch.randn(cache_shape, generator=gen, device=device, dtype=DTYPE),
        value_cache=torch.randn(cache_shape, generator=gen, device=device, dtype=DTYPE),
        block_tables=torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32).view(num_seqs, -1),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
    )


def run_tidal(inputs: dict) -> torch.Tensor:
    """One decode step: max_seqlen_q / max_seqlen_k are host ints, so the launch does not sync."""
    return tidal.ops.paged_attention(
        inputs["query"], inputs["key_cache"], inputs["value_cache"], inputs["block_tables"], inputs["seq_lens"],
        inputs["cu_seqlens_q"], HEAD_DIM ** -0.5, sliding_window=-1, max_seqlen_q=1,
        max_seqlen_k=inputs["max_seqlen_k"])


# ---- the reference (fp32, one rounding) ----------------------------------------------------------

def ref_decode_attention(inputs: dict, seqs: list[int]) -> torch.Tensor:
    """out[s] for s in `seqs`: [len(seqs), num_heads, head_dim], the query at the last position."""
    group = NUM_HEADS // NUM_KV_HEADS
    outs = []
    for s in seqs:
        n = int(inputs["seq_lens"][s])
        blocks = inputs["block_tables"][s, :math.ceil(n / BLOCK_SIZE)].long()
        k = inputs["key_cache"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(group, 1)
        v = inputs["value_cache"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", inputs["query"][s].float(), k) * HEAD_DIM ** -0.5  # [num_heads, n]
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs).to(DTYPE)


def check(name: str, inputs: dict, out: torch.Tensor, seqs: list[int]) -> None:
    want = ref_decode_attention(inputs, seqs)
    got = out[seqs]
    if got.shape != want.shape or got.dtype != DTYPE:
        raise SystemExit(f"FAIL {name}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {DTYPE}")
    if not torch.isfinite(got).all():
        raise SystemExit(f"FAIL {name}: non-finite output")
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
    except AssertionError as e:
        raise SystemExit(f"FAIL {name}: paged_attention differs from the fp32 reference: {e}")


def check_mixed(gen, device) -> None:
    inputs = make_inputs(CHECK_SEQ_LENS, gen, device)
    inputs["max_seqlen_k"] = max(CHECK_SEQ_LENS)
    check(f"mixed context lengths {CHECK_SEQ_LENS}", inputs, run_tidal(inputs), list(range(len(CHECK_SEQ_LENS))))


# ---- timing ------------------------------------------------------------------------------------

def bench_shape(num_seqs: int, ctx: int, gen, repeats: int, flush, ceiling: float) -> list[str]:
    inputs = make_inputs([ctx] * num_seqs, gen, "cuda")
    inputs["max_seqlen_k"] = ctx
    kv_bytes = 2 * num_seqs * ctx * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    nbytes = kv_bytes + 2 * inputs["query"].numel() * DTYPE.itemsize
    check(f"{num_seqs} x {ctx}", inputs, run_tidal(inputs), [0, 1, num_seqs // 2, num_seqs - 1])
    ours = time_us(lambda: run_tidal(inputs), repeats, flush)
    del inputs
    torch.cuda.empty_cache()

    q = torch.randn(num_seqs, NUM_HEADS, 1, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    k = torch.randn(num_seqs, NUM_KV_HEADS, ctx, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    try:
        peer = time_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats, flush)
        peer_cells = [f"{peer:.1f}", f"{nbytes / peer / 1e3:.0f}", f"{100 * nbytes / peer / 1e3 / ceiling:.0f}%",
                      f"{peer / ours:.2f}x"]
    except Exception as e:  # a peer failure is a row, not a failed benchmark
        print(f"SDPA {num_seqs} x {ctx} failed: {type(e).__name__}: {e}", file=sys.stderr)
        peer_cells = ["failed", "-", "-", "-"]
    del q, k, v
    torch.cuda.empty_cache()

    gbs = nbytes / ours / 1e3
    return [f"{num_seqs} x {ctx}", f"{kv_bytes / 2**20:,.0f}", f"{ours:.1f}", f"{gbs:.0f}",
            f"{100 * gbs / ceiling:.0f}%"] + peer_cells


def sweep(gen, repeats: int, flush, ceiling: float) -> None:
    """S1's geometry (Qwen3-0.6B: 16 q / 8 kv heads) over the batch sizes S1 drains through, with the
    key-split count left to the plan (max_seqlen_k 2048, as the decode graphs capture it) and capped
    at 1, 2 and 4 splits (max_seqlen_k = 128 x cap): % of the copy ceiling per case."""
    global NUM_HEADS
    saved, NUM_HEADS = NUM_HEADS, 16
    caps = [("plan", 2048), ("1", 128), ("2", 256), ("4", 512)]
    header = ["num_seqs x context"] + [f"splits {name} us / %" for name, _ in caps]
    rows = []
    try:
        for num_seqs in (8, 16, 32, 64, 128, 256):
            for ctx in (900, 1800):
                inputs = make_inputs([ctx] * num_seqs, gen, "cuda")
                nbytes = 2 * num_seqs * ctx * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
                row = [f"{num_seqs} x {ctx}"]
                for _, max_k in caps:
                    inputs["max_seqlen_k"] = max_k
                    check(f"sweep {num_seqs} x {ctx} max_seqlen_k {max_k}", inputs, run_tidal(inputs), [0, num_seqs - 1])
                    us = time_us(lambda: run_tidal(inputs), repeats, flush)
                    row.append(f"{us:.1f} / {100 * nbytes / us / 1e3 / ceiling:.0f}%")
                rows.append(row)
                print("  ".join(row), flush=True)
                del inputs
                torch.cuda.empty_cache()
    finally:
        NUM_HEADS = saved
    print()
    print_table(header, rows)


# ---- prefill ----------------------------------------------------------------------------------------

PREFILL_SHAPES = [(16, 512, 16), (4, 2048, 32)]  # (num_seqs, prompt length, query heads); 8 KV heads


def prefill_inputs(num_seqs: int, q_len: int, num_heads: int, gen, device) -> dict:
    """Whole prompts of `q_len` tokens (no cached prefix) whose K/V the cache already holds, as a
    serving step's rotary-and-cache write leaves them; the blocks of all prompts shuffled."""
    blocks_per_seq = math.ceil(q_len / BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        query=torch.randn(num_seqs * q_len, num_heads, HEAD_DIM, generator=gen, device=device, dtype=DTYPE),
        key_cache=torch.randn(cache_shape, generator=gen, device=device, dtype=DTYPE),
        value_cache=torch.randn(cache_shape, generator=gen, device=device, dtype=DTYPE),
        block_tables=torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32).view(num_seqs, -1),
        seq_lens=torch.full((num_seqs,), q_len, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(0, (num_seqs + 1) * q_len, q_len, dtype=torch.int32, device=device),
        q_len=q_len)


def run_prefill(inputs: dict) -> torch.Tensor:
    return tidal.ops.paged_attention(
        inputs["query"], inputs["key_cache"], inputs["value_cache"], inputs["block_tables"], inputs["seq_lens"],
        inputs["cu_seqlens_q"], HEAD_DIM ** -0.5, sliding_window=-1, max_seqlen_q=inputs["q_len"],
        max_seqlen_k=inputs["q_len"])


def gather_kv(inputs: dict, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence `seq`'s keys and values, [num_kv_heads, q_len, head_dim], gathered through its table."""
    n = inputs["q_len"]
    blocks = inputs["block_tables"][seq, :math.ceil(n / BLOCK_SIZE)].long()
    k = inputs["key_cache"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]
    v = inputs["value_cache"][blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]
    return k.transpose(0, 1), v.transpose(0, 1)


def check_prefill(name: str, inputs: dict, out: torch.Tensor, seqs: list[int]) -> None:
    """Causal attention in fp32 (torch SDPA on the gathered K/V) for `seqs`, against `out`."""
    n = inputs["q_len"]
    for s in seqs:
        q = inputs["query"][s * n:(s + 1) * n].transpose(0, 1).float()
        k, v = (t.float() for t in gather_kv(inputs, s))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1)
        got = out[s * n:(s + 1) * n]
        if not torch.isfinite(got).all():
            raise SystemExit(f"FAIL prefill {name}: non-finite output")
        try:
            torch.testing.assert_close(got.float(), want, atol=ATOL, rtol=RTOL)
        except AssertionError as e:
            raise SystemExit(f"FAIL prefill {name}: paged_attention differs from the fp32 reference: {e}")


def bench_prefill(gen, repeats: int, flush, matmul_tflops: float) -> list[list[str]]:
    """Causal prefill of whole prompts through the paged cache against torch SDPA (its flash kernel) on
    contiguous q/k/v of the same shapes: TFLOP/s counting the causal half (4 x L (L + 1) / 2 x
    head_dim per head), and the share of the measured matmul rate."""
    rows = []
    for num_seqs, q_len, num_heads in PREFILL_SHAPES:
        name = f"{num_seqs} x {q_len}, {num_heads} / {NUM_KV_HEADS} heads"
        inputs = prefill_inputs(num_seqs, q_len, num_heads, gen, "cuda")
        out = run_prefill(inputs)
        check_prefill(name, inputs, out, [0, num_seqs - 1])
        flops = num_seqs * num_heads * 4 * q_len * (q_len + 1) / 2 * HEAD_DIM
        ours = time_us(lambda: run_prefill(inputs), repeats, flush)
        q = inputs["query"].view(num_seqs, q_len, num_heads, HEAD_DIM).transpose(1, 2).contiguous()
        kv = [gather_kv(inputs, s) for s in range(num_seqs)]
        k = torch.stack([a for a, _ in kv]).contiguous()
        v = torch.stack([b for _, b in kv]).contiguous()
        del inputs, out, kv
        try:
            peer = time_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                           repeats, flush)
            peer_cells = [f"{peer:.1f}", f"{flops / peer / 1e6:.0f}", f"{ours / peer:.2f}x"]
        except Exception as e:  # a peer failure is a row, not a failed benchmark
            print(f"SDPA prefill {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            peer_cells = ["failed", "-", "-"]
        del q, k, v
        torch.cuda.empty_cache()
        tflops = flops / ours / 1e6
        rows.append([name, f"{ours:.1f}", f"{tflops:.0f}", f"{100 * tflops / matmul_tflops:.0f}%"] + peer_cells)
        print("  ".join(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per case (median)")
    ap.add_argument("--sweep", action="store_true", help="also S1's head geometry over batch sizes and split caps")
    ap.add_argument("--prefill", action="store_true",
                    help="only causal prefill (whole prompts through the paged cache) against torch SDPA")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device", file=sys.stderr)
        return 2

    card = torch.cuda.get_device_name()
    ceiling = copy_ceiling_gbs()
    print(f"card: {card}; torch {torch.__version__}; copy ceiling {ceiling:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    check_mixed(gen, "cuda")
    print(f"correctness: mixed lengths {CHECK_SEQ_LENS} and 4 sequences of every timed shape "
          "match the fp32 reference (checked before each shape's timing)", flush=True)

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    if args.prefill:
        tflops = matmul_ceiling_tflops()
        rows_per_block = os.environ.get("TIDAL_PREFILL_ROWS", "64")
        print(f"matmul ceiling {tflops:.0f} TFLOP/s; prefill kernel rows per block: {rows_per_block} "
              "(TIDAL_PREFILL_ROWS)", flush=True)
        rows = bench_prefill(gen, args.repeats, flush, tflops)
        header = ["prefill (causal, bf16, head_dim 128)", "tidal us", "tidal TFLOP/s", "% matmul", "SDPA us",
                  "SDPA TFLOP/s", "tidal / SDPA time"]
        print()
        print_table(header, rows)
        if args.out:
            write_markdown(args.out, f"paged prefill attention ({rows_per_block} rows per block), {card}, torch "
                           f"{torch.__version__}, matmul ceiling {tflops:.0f} TFLOP/s, "
                           f"`python bench/bench_attention.py --prefill --repeats {args.repeats}`", header, rows)
        return 0
    header = ["num_seqs x context", "KV MiB", "tidal us", "tidal GB/s", "% copy", "SDPA us", "SDPA GB/s",
              "SDPA % copy", "tidal vs SDPA"]
    rows = []
    for num_seqs, ctx in SHAPES:
        rows.append(bench_shape(num_seqs, ctx, gen, args.repeats, flush, ceiling))
        print("  ".join(rows[-1]), flush=True)
    print()
    print_table(header, rows)
    if args.sweep:
        sweep(gen, args.repeats, flush, ceiling)
    if args.out:
        write_markdown(args.out, f"paged decode attention (32 q / 8 kv heads, head_dim 128, bf16, block_size 16), "
                       f"{card}, torch {torch.__version__}, copy ceiling {ceiling:.0f} GB/s, "
                       f"`python bench/bench_attention.py --repeats {args.repeats}`", header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
