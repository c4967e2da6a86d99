#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark tidal's GPU rms_norm and fused_add_rms_norm against torch peers on one CUDA card.

One run: (1) measures the device-to-device copy ceiling (2 GiB bf16 ``copy_``, median of 20, bytes
read + written); (2) checks both ops against a pure-torch fp32 reference on random data and exits
non-zero on any mismatch; (3) times every shape with CUDA events, flushing L2 (a 256 MB write)
before each repeat, median of many; (4) prints a table; (5) with ``--out FILE`` writes it as markdown.

Bytes counted: rms_norm reads x and writes out (2 * numel * itemsize), fused_add_rms_norm reads x and
residual and writes out and residual_out (4 * numel * itemsize); the weight is added once.

    python bench/bench_rms_norm.py [--out bench/rms_norm.md] [--repeats 200]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import tidal.ops
from report import copy_ceiling_gbs, print_table, time_us, write_markdown

EPS = 1e-6
RECORDED = ((16384, 4096), torch.bfloat16)
SHAPES = [
    RECORDED,
    ((1, 4096), torch.bfloat16),
    ((256, 4096), torch.bfloat16),
    ((16384, 1024), torch.bfloat16),
    ((4096, 5120), torch.float16),
    ((4096, 8192), torch.float32),
]
L2_FLUSH_BYTES = 256 * 1024 * 1024


# ---- pure-torch references (fp32 math, one rounding), also the "eager" peer -------------------

def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.float()).to(x.dtype)


def ref_fused_add_rms_norm(x, residual, weight, eps):
    residual_out = (x.float() + residual.float()).to(x.dtype)
    return ref_rms_norm(residual_out, weight, eps), residual_out


def peers(op: str):
    """(name, fn) pairs in the same call signature as the tidal op."""
    out = [("eager", ref_rms_norm if op == "rms_norm" else ref_fused_add_rms_norm)]
    if hasattr(F, "rms_norm"):
        if op == "rms_norm":
            out.append(("F.rms_norm", lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps)))
        else:
            def fused(x, r, w, eps):
                s = x + r
                return F.rms_norm(s, (s.shape[-1],), w, eps), s
            out.append(("F.rms_norm", fused))
    return out


# ---- correctness ---------------------------------------------------------------------------

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def make_inputs(shape, dtype, gen, row_pad=0, base_offset=0):
    """x and residual of `shape`, optionally inside wider rows (row_pad) or off a 16-byte boundary."""
    n, h = shape
    def one():
        buf = torch.randn(n * (h + row_pad) + base_offset, generator=gen, device="cuda").to(dtype)
        return buf[base_offset:].view(n, h + row_pad)[:, :h]
    w = (1.0 + 0.5 * torch.randn(h, generator=gen, device="cuda")).to(dtype)
    return one(), one(), w


def check_close(name, got, want, dtype):
    rtol, atol = TOL[dtype]
    try:
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    except AssertionError as e:
        raise SystemExit(f"FAIL {name}: {e}")
    if not torch.isfinite(got).all():
        raise SystemExit(f"FAIL {name}: non-finite output")


def check_all(gen) -> int:
    cases = [(s, d, 0, 0) for s, d in SHAPES]
    cases += [
        ((7, 769), torch.bfloat16, 0, 0),        # odd hidden size: element-wise path
        ((33, 4096), torch.bfloat16, 64, 0),     # strided rows, still 16-byte aligned
        ((33, 4096), torch.float16, 0, 1),       # base off a 16-byte boundary
        ((5, 16384), torch.bfloat16, 0, 0),
        ((3, 65536), torch.bfloat16, 0, 0),      # wider than the register cache: re-read path
        ((3, 32768), torch.float32, 8, 0),
        ((9, 128), torch.float32, 0, 0),         # several rows per warp
        ((0, 4096), torch.bfloat16, 0, 0),
    ]
    for (n, h), dtype, pad, off in cases:
        x, r, w = make_inputs((n, h), dtype, gen, pad, off)
        tag = f"[{n}, {h}] {str(dtype)[6:]} pad={pad} off={off}"
        check_close(f"rms_norm {tag}", tidal.ops.rms_norm(x, w, EPS), ref_rms_norm(x, w, EPS), dtype)
        want_out, want_res = ref_fused_add_rms_norm(x, r, w, EPS)
        out, res = tidal.ops.fused_add_rms_norm(x, r, w, EPS)
        if not torch.equal(res, want_res):
            raise SystemExit(f"FAIL fused_add_rms_norm residual_out {tag}: not bit-equal to round(x + residual)")
        check_close(f"fused_add_rms_norm {tag}", out, want_out, dtype)
        xi, ri = x.clone(), r.clone()
        tidal.ops.fused_add_rms_norm_(xi, ri, w, EPS)
        if not torch.equal(ri, want_res):
            raise SystemExit(f"FAIL fused_add_rms_norm_ (in place) residual {tag}")
        check_close(f"fused_add_rms_norm_ (in place) {tag}", xi, want_out, dtype)
    torch.cuda.synchronize()
    return len(cases)


# ---- timing ------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per case (median)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_rms_norm: no CUDA device", file=sys.stderr)
        return 2

    card = torch.cuda.get_device_name()
    ceiling = copy_ceiling_gbs()
    print(f"card: {card}; torch {torch.__version__}; copy ceiling {ceiling:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"correctness: {check_all(gen)} cases passed (rms_norm, fused_add_rms_norm, in place)")

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for (n, h), dtype in SHAPES:
        x, r, w = make_inputs((n, h), dtype, gen)
        item = x.element_size()
        for op in ("rms_norm", "fused_add_rms_norm"):
            if op == "rms_norm":
                args_ = (x, w, EPS)
                nbytes = 2 * x.numel() * item + h * item
                ours = lambda: tidal.ops.rms_norm(*args_)
            else:
                args_ = (x, r, w, EPS)
                nbytes = 4 * x.numel() * item + h * item
                ours = lambda: tidal.ops.fused_add_rms_norm(*args_)
            t = time_us(ours, args.repeats, flush)
            peer_t = {name: time_us(lambda f=f: f(*args_), args.repeats, flush) for name, f in peers(op)}
            gbs = nbytes / (t * 1e-6) / 1e9
            rows.append({
                "shape": f"[{n}, {h}]" + (" (recorded)" if ((n, h), dtype) == RECORDED else ""),
                "dtype": str(dtype).removeprefix("torch."), "op": op, "us": t, "gbs": gbs,
                "pct": 100 * gbs / ceiling, "peers": peer_t, "speedup": min(peer_t.values()) / t,
            })

    peer_names = [name for name, _ in peers("rms_norm")]
    header = (["shape", "dtype", "op", "tidal us", "GB/s", "% copy"] + [f"{p} us" for p in peer_names]
              + ["speedup vs best peer"])
    table = [[r["shape"], r["dtype"], r["op"], f"{r['us']:.1f}", f"{r['gbs']:.0f}", f"{r['pct']:.0f}%"]
             + [f"{r['peers'][p]:.1f}" for p in peer_names] + [f"{r['speedup']:.2f}x"] for r in rows]
    print_table(header, table)
    if args.out:
        write_markdown(args.out, f"rms_norm, {card}, torch {torch.__version__}, copy ceiling {ceiling:.0f} GB/s, "
                       f"`python bench/bench_rms_norm.py --repeats {args.repeats}`", header, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
