"""Helpers for the mixed-precision and launch tests: a tiny teacher-student regression task whose
global batch any world size splits evenly, an fp32 torch AdamW reference on it, a scripted training
run through ``tidal.initialize`` (optional inf loss injected on chosen ranks and steps), and a runner
that executes it on N spawned Gloo ranks (or in this process) and returns every rank's result."""

import math

import torch
import torch.distributed as dist

import tidal
from train_util import free_port, spawn  # noqa: F401  (free_port: the launch test picks its port with it)

IN, HIDDEN, OUT = 8, 16, 4
GLOBAL_BATCH, ACCUM = 16, 2
LR = 1e-2

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: y is a fixed random linear map of x plus a little noise."""
    teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(7)) / math.sqrt(IN)
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    return x, x @ teacher + 0.01 * torch.randn(GLOBAL_BATCH, OUT, generator=g)


def micro_batch(step: int, accum: int, rank: int, world: int, accum_steps: int = ACCUM):
    x, y = global_batch(step)
    micro = GLOBAL_BATCH // (accum_steps * world)
    start = (accum * world + rank) * micro
    return x[start:start + micro], y[start:start + micro]


def config(precision: str = "fp32", stage: int = 0, accum_steps: int = ACCUM, **extra) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": accum_steps,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 256},
    }
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 1}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def reference(steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """fp32 torch AdamW on the full global batch: final weights and the loss of every step."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        x, y = global_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def checksum(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: sum, sum of |x| and sum of squares, in float64 (JSON friendly)."""
    return {name: [t.double().sum().item(), t.double().abs().sum().item(), t.double().pow(2).sum().item()]
            for name, t in sorted(state.items())}


def train(rank: int, world: int, cfg: dict, steps: int, overflow: dict | None = None, snapshots: bool = False,
          accum_steps: int = ACCUM) -> dict:
    """Trains ``steps`` global steps through ``tidal.initialize``; ``overflow`` maps a global step to
    the ranks whose loss is multiplied by inf on that step's first micro-batch. Returns per-step
    records (loss scale, counters, the global-batch loss, optionally full states before and after)."""
    engine = tidal.initialize(make_model(), cfg)
    dtype = next(engine.module.parameters()).dtype
    records = []
    for step in range(steps):
        before = engine.full_state_dict() if snapshots else None
        local_params_before = [p.detach().clone() for p in engine.module.parameters()]
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for a in range(accum_steps):
            x, y = micro_batch(step, a, rank, world, accum_steps)
            loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            loss_sum += loss.detach().double()
            if a == 0 and rank in (overflow or {}).get(step, ()):
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        records.append({
            "loss": loss_sum.item() / (accum_steps * world),
            "loss_scale": engine.loss_scale,
            "skipped_steps": engine.skipped_steps,
            "global_steps": engine.global_steps,
            "local_params_changed": any(not torch.equal(b, p.detach())
                                        for b, p in zip(local_params_before, engine.module.parameters())),
            "before": before,
            "after": engine.full_state_dict() if snapshots else None,
        })
    return {"rank": rank, "world": engine.world_size, "records": records, "state": engine.full_state_dict(),
            "master_dtype": engine.master.dtype, "param_dtypes": sorted({str(p.dtype) for p in
                                                                          engine.module.parameters()})}


def run(world: int, fn, args: tuple, out_dir: str) -> list:
    """``fn(rank, world, *args)`` on ``world`` Gloo ranks; every rank's return value, in rank order."""
    return spawn(world, fn, args, out_dir)


def assert_states_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
