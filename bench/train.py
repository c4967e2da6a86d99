#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Training workloads T0, T3, A1 (one GPU) and T1 (two GPUs) of BENCHMARKS.md: tidal.initialize and its
peers, same call.

Models: random-init Llama-3.2-1B (T0, A1) and Llama-3.2-3B (T3) architectures, saved once in bf16 so
that every system starts from the same weights; random tokens (seed 0); AdamW (lr 1e-4, betas 0.9 /
0.95, weight decay 0.1), gradient clipping 1.0; bf16 compute with fp32 master weights everywhere.

- T0: seq 2048, micro-batch 4, 15 steps. tidal at ZeRO stages 0 and 3 (the fused LM-head loss through
  ``labels``); peers: torch eager (fp32 parameters, autocast bf16, fused AdamW), the same under
  ``torch.compile``, DeepSpeed ZeRO-2 (bf16).
- T3: seq 2048, micro-batch 1, the GPU capped at 32 GiB (``torch.cuda.set_per_process_memory_fraction``),
  whole-layer activation checkpointing everywhere: torch eager (expected to run out of memory), DeepSpeed
  ZeRO-Offload (stage 2, ``offload_optimizer: cpu``, its CPU Adam JIT-built on the machine), tidal with
  ``offload_optimizer`` at stage 2, and with ``offload_param`` too at stage 3.
- A1: T0's model at seq 8192, micro-batch 1, tidal stage 0 with activation checkpointing none / full /
  attention (selective) / mlp / full with ``cpu_checkpointing``.
- T2: Llama-3-8B on 4 GPUs, seq 2048, micro-batch 2, whole-layer activation checkpointing: tidal
  ZeRO-3 against FSDP2.
- T1: T0's model on 2 GPUs (``--gpus``), seq 2048, micro-batch 4 per GPU, each rank its own batches:
  tidal ZeRO-2 and ZeRO-3 (overlap_comm on, DeepSpeed's default at stage 3); peers torch DDP (autocast
  bf16, fused AdamW), FSDP2 (``fully_shard`` per decoder layer then the root, bf16 parameters with fp32
  reductions), DeepSpeed ZeRO-2 and ZeRO-3. The ranks are started by torchrun; tokens/s is per GPU,
  peak memory the maximum over ranks, the loss the mean over ranks of the last step's.

Each (workload, system) runs in a process of its own (clean peak memory, no state shared with the
previous run). Metrics: tokens/s over the steps after the first 3, MFU (6 x parameters + 6 x layers
x seq x hidden FLOPs per token over the matmul ceiling measured in the same call), peak GPU memory
(``max_memory_allocated`` from the first step on), GPU memory held before the first step (weights,
gradients, optimizer state: the rest of the peak is activations), peak host memory (max RSS), and the
loss of the last step. A failed run (out of memory included) is a row with its error.

    python bench/train.py --out DIR [--workloads T0,T3,A1,T1,T2] [--no-peers] [--tiny] [--gpus 2]

``--tiny`` runs a tiny model for a few steps on the CPU (fp32, tidal and torch eager; T1's ranks over
Gloo): it checks the script, not speed. DeepSpeed is imported only by its runs (carry its wheel: see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import commit, print_table, write_markdown  # noqa: E402

LLAMA_3_2_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                    rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)
LLAMA_3_2_3B = dict(LLAMA_3_2_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
LLAMA_3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096)
ARCHS = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.2-3b": LLAMA_3_2_3B, "llama-3-8b": LLAMA_3_8B, "tiny": TINY}
LR, BETAS, WEIGHT_DECAY, CLIP, WARMUP = 1e-4, (0.9, 0.95), 0.1, 1.0, 3
T3_CAP_GIB = 32
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


# ---- one run, in its own process ------------------------------------------------------------------

def flops_per_token(cfg: dict, seq: int) -> float:
    h, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    params = layers * per_layer + vocab * h  # the (tied) LM head's matmul; the embedding lookup is free
    return 6 * params + 6 * layers * seq * q  # causal attention: QK^T and PV, forward and backward, halved


