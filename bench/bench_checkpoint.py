#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""What a checkpoint costs the training loop: tidal's synchronous save against its asynchronous one,
on one GPU, on a random-init Llama-3.2-1B (1.24 B parameters) under tidal.initialize (ZeRO stage 0,
bf16 compute, fp32 master weights and AdamW moments: about 15 GB of checkpoint).

Steps of micro-batch 4 x seq 512 on random tokens. The stall of a save is the wall time it adds to
the loop: for the synchronous one, the call itself; for the asynchronous one, the call (the copy to
pinned host memory) plus what the following steps take beyond the median step time while the
writer thread runs, until wait_for_checkpoint() returns. Both write to the same directory on the
machine's disk (the default temporary directory, or --dir), keep_last=1.

    python bench/bench_checkpoint.py [--out FILE.md] [--dir DIR] [--tiny]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import print_table, write_markdown  # noqa: E402
from train import ARCHS, save_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    args = ap.parse_args()
    import tidal
    from tidal.models import load_model

    device = torch.device("cpu" if args.tiny else "cuda")
    arch = "tiny" if args.tiny else "llama-3.2-1b"
    micro, seq = (2, 64) if args.tiny else (4, 512)
    root = tempfile.mkdtemp(prefix="tidal-ckpt-", dir=args.dir)
    try:
        path = save_model(arch, root, device)
        model, _ = load_model(path, dtype=torch.float32, device=device)
        model.train()
        engine = tidal.initialize(model, {
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0}, "bf16": {"enabled": not args.tiny},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}}})
        vocab = ARCHS[arch]["vocab_size"]
        gen = torch.Generator(device=device).manual_seed(0)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def step() -> float:
            ids = torch.randint(0, vocab, (micro, seq), generator=gen, device=device)
            start = time.perf_counter()
            engine.backward(engine(ids, labels=ids))
            engine.step()
            sync()
            return time.perf_counter() - start

        for _ in range(3):
            step()
        base = statistics.median(step() for _ in range(8))
        ckpt = os.path.join(root, "checkpoints")
        numel = sum(p.numel() for p in model.parameters())

        start = time.perf_counter()
        engine.save_checkpoint(ckpt, async_save=False, keep_last=1)
        sync_stall = time.perf_counter() - start
        for _ in range(2):
            step()

        start = time.perf_counter()
        engine.save_checkpoint(ckpt, async_save=True, keep_last=1)
        call = time.perf_counter() - start
        extra, steps = 0.0, 0
        begin = time.perf_counter()
        while engine.checkpoint_pending():
            extra += step() - base
            steps += 1
        written = time.perf_counter() - begin
        engine.wait_for_checkpoint()
        async_stall = call + max(extra, 0.0)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt) for f in files)
        header = ["save", "stall s", "of the synchronous stall", "detail"]
        rows = [["synchronous", f"{sync_stall:.2f}", "100%", f"{size / 1e9:.1f} GB written"],
                ["asynchronous", f"{async_stall:.3f}", f"{100 * async_stall / sync_stall:.1f}%",
                 f"copy to host {call:.3f} s + {max(extra, 0.0):.3f} s over {steps} steps while the writer ran "
                 f"({written:.1f} s); step {1e3 * base:.0f} ms"]]
        title = (f"checkpoint stall, {arch} ({numel / 1e9:.2f} B parameters), "
                 f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
        print(title)
        print_table(header, rows)
        if args.out:
            write_markdown(args.out, title, header, rows)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
