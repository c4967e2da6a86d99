#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark tidal's skinny_linear (a linear layer over a few rows with rms_norm / silu_and_mul before
it and the residual add after it) against what runs without it, on one CUDA card.

Per shape: tidal's fused kernel; the unfused ops it replaces (tidal's rms_norm or silu_and_mul, then
torch's F.linear, then the residual add); F.linear alone (cuBLAS, no neighbours). Each checked against
a pure-torch fp32 reference first (exit status 1 on a mismatch), then timed with CUDA events, L2
flushed before each repeat. Bandwidth counts the weight bytes (what the floor is made of). Then one
Llama-3-8B layer's four projections at batch 1 back to back inside a CUDA graph, fused and unfused:
the gaps between dependent kernels count there.

    python bench/bench_skinny_linear.py [--out FILE.md] [--repeats 100] [--layer-only]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import tidal.ops
from report import copy_ceiling_gbs, print_table, time_us, write_markdown

# (name, m, n, k, prologue, residual)
SHAPES = [
    ("llama8b qkv + norm", 1, 6144, 4096, "rms_norm", False),
    ("llama8b o_proj + add", 1, 4096, 4096, None, True),
    ("llama8b gate_up + norm", 1, 28672, 4096, "rms_norm", False),
    ("llama8b down + silu + add", 1, 4096, 14336, "silu", True),
    ("llama8b lm_head", 1, 128256, 4096, None, False),
    ("llama8b gate_up + norm, m=4", 4, 28672, 4096, "rms_norm", False),
    ("llama8b gate_up + norm, m=2", 2, 28672, 4096, "rms_norm", False),
    ("qwen3-0.6b gate_up + norm", 1, 6144, 1024, "rms_norm", False),
    ("qwen3-0.6b down + silu + add, m=4", 4, 1024, 3072, "silu", True),
]
EPS = 1e-6


def tensors(m, n, k, prologue, residual, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, 2 * k if prologue == "silu" else k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(dtype)
    nw = torch.randn(k, device="cuda", generator=g).to(dtype) if prologue == "rms_norm" else None
    res = torch.randn(m, n, device="cuda", generator=g).to(dtype) if residual else None
    return x, w, nw, res


def fused(x, w, nw, res, prologue, prefetch=None):
    return tidal.ops.skinny_linear(x, w, norm_weight=nw, eps=EPS, gated=prologue == "silu", residual=res,
                                   prefetch=prefetch)


def unfused(x, w, nw, res, prologue, prefetch=None):
    h = tidal.ops.rms_norm(x, nw, EPS) if prologue == "rms_norm" else tidal.ops.silu_and_mul(x) if prologue else x
    y = F.linear(h, w)
    return res.add_(y) if res is not None else y


def reference(x, w, nw, res, prologue):
    xf = x.float()
    if prologue == "rms_norm":
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * nw.float()).to(x.dtype)
    elif prologue == "silu":
        k = x.shape[1] // 2
        h = (F.silu(xf[:, :k]) * xf[:, k:]).to(x.dtype)
    else:
        h = x
    y = h.float() @ w.float().t()
    return y if res is None else res.float() + y


def graph_us(fn, repeats: int) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(8):
                fn()
    torch.cuda.synchronize()
    return time_us(graph.replay, repeats) / 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file for the table")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--layer-only", action="store_true", help="only the layer's projections in a graph (the "
                    "streamed kernel's ring is TIDAL_SKINNY_STAGES, read once per process)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_skinny_linear.py: no CUDA device", file=sys.stderr)
        return 2
    copy = copy_ceiling_gbs()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows, failed = [], False
    torch.inference_mode().__enter__()
    for name, m, n, k, prologue, residual in [] if args.layer_only else SHAPES:
        x, w, nw, res = tensors(m, n, k, prologue, residual)
        expected = reference(x, w, nw, res, prologue)
        got = fused(x, w, nw, None if res is None else res.clone(), prologue).float()
        err = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        if not err <= 2e-2 * max(scale, 1.0):
            print(f"MISMATCH {name}: max error {err:.3g} (scale {scale:.3g})", file=sys.stderr)
            failed = True
        nbytes = w.numel() * w.element_size()
        times = [time_us(lambda: fn(x, w, nw, None if res is None else res, prologue), args.repeats, flush)
                 for fn in (fused, unfused)]
        times.append(time_us(lambda: F.linear(x if prologue != "silu" else x[:, :k], w), args.repeats, flush))
        rows.append([name, f"{m}x{n}x{k}"] + [f"{t:.1f}" for t in times]
                    + [f"{nbytes / t / 1e3:,.0f}" for t in times[:1]] + [f"{nbytes / times[0] / 1e3 / copy:.0%}",
                                                                         f"{times[1] / times[0]:.2f}x"])
    # one Llama-3-8B layer's projections at batch 1, in a graph (flushing nothing: 436 MB of weights)
    layer = [tensors(1, n, k, p, r) + (p,) for _, m, n, k, p, r in SHAPES[:4]]
    q_out = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")

    def run_layer(fn, prefetch=False):  # prefetch: each projection has L2 fetch the next one's weight
        (x1, w1, nw1, _, p1), (_, w2, _, res, p2), (_, w3, nw3, _, p3), (_, w4, _, _, p4) = layer
        hint = (lambda w: w) if prefetch else (lambda w: None)
        qkv = fn(x1, w1, nw1, None, p1, hint(w2))
        fn(q_out.copy_(qkv[:, :4096]), w2, None, res, p2, hint(w3))
        gate_up = fn(res, w3, nw3, None, p3, hint(w4))
        fn(gate_up, w4, None, res, p4, hint(w1))
    layer_bytes = sum(w.numel() * 2 for _, w, _, _, _ in layer)
    t_fused, t_unfused = graph_us(lambda: run_layer(fused), args.repeats), graph_us(lambda: run_layer(unfused),
                                                                                    args.repeats)
    rows.append(["llama8b layer, 4 projections, graph", "m=1", f"{t_fused:.1f}", f"{t_unfused:.1f}", "",
                 f"{layer_bytes / t_fused / 1e3:,.0f}", f"{layer_bytes / t_fused / 1e3 / copy:.0%}",
                 f"{t_unfused / t_fused:.2f}x"])
    t_hinted = graph_us(lambda: run_layer(fused, prefetch=True), args.repeats)
    rows.append(["llama8b layer, 4 projections, graph, L2 prefetch of the next", "m=1", f"{t_hinted:.1f}",
                 f"{t_unfused:.1f}", "", f"{layer_bytes / t_hinted / 1e3:,.0f}",
                 f"{layer_bytes / t_hinted / 1e3 / copy:.0%}", f"{t_unfused / t_hinted:.2f}x"])
    header = ["shape", "m x n x k", "tidal us", "unfused us", "F.linear us", "tidal GB/s (weights)",
              "% of copy ceiling", "speedup vs unfused"]
    ring = os.environ.get("TIDAL_SKINNY_STAGES", "4x32 (default)")
    print(f"copy ceiling {copy:,.0f} GB/s ({torch.cuda.get_device_name()}); streamed ring {ring}")
    print_table(header, rows)
    if args.out:
        write_markdown(args.out,
                       f"skinny_linear, {torch.cuda.get_device_name()}, copy ceiling {copy:,.0f} GB/s", header, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
