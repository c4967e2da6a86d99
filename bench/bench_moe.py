#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Benchmark tidal's fused_moe (routing, grouped gate-up and down GEMMs, combine) against transformers'
sparse MoE block on one CUDA card, at Mixtral-8x7B and Qwen3-30B-A3B layer sizes, decode to prefill.

Per (model, batch): the op checked against fp32 products of the same bf16 operands (exit status 1 on a
mismatch), then timed replayed from a CUDA graph (as the engine's decode steps run it; median of
--repeats with CUDA events; the weights are far larger than L2). Peers: transformers' own block of the
same config on the same weights, with each experts implementation it offers here ("grouped_mm": one
torch._grouped_mm per product; "eager": a loop over the experts hit), timed eagerly. Bandwidth counts
the expert weights the batch reads, against the measured copy ceiling; TFLOP/s the routed products
(6 * slots * hidden * inter). Then one torch-profiler breakdown of the op per model at batch 1 and 64:
device time per kernel.

    python bench/bench_moe.py [--out FILE.md] [--repeats 20]
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch
import transformers

import tidal.ops
from report import copy_ceiling_gbs, print_table, write_markdown

MODELS = {  # transformers config class, its kwargs, tidal's routing flags (renormalize, fp32_weights)
    "mixtral-8x7b": (transformers.MixtralConfig,
                     dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2),
                     (True, True)),
    "qwen3-30b-a3b": (transformers.Qwen3MoeConfig,
                      dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                           norm_topk_prob=True), (True, False)),
}
BATCHES = (1, 8, 64, 256, 4096)


def hf_block(name: str, implementation: str):
    cls, kwargs, _ = MODELS[name]
    config = cls(**kwargs)
    config._experts_implementation = implementation
    module = {"mixtral-8x7b": transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock,
              "qwen3-30b-a3b": transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock}[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = module(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.gate.weight.mul_(30)  # a sharp router, as bench/serve.py's M1 model
    return block


def reference(x, logits, w13, w2, top_k, renormalize):
    weights, chosen = torch.topk(logits.float().softmax(-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    want = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for e in chosen.unique().tolist():
        token, slot = torch.where(chosen == e)
        h = x[token].float() @ w13[e].float().T
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float()
        want.index_add_(0, token, (act @ w2[e].float().T) * weights[token, slot, None])
    return want


def graph_us(fn, repeats: int) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[repeats // 2]


def eager_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[repeats // 2]


def kernel_breakdown(fn) -> str:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.replace("(anonymous namespace)::", "").replace("void ", "")
            totals[name.split("(")[0].split("<")[0].split("::")[-1][:40]] += event.device_time_total / 10
    return ", ".join(f"{name} {us:.1f} us" for name, us in totals.most_common(8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table and the breakdowns here (markdown)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe.py: no CUDA device", file=sys.stderr)
        return 2
    copy = copy_ceiling_gbs()
    header = ["model", "batch", "tidal us", "GB/s", "% of copy", "TFLOP/s", "max err", "peer", "peer us",
              "tidal vs peer"]
    rows, notes, failed = [], [], False
    for name, (_, kwargs, (renormalize, fp32_weights)) in MODELS.items():
        blocks = {impl: hf_block(name, impl) for impl in ("grouped_mm", "eager")}
        base = blocks["grouped_mm"]
        w13, w2 = base.experts.gate_up_proj.data, base.experts.down_proj.data
        for other in blocks.values():  # one set of weights for every peer
            other.experts.gate_up_proj.data, other.experts.down_proj.data = w13, w2
            other.gate.weight.data = base.gate.weight.data
        top_k, hidden, inter = kwargs["num_experts_per_tok"], w13.shape[2], w2.shape[2]
        expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        for batch in BATCHES:
            g = torch.Generator(device="cuda").manual_seed(batch)
            x = torch.randn(batch, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
            logits = torch.nn.functional.linear(x, base.gate.weight)

            def op():
                return tidal.ops.fused_moe(x, logits, w13, w2, top_k, renormalize, fp32_weights)
            want = reference(x, logits, w13, w2, top_k, renormalize)
            err = ((op().float() - want).abs().max() / want.abs().max()).item()
            failed |= not err < 2e-2
            us = graph_us(op, args.repeats)
            hit = torch.topk(logits.float(), top_k, dim=-1).indices.unique().numel()
            gbs = hit * expert_bytes / us / 1e3
            tflops = 6 * batch * top_k * hidden * inter / us / 1e6
            for impl, block in blocks.items():
                try:
                    with torch.no_grad():
                        peer = eager_us(lambda block=block: block(x[None]), max(3, args.repeats // 4))
                    peer_cell, vs = f"{peer:,.0f}", f"{peer / us:.1f}x"
                except Exception as e:  # a peer that does not run here is a row, not a failed script
                    peer_cell, vs = f"failed: {type(e).__name__}: {str(e)[:60]}", "-"
                rows.append([name, str(batch), f"{us:,.1f}", f"{gbs:,.0f}", f"{100 * gbs / copy:.0f}%",
                             f"{tflops:.1f}", f"{err:.1e}", f"transformers {impl}", peer_cell, vs])
            if batch in (1, 64):
                notes.append(f"- {name}, batch {batch}: {kernel_breakdown(op)}")
        del blocks, base, w13, w2
        torch.cuda.empty_cache()
    title = f"fused_moe, {torch.cuda.get_device_name()}, copy ceiling {copy:,.0f} GB/s"
    print(title)
    print_table(header, rows)
    print("\nkernel time per call (torch profiler):\n" + "\n".join(notes))
    if args.out:
        write_markdown(args.out, title, header, rows)
        with open(args.out, "a") as f:
            f.write("\nkernel time per call (torch profiler):\n" + "\n".join(notes) + "\n")
    if failed:
        print("FAILED: fused_moe differs from the fp32 products (max err column)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
