"""Shared pieces of the training tests: a small model, a fixed global batch per step that any world
size splits evenly, a single-process torch AdamW reference, and a runner that executes a script of
train / save / load actions on N Gloo ranks (spawned processes) or in this process."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tidal

GLOBAL_BATCH, ACCUM, IN, OUT = 24, 2, 13, 5
LR, WEIGHT_DECAY, CLIP = 1e-2, 0.1, 0.5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 37), torch.nn.Tanh(), torch.nn.Linear(37, OUT),
                               torch.nn.LayerNorm(OUT))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def micro_batch(step: int, accum: int, rank: int, world: int):
    """Rows of the global batch for (accumulation step, rank): contiguous, equal sized."""
    x, y = global_batch(step)
    micro = GLOBAL_BATCH // (ACCUM * world)
    start = (accum * world + rank) * micro
    return x[start:start + micro], y[start:start + micro]


def config(stage: int, world: int, **extra) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 512},  # several stage-2 buckets
    }
    cfg.update(extra)
    return cfg


def reference(steps: int) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        opt.zero_grad()
        x, y = global_batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _script(rank: int, world: int, stage: int, actions: list, device: str = "cpu") -> dict:
    device = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    engine = tidal.initialize(make_model().to(device), config(stage, world))
    boundaries = []
    for action, *args in actions:
        if action == "train":
            first, last = args
            for step in range(first, last):
                for a in range(ACCUM):
                    x, y = (t.to(device) for t in micro_batch(step, a, rank, world))
                    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
                    boundaries.append(engine.is_gradient_accumulation_boundary())
                    engine.step()
        elif action == "save":
            engine.save_checkpoint(*args)
        elif action == "save_async":  # written while the next actions run
            engine.save_checkpoint(*args, async_save=True)
        elif action == "load":
            engine.load_checkpoint(*args)
    engine.wait_for_checkpoint()
    state = {k: v.cpu() for k, v in engine.full_state_dict().items()}
    return {"state": state, "boundaries": boundaries, "global_steps": engine.global_steps}


def _worker(rank: int, world: int, port: int, fn, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, fn, args: tuple, out_dir: str) -> list:
    """``fn(rank, world, *args)`` on ``world`` Gloo/NCCL ranks (in this process when world is 1);
    every rank's return value, in rank order."""
    if world == 1:
        return [fn(0, 1, *args)]
    mp.start_processes(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def run(world: int, stage: int, actions: list, out_path: str, device: str = "cpu") -> dict:
    """Runs ``actions`` on ``world`` ranks (on "cuda": rank r on cuda:r, NCCL); returns rank 0's final
    full state and counters. ``out_path``'s directory receives the ranks' results."""
    return spawn(world, _script, (stage, actions, device), os.path.dirname(out_path))[0]


def assert_state_close(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
