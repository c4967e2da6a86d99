#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Elastic training under torchrun: ranks that die, join and leave, and a job that carries on.

Run one agent per node (here: per process, on one machine), any number between the bounds; kill one
(its worker with it) and the others carry on smaller; start another and they grow back:

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    torchrun --nnodes 2:3 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 \\
        --rdzv-id demo --max-restarts 5 --rdzv-conf last_call_timeout=2 \\
        examples/elastic/train.py --out /tmp/elastic --steps 18 --step-seconds 1

NOTE: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each round's workers a store of their own instead of
the agents' rendezvous store. With the shared store, torch's agents time out assigning ranks when a
node joins a running job (scale-up; a plain torch.distributed script fails the same way).

What each worker does, every time torchrun's agent (re)starts it:
- the DeepSpeed config's ``elasticity`` section gives the same global batch at every world size in
  its range (micro-batch and accumulation steps for the world size in hand);
- the engine loads the latest checkpoint in ``--out`` if there is one (resharding the ZeRO state for
  the new world size) and the sampler resumes at the first sample no completed step has seen;
- each step ends with a checkpoint (``keep_last=2``) carrying the sampler's position and the record of
  every step so far (its world size and the samples all ranks trained on): a step redone after a
  failure replaces the record of the attempt that never reached its checkpoint;
- a peer that dies makes the next collective fail within ``TIDAL_COLLECTIVE_TIMEOUT_S`` (CollectiveError)
  instead of hanging; the worker exits and the agent restarts the job at the new world size.

The model is a small MLP on a fixed random regression dataset, so a run takes seconds on CPUs (Gloo).
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

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
    trained = []  # per completed step: {"step", "world_size", "samples"}
    if os.path.isfile(os.path.join(checkpoints, "latest")):
        engine.load_checkpoint(checkpoints)
        sampler.load_state_dict(engine.client_state["sampler"])
        trained = engine.client_state["trained"]
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
        everyone = [seen]
        if engine.world_size > 1:
            everyone = [None] * engine.world_size
            dist.all_gather_object(everyone, seen)
        trained.append({"step": engine.global_steps, "world_size": engine.world_size,
                        "samples": [i for ids in everyone for i in ids]})
        time.sleep(step_seconds)  # room for the demonstration (and its test) to kill or add a node
        engine.save_checkpoint(checkpoints, client_state={"sampler": sampler.state_dict(), "trained": trained},
                               keep_last=2)
        if after_step is not None:
            after_step(engine)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, os.path.join(out, "final.pt"))
        with open(os.path.join(out, "trained.json"), "w") as f:
            json.dump(trained, f)
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
