#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Elastic training under torchrun: ranks that die, join and leave, and a job that carries on.

Run one agent per node (here: per process, on one machine), any number between the bounds:

    torchrun --nnodes 2:3 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 \\
        --rdzv-id demo --max-restarts 5 examples/elastic/train.py --out /tmp/elastic --steps 12 --step-seconds 1

What each worker does, every time torchrun's agent (re)starts it:
- the DeepSpeed config's ``elasticity`` section gives the same global batch at every world size in
  its range (micro-batch and accumulation steps for the world size in hand);
- the engine loads the latest checkpoint in ``--out`` if there is one (resharding the ZeRO state for
  the new world size) and the sampler resumes at the first sample no completed step has seen;
- each step ends with a checkpoint (``keep_last=2``) carrying the sampler's position, then a record
  of the samples each rank trained on in that step (so a step redone after a failure counts once);
- a peer that dies makes the next collective fail within ``TIDAL_COLLECTIVE_TIMEOUT_S`` (CollectiveError)
  instead of hanging; the worker exits and the agent restarts the job at the new world size.

The model is a small MLP on a fixed random regression dataset, so a run takes seconds on CPUs (Gloo).
"""

import argparse
import json
import os
import time

import torch

import tidal
from tidal.train.data import ElasticSampler

SAMPLES, FEATURES, OUTPUTS = 240, 16, 4
CONFIG = {
    "elasticity": {"enabled": True, "max_train_batch_size": 12, "micro_batch_sizes": [2], "min_gpus": 1,
                   "max_gpus": 3, "version": 0.1},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 1},
    "gradient_clipping": 1.0,
}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return x, torch.tanh(x @ torch.randn(FEATURES, OUTPUTS, generator=g))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, OUTPUTS))


def train(out: str, steps: int, step_seconds: float = 0.0, after_step=None) -> dict:
    """Trains to ``steps`` optimizer steps from the latest checkpoint in ``out`` (if any); returns the
    final full weights. ``after_step(engine)`` (optional) runs after each step's checkpoint."""
    x, y = dataset()
    engine = tidal.initialize(model(), CONFIG)
    sampler = ElasticSampler.for_engine(SAMPLES, engine, seed=0)
    checkpoints = os.path.join(out, "checkpoints")
    if os.path.isfile(os.path.join(checkpoints, "latest")):
        engine.load_checkpoint(checkpoints)
        sampler.load_state_dict(engine.client_state["sampler"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if engine.rank == 0:
        print(f"[restart {restart}] world size {engine.world_size}, global batch {engine.config.train_batch_size}, "
              f"from step {engine.global_steps}", flush=True)
    batches = iter(sampler)
    while engine.global_steps < steps:
        seen = []
        for _ in range(engine.gradient_accumulation_steps):
            ids = next(batches)
            seen += ids
            engine.backward(torch.nn.functional.mse_loss(engine(x[ids]), y[ids]))
            engine.step()
        time.sleep(step_seconds)  # room for the demonstration (and its test) to kill or add a node
        engine.save_checkpoint(checkpoints, client_state={"sampler": sampler.state_dict()}, keep_last=2)
        # the samples of a step count once its checkpoint is in place (a step redone after a
        # failure overwrites its record)
        record = os.path.join(out, "samples", f"step{engine.global_steps:05d}_rank{engine.rank}.json")
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record + ".tmp", "w") as f:
            json.dump({"world_size": engine.world_size, "samples": seen}, f)
        os.replace(record + ".tmp", record)
        if after_step is not None:
            after_step(engine)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, os.path.join(out, "final.pt"))
        print(f"done: {engine.global_steps} steps", flush=True)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoints, sample records and the final weights go here")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--step-seconds", type=float, default=0.0, help="pause after each step")
    args = ap.parse_args()
    train(args.out, args.steps, args.step_seconds)


if __name__ == "__main__":
    main()
