#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""D1: disaggregated prefill/decode against one colocated engine, on one GPU.

Model: Llama-3-8B's architecture, random bf16 weights (as S2/S3 of bench/serve.py), saved once.
Workload (random.Random(0)): 32 long requests (input uniform in [4096, 8192] tokens, output 256) and
128 short chat-sized ones (input uniform in [64, 256], output 128), ids uniform in the vocab, greedy,
``ignore_eos``; arrivals are a Poisson process of 1 long and 4 short requests per second, the two
kinds interleaved by arrival time. Every request streams (``/v1/completions``, stream true) from an
asyncio client; per request: time to first token (TTFT, from its send to its first chunk) and time
per output token (TPOT, (last chunk - first chunk) / (tokens - 1)); throughput = output tokens /
time from the first send to the last chunk.

- colocated: one ``tidal serve`` process (``--gpu-memory-utilization 0.9``);
- disaggregated: ``tidal serve --role prefill`` and ``--role decode`` processes on the same GPU,
  each ``--gpu-memory-utilization 0.45``, KV through the --kv-connector (torch by default), and
  ``tidal serve --role router`` in front;
- one process: ``tidal serve --role disaggregated`` (``--gpu-memory-utilization 0.9``): the router, a
  prefill engine and a decode engine in one process over one copy of the weights, KV blocks copied
  on the card, decode steps on a higher-priority CUDA stream;
- SM groups (GPU only): one process with ``--prefill-sms N`` for each N of ``--prefill-sms`` (default
  48): the prefill engine's kernels on N of the card's SMs, the decode engine's on the rest.

Target (issue D1): the short requests' p99 TPOT at least 2x better disaggregated than colocated, at no
more than 10% lower throughput. ``--tiny``: a tiny model and workload on the CPU, to check the script.

    python bench/disagg.py --out DIR [--kv-connector torch|nixl]
                           [--systems colocated,disaggregated,one-process,sm-groups] [--prefill-sms 32,48,64] [--tiny]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import torch

import serve as base
from report import print_table, write_markdown

SYSTEMS = ("colocated", "disaggregated", "one-process", "sm-groups")
FULL = dict(num_long=32, long_in=(4096, 8192), long_out=256, num_short=128, short_in=(64, 256), short_out=128,
            long_rate=1.0, short_rate=4.0, max_model_len=8448)
TINY = dict(num_long=3, long_in=(200, 400), long_out=16, num_short=8, short_in=(8, 32), short_out=12,
            long_rate=2.0, short_rate=8.0, max_model_len=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(sizes, vocab: int) -> list[dict]:
    rng = random.Random(0)
    reqs = []
    for kind in ("long", "short"):
        t = 0.0
        for _ in range(sizes[f"num_{kind}"]):
            t += rng.expovariate(sizes[f"{kind}_rate"])
            n = rng.randint(*sizes[f"{kind}_in"])
            reqs.append(dict(kind=kind, at=t, prompt=[rng.randrange(vocab) for _ in range(n)],
                             max_tokens=sizes[f"{kind}_out"]))
    return sorted(reqs, key=lambda r: r["at"])


class Servers:
    """`tidal serve` processes, stopped (SIGINT, then kill) on exit."""

    def __init__(self, log_dir: str):
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir

    def start(self, name: str, args: list[str]) -> str:
        port = free_port()
        log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "tidal", "serve", *args, "--port", str(port)],
                                           stdout=log, stderr=subprocess.STDOUT))
        return f"http://127.0.0.1:{port}"

    def wait(self, url: str, timeout: float = 900.0) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a server exited (see {self.log_dir})")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


async def drive(url: str, reqs: list[dict]) -> tuple[list[dict], float]:
    """Sends every request at its arrival time, streaming; returns per-request timings and the makespan."""
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def one(r):
            await asyncio.sleep(max(0.0, r["at"] - (time.perf_counter() - start)))
            sent = time.perf_counter()
            stamps, error = [], None
            # logprobs=0: a chunk per step even where the tokens complete no text (the model has no tokenizer)
            body = {"model": "bench", "prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0,
                    "ignore_eos": True, "stream": True, "logprobs": 0}
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    error = (await resp.aread()).decode()[:200]
                else:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            event = json.loads(line[6:])
                            if "error" in event:
                                error = str(event["error"])[:200]
                            elif event.get("choices"):  # one chunk per step, text or not
                                stamps.append(time.perf_counter())
            return dict(kind=r["kind"], sent=sent, stamps=stamps, error=error, tokens=r["max_tokens"])

        results = await asyncio.gather(*(one(r) for r in reqs))
        return results, time.perf_counter() - start


