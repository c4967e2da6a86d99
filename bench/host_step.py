#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Host time on the serving step's critical path: between one step's sampled tokens reaching the host
and the launch of the next step, the device has nothing queued, so this host work (the scheduler's
update and plan, the per-request bookkeeping left there, staging) is device idle time on every step.
Measured at one batch size of decode steps on a tiny model (so the model's own time does not hide
it), synchronous scheduling only: under ``async_scheduling=True`` the next step is launched before
the tokens are awaited, so the path is empty by construction.

    python bench/host_step.py [--batch 256] [--steps 100] [--device cpu]
"""

import argparse
import tempfile
import time

import torch
import transformers

import tidal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                                      max_position_embeddings=4096)
    path = tempfile.mkdtemp(prefix="tidal_host_step_")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    llm = tidal.LLM(path, device=args.device, dtype="float32", max_num_seqs=args.batch, max_model_len=2048,
                    num_kv_blocks=args.batch * 40, block_size=16, async_scheduling=False)
    engine = llm.engine
    state = {"tokens_at": None, "critical": 0.0}
    execute = engine.runner.execute

    class Timed:
        """The step's pending tokens, noting when they reach the host."""

        def __init__(self, pending):
            self.pending = pending

        def result(self):
            out = self.pending.result()
            state["tokens_at"] = time.perf_counter()
            return out

        def __getattr__(self, name):
            return getattr(self.pending, name)

    def timed_execute(*a, **k):
        if state["tokens_at"] is not None:
            state["critical"] += time.perf_counter() - state["tokens_at"]
        pending = execute(*a, **k)
        return None if pending is None else Timed(pending)

    engine.runner.execute = timed_execute
    params = tidal.SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        engine.add_request(str(i), torch.randint(0, 512, (100,), generator=g).tolist(), params)
    for _ in range(10):
        engine.step(return_unfinished=False)
    state["critical"] = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step(return_unfinished=False)
    total = time.perf_counter() - start
    print(f"batch {args.batch} on {args.device}: step {total / args.steps * 1e3:.3f} ms, host time between a step's "
          f"tokens and the next launch {state['critical'] / args.steps * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
