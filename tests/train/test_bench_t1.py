"""bench/train.py's T1 (two ranks started by torchrun) checked on the CPU with --tiny: every system
runs, reports tokens/s per GPU and its loss, and the ZeRO stages' losses match DDP's and FSDP2's (the
same weights and batches in fp32)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_t1_runs_every_system_on_two_ranks(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--tiny", "--workloads", "T1",
                           "--steps", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    value = {(r["system"], r["metric"]): r["value"] for r in rows}
    systems = ["tidal ZeRO-2", "tidal ZeRO-3", "torch DDP", "FSDP2"]
    assert {r["system"] for r in rows} == set(systems)
    for system in systems:
        assert value[(system, "tokens_per_s_per_gpu")] > 0, system
    ddp = value[("torch DDP", "loss")]
    for system in systems:
        assert abs(value[(system, "loss")] - ddp) <= 0.01 * ddp, (system, value[(system, "loss")], ddp)
