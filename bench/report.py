"""Printing and saving a benchmark's table: one place for the layout every bench/ script shares."""

import datetime
import os
import statistics
import subprocess


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def commit() -> str:
    """$TIDAL_COMMIT when set (a copy of the tree whose .git, if any, is not the commit it holds), else
    the checkout's short commit, else "unknown"."""
    if os.environ.get("TIDAL_COMMIT"):
        return os.environ["TIDAL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def write_markdown(path: str, title: str, header: list[str], rows: list[list[str]]) -> None:
    """Writes ``title`` (prefixed with today's date and the commit) and the table as markdown."""
    with open(path, "w") as f:
        f.write(f"{datetime.date.today().isoformat()}, commit {commit()}: {title}\n\n")
        f.write("| " + " | ".join(header) + " |\n| " + " | ".join("---" for _ in header) + " |\n")
        for line in rows:
            f.write("| " + " | ".join(line) + " |\n")


def time_us(fn, repeats: int, flush=None) -> float:
    """Median device time of fn() in microseconds: 5 warm-up calls, then CUDA events around each of
    ``repeats`` calls, ``flush`` (a large tensor) zeroed before each to evict the inputs from L2."""
    import torch

    for _ in range(5):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush.zero_()  # evicts the inputs from L2; also queues work so launch gaps are hidden
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_ceiling_gbs() -> float:
    """The device-to-device copy ceiling in GB/s (2 GiB bf16 ``copy_``, bytes read + written)."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (us * 1e-6) / 1e9


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """The bf16 matmul ceiling in TFLOP/s (an n x n x n ``a @ b``, median of 20)."""
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    us = time_us(lambda: a @ b, 20)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (us * 1e-6) / 1e12


L2_FLUSH_BYTES = 256 * 1024 * 1024  # more than any card's L2: zeroing it evicts a bench's inputs


def start_bandwidth_bench(name: str, description: str, repeats: int = 50):
    """The start a bandwidth-bound kernel bench shares: its ``--repeats`` and ``--out`` arguments,
    the card and its copy ceiling printed, and a buffer for time_us to zero between repeats.
    Returns ``(args, card, ceiling_gbs, flush)``, or None (having said so) without a CUDA device."""
    import argparse
    import sys

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--repeats", type=int, default=repeats, help="timed calls per case (median)")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device", file=sys.stderr)
        return None
    card = torch.cuda.get_device_name()
    ceiling = copy_ceiling_gbs()
    print(f"card: {card}; torch {torch.__version__}; copy ceiling {ceiling:.0f} GB/s", flush=True)
    return args, card, ceiling, torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