def _tidal_engine(path: str, spec: dict, device):
    import tidal
    from tidal.models import load_model

    model, _ = load_model(path, dtype=torch.float32, device=device)
    model.train()
    zero = {"stage": spec["stage"]}
    if spec.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.get("offload_param"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {"train_micro_batch_size_per_gpu": spec["micro"], "gradient_accumulation_steps": 1,
              "gradient_clipping": CLIP, "zero_optimization": zero, "bf16": {"enabled": spec["bf16"]},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}}}
    if spec.get("checkpointing"):
        policy, offload = spec["checkpointing"]
        config["activation_checkpointing"] = {"policy": policy, "cpu_checkpointing": offload}
    engine = tidal.initialize(model, config)

    def step(ids):
        loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        return loss
    return step


def _torch_step(path: str, spec: dict, device, compiled: bool):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.train()
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable()
    autocast = spec["bf16"]
    if spec.get("parallel") == "DDP":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    elif spec.get("parallel") == "FSDP2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if spec["bf16"] else torch.float32,
                                      reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        autocast = False  # the policy casts the parameters
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=fused)
    forward = torch.compile(model) if compiled else model

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _deepspeed_step(path: str, spec: dict, device):
    import deepspeed
    import transformers

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # one process; torchrun's ranks keep their environment
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    # Its fused Adam is JIT-built for this card; DeepSpeed cannot parse arch names such as "9.0a".
    major, minor = torch.cuda.get_device_capability(device)
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    deepspeed.init_distributed()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable()
    zero = {"stage": spec["stage"]}
    if spec.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {"train_micro_batch_size_per_gpu": spec["micro"], "gradient_accumulation_steps": 1,
              "gradient_clipping": CLIP, "bf16": {"enabled": True}, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step


def child(spec: dict) -> dict:
    """One (workload, system) run; returns its measurements."""
    device = torch.device(spec["device"])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:  # a rank started by torchrun: its own GPU, and a process group the peers share
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not spec["system"].startswith(("tidal", "DeepSpeed")):
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if spec.get("cap_gib"):
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * 2**30 / total), device)
    torch.manual_seed(0)
    system = spec["system"]
    if system.startswith("tidal"):
        step = _tidal_engine(spec["path"], spec, device)
    elif system.startswith("DeepSpeed"):
        step = _deepspeed_step(spec["path"], spec, device)
    else:
        step = _torch_step(spec["path"], spec, device, compiled="compile" in system)
    g = torch.Generator().manual_seed(rank)  # each rank its own batches
    batches = [torch.randint(0, spec["vocab"], (spec["micro"], spec["seq"]), generator=g).to(device)
               for _ in range(spec["steps"])]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    static = 0.0
    if device.type == "cuda":
        sync()
        static = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], None
    for i, ids in enumerate(batches):
        if i == WARMUP:
            sync()
            t0 = time.perf_counter()
        losses.append(step(ids).detach())
    sync()
    seconds = time.perf_counter() - t0
    tokens = (spec["steps"] - WARMUP) * spec["micro"] * spec["seq"]
    if spec.get("profile_dir") and world == 1:
        profile_step(step, batches[-1], spec, device)
    result = dict(tokens_per_s=tokens / seconds, loss=float(losses[-1].float()),
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  static_memory_gib=static if device.type == "cuda" else None,
                  peak_host_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if world > 1:  # per GPU: the mean rate and loss, the largest memories
        import torch.distributed as dist

        everyone = [None] * world
        dist.all_gather_object(everyone, result)
        result = {k: None if result[k] is None else
                  (max if "memory" in k else lambda v: sum(v) / len(v))([r[k] for r in everyone]) for k in result}
        if rank != 0:
            return None
    return result


def profile_step(step, ids, spec: dict, device) -> None:
    """One more step under the torch profiler: kernel time by op, written beside the results."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    name = "".join(c if c.isalnum() else "_" for c in f"{spec['workload']}_{spec['system']}")
    with open(os.path.join(spec["profile_dir"], f"profile_{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70))


# ---- the orchestrator -----------------------------------------------------------------------------

def save_model(arch: str, root: str, device) -> str:
    """The architecture with random weights (normal 0.02, bf16), saved once for every run."""
    import transformers

    path = os.path.join(root, arch)
    if os.path.exists(path):
        return path
    config = transformers.LlamaConfig(**ARCHS[arch], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(path)
    del model
    return path


def matmul_ceiling_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def runs(workloads: set, tiny: bool, peers: bool, gpus: int = 2) -> list[dict]:
    """The (workload, system, spec) list of this call."""
    out = []

    def add(workload, system, arch, seq, micro, **spec):
        out.append(dict(workload=workload, system=system, arch=arch, seq=seq, micro=micro, **spec))

    t0_arch, t3_arch = ("tiny", "tiny") if tiny else ("llama-3.2-1b", "llama-3.2-3b")
    seq0, seq_a1 = (64, 256) if tiny else (2048, 8192)
    if "T0" in workloads:
        for stage in (0, 3):
            add("T0", f"tidal (stage {stage})", t0_arch, seq0, 2 if tiny else 4, stage=stage)
        if peers:
            add("T0", "torch eager", t0_arch, seq0, 2 if tiny else 4)
            if not tiny:
                add("T0", "torch.compile", t0_arch, seq0, 4)
                add("T0", "DeepSpeed ZeRO-2", t0_arch, seq0, 4, stage=2)
    if "T3" in workloads:
        cap = None if tiny else T3_CAP_GIB
        common = dict(cap_gib=cap, checkpointing=("full", False))
        add("T3", "tidal (stage 2, offload_optimizer)", t3_arch, seq0, 1, stage=2, offload_optimizer=True, **common)
        add("T3", "tidal (stage 3, offload_optimizer + offload_param)", t3_arch, seq0, 1, stage=3,
            offload_optimizer=True, offload_param=True, **common)
        if peers:
            add("T3", "torch eager", t3_arch, seq0, 1, **common)
            if not tiny:
                add("T3", "DeepSpeed ZeRO-Offload (stage 2)", t3_arch, seq0, 1, stage=2, offload_optimizer=True,
                    **common)
    if "T1" in workloads:
        micro = 2 if tiny else 4
        for stage in (2, 3):
            add("T1", f"tidal ZeRO-{stage}", t0_arch, seq0, micro, stage=stage, world=gpus)
        if peers:
            add("T1", "torch DDP", t0_arch, seq0, micro, parallel="DDP", world=gpus)
            add("T1", "FSDP2", t0_arch, seq0, micro, parallel="FSDP2", world=gpus)
            if not tiny:
                for stage in (2, 3):
                    add("T1", f"DeepSpeed ZeRO-{stage}", t0_arch, seq0, micro, stage=stage, world=gpus)
    if "T2" in workloads:
        world, micro = (2, 1) if tiny else (4, 2)
        common = dict(world=world, checkpointing=("full", False))
        add("T2", "tidal ZeRO-3", "tiny" if tiny else "llama-3-8b", seq0, micro, stage=3, **common)
        if peers:
            add("T2", "FSDP2", "tiny" if tiny else "llama-3-8b", seq0, micro, parallel="FSDP2", **common)
    if "A1" in workloads:
        for name, ac in (("none", None), ("full", ("full", False)), ("selective: attention", ("attention", False)),
                         ("selective: mlp", ("mlp", False)), ("full + cpu_checkpointing", ("full", True))):
            add("A1", f"tidal (stage 0, {name})", t0_arch, seq_a1, 1, stage=0, checkpointing=ac)
    return out


def _last_error(stderr: str) -> str:
    """The line that names the failure: the last exception line, else the last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    named = [l for l in lines if l and not l.startswith(" ") and ("Error" in l or "Exception" in l)]
    return (named or lines)[-1][:300]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="directory for train.md and train.jsonl")
    ap.add_argument("--workloads", default="T0,T3,A1")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, fp32: checks the script")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--profile", action="store_true", help="profile one extra step of each run (files in --out)")
    ap.add_argument("--gpus", type=int, default=2, help="ranks of T1 (one GPU each)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(json.loads(args.child))
        if result is not None:  # rank 0 (or the only process)
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    if not args.out:
        ap.error("--out is required")
    workloads = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
    if not workloads <= {"T0", "T3", "A1", "T1", "T2"}:
        ap.error(f"--workloads {args.workloads!r}: only T0, T3, A1, T1, T2")
    for workload, gpus in (("T1", args.gpus), ("T2", 4)):
        if workload in workloads and not args.tiny and torch.cuda.device_count() < gpus:
            print(f"train.py: {workload} needs {gpus} GPUs, this machine has {torch.cuda.device_count()}",
                  file=sys.stderr)
            return 2
    if not args.tiny and not torch.cuda.is_available():
        print("train.py: no CUDA device (use --tiny to check the script on the CPU)", file=sys.stderr)
        return 2
    # An indexed device: torch.cuda.set_device refuses a bare "cuda".
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    common = dict(card=card, commit=commit(), date=datetime.date.today().isoformat())
    ceiling = matmul_ceiling_tflops(device)
    log(f"{card}; torch {torch.__version__}; matmul ceiling {ceiling and round(ceiling)} TFLOP/s; commit {commit()}")
    root = tempfile.mkdtemp(prefix="tidal-train-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    rows, failures = [], 0
    try:
        for run in runs(workloads, args.tiny, not args.no_peers, args.gpus):
            arch = ARCHS[run["arch"]]
            spec = dict(run, path=save_model(run["arch"], root, device), device=str(device), steps=args.steps,
                        vocab=arch["vocab_size"], bf16=not args.tiny,
                        profile_dir=os.path.abspath(args.out) if args.profile else None)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            log(f"{run['workload']} {run['system']}: {run['arch']}, seq {run['seq']}, micro-batch {run['micro']}")
            try:
                launch = [sys.executable]
                if run.get("world", 1) > 1:  # one process per rank
                    launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run['world']}"]
                    env["NCCL_NVLS_ENABLE"] = "0"
                proc = subprocess.run([*launch, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                      capture_output=True, text=True, timeout=args.timeout, env=env)
                result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                              None)
                error = None if result else _last_error(proc.stderr)
                if result is None:
                    name = "".join(c if c.isalnum() else "_" for c in f"{run['workload']}_{run['system']}")
                    with open(os.path.join(args.out, f"failed_{name}.log"), "w") as f:
                        f.write(proc.stdout + "\n" + proc.stderr)
            except subprocess.TimeoutExpired:
                result, error = None, f"timed out after {args.timeout} s"
            note = ""
            if result is None:
                failures += run["system"].startswith("tidal")
                note = f"failed: {error}"
                log(f"  {note}")
                result = {}
            else:
                fpt = flops_per_token(arch, run["seq"])
                result["mfu"] = (result["tokens_per_s"] * fpt / (ceiling * 1e12)) if ceiling else None
                log("  " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if v is not None))
            for metric, unit in (("tokens_per_s", "tok/s"), ("mfu", "fraction"), ("peak_memory_gib", "GiB"),
                                 ("static_memory_gib", "GiB"), ("peak_host_memory_gib", "GiB"), ("loss", "nats")):
                if metric in result and result[metric] is None:
                    continue
                gpus = run.get("world", 1) if device.type == "cuda" else 0
                name = "tokens_per_s_per_gpu" if metric == "tokens_per_s" and run.get("world", 1) > 1 else metric
                rows.append(dict(workload=run["workload"], system=run["system"], metric=name,
                                 value=result.get(metric), unit=unit, gpus=gpus,
                                 note=f"{run['arch']}, seq {run['seq']}, micro-batch {run['micro']}"
                                      + (f", GPU capped at {run['cap_gib']} GiB" if run.get("cap_gib") else "")
                                      + (f"; {note}" if note else ""), **common))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = ["workload", "system", "tok/s", "MFU", "peak GiB", "before step 1 GiB", "host GiB", "loss"]
    table = []
    for key in dict.fromkeys((r["workload"], r["system"]) for r in rows):
        got = {r["metric"]: r["value"] for r in rows if (r["workload"], r["system"]) == key}
        got.setdefault("tokens_per_s", got.get("tokens_per_s_per_gpu"))
        ran = got.get("tokens_per_s") is not None

        def cell(metric, spec):
            value = got.get(metric)
            return format(value, spec) if value is not None else "-" if ran else "failed"
        table.append([key[0], key[1], cell("tokens_per_s", ",.0f"), cell("mfu", ".1%"), cell("peak_memory_gib", ".1f"),
                      cell("static_memory_gib", ".1f"), cell("peak_host_memory_gib", ".1f"), cell("loss", ".4f")])
    print()
    print_table(header, table)
    write_markdown(os.path.join(args.out, "train.md"), f"training workloads, {card}, torch {torch.__version__}",
                   header, table)
    with open(os.path.join(args.out, "train.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