def summarize(results: list[dict], makespan: float) -> dict:
    failed = [r for r in results if r["error"] or not r["stamps"]]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]['error']}")
    out = {"output_tokens_per_s": sum(r["tokens"] for r in results) / makespan}
    for kind in ("short", "long"):
        rs = [r for r in results if r["kind"] == kind]
        ttft = sorted(1e3 * (r["stamps"][0] - r["sent"]) for r in rs)
        tpot = sorted(1e3 * (r["stamps"][-1] - r["stamps"][0]) / max(r["tokens"] - 1, 1) for r in rs)
        for name, values in (("ttft", ttft), ("tpot", tpot)):
            out[f"{kind}_{name}_p50_ms"] = statistics.median(values)
            out[f"{kind}_{name}_p99_ms"] = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-connector", choices=["torch", "nixl"], default="torch")
    ap.add_argument("--systems", default=None,
                    help=f"which of {', '.join(SYSTEMS)} to run, in that order (default all, sm-groups only on a "
                         f"GPU; colocated is the baseline of the ratios)")
    ap.add_argument("--prefill-sms", default="48",
                    help="sm-groups: the prefill engine's SMs, one run per comma-separated value (default 48)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload on the CPU")
    args = ap.parse_args()
    if args.systems is None:
        args.systems = ",".join(s for s in SYSTEMS if not (args.tiny and s == "sm-groups"))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or not set(systems) <= set(SYSTEMS) or "colocated" not in systems:
        ap.error(f"--systems {args.systems!r}: a comma-separated subset of {', '.join(SYSTEMS)} with colocated")
    if args.tiny and "sm-groups" in systems:
        ap.error("--systems sm-groups splits a GPU's SMs; --tiny runs on the CPU")
    try:
        prefill_sms = [int(n) for n in args.prefill_sms.split(",")]
    except ValueError:
        ap.error(f"--prefill-sms {args.prefill_sms!r}: comma-separated SM counts")
    if not args.tiny and not torch.cuda.is_available():
        print("disagg.py: no CUDA device (use --tiny to check the script on the CPU)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    sizes = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    res = base.Results(card, 1 if device.type == "cuda" else 0)
    model, root, path = base.build_model("llama", args.tiny, device, dtype,
                                         max_position_embeddings=max(sizes["max_model_len"], 8192))
    vocab = model.config.vocab_size
    del model
    base.free_memory(device)
    reqs = workload(sizes, vocab)
    common = [path, "--served-model-name", "bench", "--max-model-len", str(sizes["max_model_len"]),
              "--device", str(device)]
    servers = Servers(args.out)
    measured = {}
    try:
        runs = [(s, []) for s in SYSTEMS if s in systems and s != "sm-groups"]
        if "sm-groups" in systems:
            runs += [(f"sm-groups-{n}", ["--prefill-sms", str(n)]) for n in prefill_sms]
        for system, extra in runs:
            if system == "colocated":
                url = servers.start("colocated", common + ["--gpu-memory-utilization", "0.9"])
                servers.wait(url)
            elif system == "one-process" or system.startswith("sm-groups"):
                url = servers.start(system, common + ["--gpu-memory-utilization", "0.9",
                                                      "--role", "disaggregated", *extra])
                servers.wait(url)
            else:
                share = ["--gpu-memory-utilization", "0.45", "--kv-connector", args.kv_connector]
                # One after the other: each engine sizes its KV pool from what it added to the card,
                # which another engine loading at the same moment would blur.
                prefill = servers.start("prefill", common + share + ["--role", "prefill"])
                servers.wait(prefill)
                decode = servers.start("decode", common + share + ["--role", "decode"])
                servers.wait(decode)
                url = servers.start("router", ["--role", "router", "--prefill", prefill, "--decode", decode])
                servers.wait(url)
            asyncio.run(drive(url, [dict(r, prompt=r["prompt"][:32], max_tokens=4) for r in reqs[:4]]))  # warm-up
            results, makespan = asyncio.run(drive(url, reqs))
            measured[system] = summarize(results, makespan)
            for metric, value in measured[system].items():
                res.add("D1", f"tidal {system}", metric, value, "tok/s" if metric.endswith("per_s") else "ms",
                        note=f"kv_connector {args.kv_connector}" if system == "disaggregated" else
                        "one process, KV blocks copied on the device" if system == "one-process" else
                        f"one process, prefill on {extra[1]} SMs (rounded up), decode on the rest" if extra else "")
            servers.stop()
    finally:
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)
    others = [s for s in measured if s != "colocated"]
    header = ["metric", "colocated"] + [f"{s} (ratio)" for s in others]
    table = []
    for metric in measured.get("colocated", {}):
        a = measured["colocated"][metric]
        row = [metric, f"{a:,.1f}"]
        for system in others:  # ratios > 1 are better than colocated
            b = measured[system][metric]
            ratio = "-" if not a or not b else f"{(b / a if metric.endswith('per_s') else a / b):.2f}x"
            row.append(f"{b:,.1f} ({ratio})")
        table.append(row)
    for system in others:
        tpot = measured["colocated"]["short_tpot_p99_ms"] / measured[system]["short_tpot_p99_ms"]
        thr = measured[system]["output_tokens_per_s"] / measured["colocated"]["output_tokens_per_s"]
        verdict = (f"{system}: short p99 TPOT {tpot:.2f}x better (target >= 2x), throughput {thr:.2f}x colocated "
                   f"(target >= 0.90x): {'met' if tpot >= 2 and thr >= 0.9 else 'not met'}")
        res.details.append(verdict)
        print(verdict)
    write_markdown(os.path.join(args.out, "disagg.md"), f"D1, {card}, `python bench/disagg.py "
                   + " ".join(sys.argv[1:]) + "`", header, table)
    with open(os.path.join(args.out, "disagg.jsonl"), "w") as f:
        for r in res.rows:
            f.write(json.dumps(r) + "\n")
    print_table(header, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
