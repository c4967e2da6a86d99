#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""L1: load test of ``tidal serve``: N concurrent streaming clients (the official ``openai`` client).

The script starts ``python -m tidal serve MODEL`` itself (the demo model of ``tidal.demo.ensure_model``
unless ``--model PATH``; trained on first use), with ``--max-num-seqs`` at the largest N and, where
the server has it, ``--max-concurrent-requests`` above it, so that every client's stream is in flight
at once. A model without a chat template is served from a temporary copy (symlinks) whose
tokenizer_config.json adds a plain one, so chat requests run too; the report says so.

Per N of ``--clients`` (32,128,512): one ``AsyncOpenAI`` client (``max_retries=0``, its httpx pool
raised to N + 16 connections), N coroutines each sending requests back to back for ``--duration``
seconds (or ``--requests-per-client`` each), then waiting for their last one. Every request streams
with ``stream_options={"include_usage": true}``; per request from random.Random(seed, client): half
``/v1/completions``, half ``/v1/chat/completions``; a slice of Python source of ``--prompt-len``
characters (clamped to fit max_model_len); max_tokens uniform in ``--max-tokens``; temperature 0,
0.7 or 1; ``ignore_eos`` so the output has max_tokens tokens.

- TTFT: send -> the first chunk carrying text (or a finish_reason, for an output without text);
- TPOT: (last chunk with a choice - that first chunk) / (usage.completion_tokens - 1), requests of >= 2 tokens;
- requests/s and output tokens/s: over the time from the first send to the last request's end;
- errors, by type: an exception of the client (its class and HTTP status), an error event in the
  stream, a stream without usage or without a finish_reason;
- server: RSS (VmRSS of the server process and its children, /proc) before, peak, after; the KV
  pool and running requests from ``GET /metrics`` (tidal_kv_blocks_used / tidal_kv_blocks_total;
  free = total - used). After each N the script waits (``--drain-timeout``) for no running or
  waiting request and no used block: blocks still used then are leaked.

Exit status 1 on any error, leaked block or server exit.

    python bench/load.py --out DIR [--clients 32,128,512] [--duration 30 | --requests-per-client K]
                         [--model PATH] [--device cpu|cuda] [--server-args "--kv-cache-memory-fraction 0.1"]

Writes DIR/load.md (table + details), DIR/load.jsonl (one JSON object per measurement) and
DIR/load_server.log (the server's output).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
SERVED_NAME = "bench"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CHAT_OVERHEAD = 64  # characters a chat template may add around a prompt


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


# ---- shared with bench/soak.py: the server, its RSS and metrics, the model, prompts ---------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> int:
    """Raises the soft limit of open files to the hard one (the server inherits it): 512 streams
    are 512 sockets on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 16, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def resolve_model(model: str | None, device: str) -> str:
    """``model``, else the demo model's directory, trained first if need be: in a subprocess, so that
    no GPU memory of the training stays with this process while the server runs."""
    if model:
        return model
    code = ("import sys; from tidal import demo; "
            f"print(demo.ensure_model(device={device.split(':')[0]!r}, out=sys.stderr))")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True, text=True).stdout
    return out.strip().splitlines()[-1]


def with_chat_template(model: str, tmp: str) -> tuple[str, bool]:
    """(directory to serve, whether a chat template was added): a model whose tokenizer_config.json
    has no chat_template is served from a copy of symlinks with CHAT_TEMPLATE added."""
    config_path = Path(model) / "tokenizer_config.json"
    if not (Path(model) / "tokenizer.json").is_file():
        return model, False
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("chat_template"):
        return model, False
    shim = Path(tmp) / "model"
    shim.mkdir()
    for entry in Path(model).iterdir():
        if entry.name != "tokenizer_config.json":
            (shim / entry.name).symlink_to(entry.resolve())
    (shim / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=2))
    return str(shim), True


def serve_flags() -> set[str]:
    """The options ``tidal serve --help`` lists (this checkout's server may predate some)."""
    out = subprocess.run([sys.executable, "-m", "tidal", "serve", "--help"], capture_output=True, text=True).stdout
    return {word.rstrip(",") for word in out.split() if word.startswith("--")}


def rss_mib(pid: int) -> float | None:
    """VmRSS of ``pid`` and its descendants, MiB; None once it has exited."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            if p == pid:
                return None
    return total / 1024


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value} (labels dropped; the last sample of a name wins)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name.split("{", 1)[0]] = float(value)
            except ValueError:
                pass
    return out


class Server:
    """One ``python -m tidal serve`` subprocess, its output in ``log_path``; stopped with SIGINT, then kill."""

    def __init__(self, model: str, args: list[str], log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "tidal", "serve", model, "--port", str(self.port),
                        "--served-model-name", SERVED_NAME, *args]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        log(f"server pid {self.proc.pid}: {shlex.join(self.command)}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, timeout: float = 1800.0) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s")

    def rss_mib(self) -> float | None:
        return rss_mib(self.proc.pid)

    async def metrics(self, client) -> dict[str, float]:
        response = await client.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return parse_metrics(response.text)

    async def model_info(self, client) -> dict:
        response = await client.get(self.url + "/v1/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]

    async def drain(self, client, timeout: float) -> tuple[dict[str, float], float]:
        """Waits until no request runs or waits and no KV block is used (or ``timeout``): (metrics, seconds)."""
        start = time.perf_counter()
        while True:
            m = await self.metrics(client)
            idle = not m.get("tidal_num_requests_running") and not m.get("tidal_num_requests_waiting")
            if idle and not m.get("tidal_kv_blocks_used") or time.perf_counter() - start > timeout:
                return m, time.perf_counter() - start
            await asyncio.sleep(0.25)

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> int | None:
        if self.alive:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.proc.returncode


def load_corpus(max_chars: int = 400_000) -> str:
    """ASCII Python source from the standard library (what the demo model was trained on), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = []
    for name in ("argparse.py", "asyncio/base_events.py", "json/decoder.py", "dataclasses.py", "typing.py",
                 "collections/__init__.py", "random.py", "inspect.py"):
        try:
            text.append((root / name).read_text(encoding="ascii", errors="ignore"))
        except OSError:
            pass
    out = "\n".join(text)[:max_chars]
    return out if len(out) > 10_000 else (CHAT_TEMPLATE + " def f(x):\n    return x + 1\n") * 400


def prompt_text(rng: random.Random, corpus: str, lo: int, hi: int) -> str:
    n = rng.randint(lo, max(lo, hi))
    start = rng.randrange(len(corpus) - n)
    return corpus[start:start + n]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def device_name(device: str) -> str:
    if device.startswith("cuda"):  # asked in a subprocess: no CUDA context stays here
        index = device.partition(":")[2] or "0"
        code = f"import torch; print(torch.cuda.get_device_name({index}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() or device
    return f"CPU ({os.cpu_count()} cores)"


# ---- the load ----------------------------------------------------------------------------------

class Plan:
    """What a request may be: prompt lengths in characters, max_tokens range, whether chat works."""

    def __init__(self, corpus: str, max_model_len: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
                 chat: bool):
        self.corpus, self.chat, self.max_tokens = corpus, chat, max_tokens
        hi = min(prompt_len[1], max_model_len - max_tokens[1] - CHAT_OVERHEAD)
        if hi < 1:
            raise ValueError(f"max_model_len={max_model_len} leaves no room for a prompt next to max_tokens "
                             f"{max_tokens[1]}; lower --max-tokens")
        self.prompt_len = (min(prompt_len[0], hi), hi)


async def one_request(client, rng: random.Random, plan: Plan) -> dict:
    import openai

    chat = plan.chat and rng.random() < 0.5
    max_tokens = rng.randint(*plan.max_tokens)
    text = prompt_text(rng, plan.corpus, *plan.prompt_len)
    common = dict(model=SERVED_NAME, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.7, 1.0]), stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    rec = dict(kind="chat" if chat else "completion", sent=time.perf_counter(), first=None, last=None, tokens=0,
               error=None)
    finished = False
    try:
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
        else:
            stream = await client.completions.create(prompt=text, **common)
        usage = None
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = (choice.delta.content if chat else choice.text) or ""
                if not piece and choice.finish_reason is None:
                    continue  # the chat role chunk
                if rec["first"] is None:
                    rec["first"] = now
                rec["last"] = now
                finished = finished or choice.finish_reason is not None
        if usage is None:
            rec["error"] = "no usage chunk"
        elif not finished:
            rec["error"] = "no finish_reason"
        else:
            rec["tokens"] = usage.completion_tokens
    except openai.APIStatusError as e:
        rec["error"] = f"{type(e).__name__} {e.status_code}"
    except openai.APIError as e:  # connection, timeout, or an error event in the stream
        rec["error"] = type(e).__name__ + (f": {e.message[:80]}" if type(e) is openai.APIError else "")
    except Exception as e:  # what the client does not wrap (a connection that breaks mid-stream)
        rec["error"] = type(e).__name__
    rec["end"] = time.perf_counter()
    return rec


async def run_clients(url: str, n: int, plan: Plan, duration: float, per_client: int | None, seed: int,
                      timeout: float) -> tuple[list[dict], float, int]:
    """(records, seconds from the first send to the last end, most requests in flight at once)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=60.0))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
    records: list[dict] = []
    inflight = [0, 0]  # now, peak
    start = time.perf_counter()
    deadline = start + duration

    async def loop(cid: int):
        rng = random.Random(seed * 1_000_003 + cid)
        i = 0
        while (i < per_client) if per_client is not None else (time.perf_counter() < deadline):
            inflight[0] += 1
            inflight[1] = max(inflight[1], inflight[0])
            records.append(await one_request(client, rng, plan))
            inflight[0] -= 1
            i += 1

    try:
        await asyncio.gather(*(loop(c) for c in range(n)))
    finally:
        await client.close()
        await http.aclose()
    end = max((r["end"] for r in records), default=time.perf_counter())
    return records, end - start, inflight[1]


async def sample_server(server: Server, client, peaks: dict, stop: asyncio.Event, every: float = 0.5) -> None:
    """Peaks of RSS, running requests and used KV blocks while the clients run."""
    while not stop.is_set():
        rss = server.rss_mib()
        if rss is not None:
            peaks["rss"] = max(peaks.get("rss", 0.0), rss)
        try:
            m = await server.metrics(client)
            peaks["running"] = max(peaks.get("running", 0), int(m.get("tidal_num_requests_running", 0)))
            peaks["kv_used"] = max(peaks.get("kv_used", 0), int(m.get("tidal_kv_blocks_used", 0)))
        except Exception:  # a busy server may answer late; the next sample tries again
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def measure(server: Server, n: int, plan: Plan, args, res) -> dict:
    import httpx

    async with httpx.AsyncClient() as side:
        before = await server.metrics(side)
        rss_before = server.rss_mib()
        peaks: dict = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_server(server, side, peaks, stop))
        records, seconds, client_peak = await run_clients(server.url, n, plan, args.duration, args.requests_per_client,
                                                          args.seed, args.request_timeout)
        stop.set()
        await sampler
        if not server.alive:
            raise RuntimeError(f"the server exited with {server.proc.returncode}: {server.tail()}")
        after, drain_s = await server.drain(side, args.drain_timeout)
        rss_after = server.rss_mib()
    ok = [r for r in records if r["error"] is None]
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    ttft = [1e3 * (r["first"] - r["sent"]) for r in ok if r["first"] is not None]
    tpot = [1e3 * (r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] >= 2]
    total = after.get("tidal_kv_blocks_total", 0)
    leaked = int(after.get("tidal_kv_blocks_used", 0))
    out = dict(clients=n, requests=len(ok), requests_per_s=len(ok) / seconds,
               output_tokens_per_s=sum(r["tokens"] for r in ok) / seconds,
               ttft_p50_ms=pct(ttft, 0.5), ttft_p99_ms=pct(ttft, 0.99), tpot_p50_ms=pct(tpot, 0.5),
               tpot_p99_ms=pct(tpot, 0.99), errors=sum(errors.values()), rss_mib_before=rss_before,
               rss_mib_peak=peaks.get("rss"), rss_mib_after=rss_after, kv_blocks_total=int(total),
               kv_blocks_used_before=int(before.get("tidal_kv_blocks_used", 0)), kv_blocks_used_peak=peaks.get("kv_used"),
               kv_blocks_free_after=int(total) - leaked, kv_blocks_leaked=leaked,
               running_peak=peaks.get("running"), client_inflight_peak=client_peak, seconds=seconds, drain_s=drain_s,
               chat_requests=sum(r["kind"] == "chat" for r in ok))
    units = dict(requests="requests", requests_per_s="req/s", output_tokens_per_s="tok/s", ttft_p50_ms="ms",
                 ttft_p99_ms="ms", tpot_p50_ms="ms", tpot_p99_ms="ms", errors="requests", rss_mib_before="MiB",
                 rss_mib_peak="MiB", rss_mib_after="MiB", kv_blocks_total="blocks", kv_blocks_used_peak="blocks",
                 kv_blocks_free_after="blocks", kv_blocks_leaked="blocks",
                 running_peak="requests", client_inflight_peak="requests")
    for metric, unit in units.items():
        extra = {"errors_by_type": errors} if metric == "errors" and errors else {}
        res.add("L1", "tidal", metric, out[metric], unit, clients=n, **extra)
    out["errors_by_type"] = errors
    return out


def fmt(v, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def build_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["clients", "requests", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
              "errors", "RSS MiB before/peak/after", "KV used peak", "KV free after/total", "leaked", "running peak"]
    table = []
    for r in rows:
        table.append([str(r["clients"]), str(r["requests"]), fmt(r["requests_per_s"], ",.2f"),
                      fmt(r["output_tokens_per_s"]), fmt(r["ttft_p50_ms"]), fmt(r["ttft_p99_ms"]),
                      fmt(r["tpot_p50_ms"], ",.2f"), fmt(r["tpot_p99_ms"], ",.2f"), str(r["errors"]),
                      f"{fmt(r['rss_mib_before'], ',.0f')}/{fmt(r['rss_mib_peak'], ',.0f')}/"
                      f"{fmt(r['rss_mib_after'], ',.0f')}", str(r["kv_blocks_used_peak"]),
                      f"{r['kv_blocks_free_after']}/{r['kv_blocks_total']}", str(r["kv_blocks_leaked"]),
                      str(r["running_peak"])])
    return header, table


def int_pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO,HI with 1 <= LO <= HI")
    return lo, hi


def server_args(args, flags: set[str], max_clients: int) -> list[str]:
    extra = shlex.split(args.server_args)
    out = ["--device", args.device]
    if "--max-num-seqs" not in extra:
        out += ["--max-num-seqs", str(args.max_num_seqs or max_clients)]
    if "--max-concurrent-requests" in flags and "--max-concurrent-requests" not in extra:
        out += ["--max-concurrent-requests", str(max(1024, 2 * max_clients))]
    return out + extra


async def warm_up(url: str, plan: Plan) -> list[dict]:
    """A few requests of each kind before timing: first-step costs, and a check that both endpoints answer."""
    small = Plan(plan.corpus, 10 ** 9, (8, 32), (4, 8), plan.chat)
    records, _, _ = await run_clients(url, 4, small, 0.0, 2, seed=12345, timeout=600.0)
    return [r for r in records if r["error"] is not None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for load.md, load.jsonl and load_server.log")
    ap.add_argument("--clients", default="32,128,512", help="comma-separated concurrent client counts")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each client keeps sending (default 30)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="a fixed count per client instead")
    ap.add_argument("--model", default=None, help="a Hugging Face model directory (default: the demo model)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--prompt-len", type=int_pair, default=(16, 256), help="prompt characters LO,HI (default 16,256)")
    ap.add_argument("--max-tokens", type=int_pair, default=(16, 64), help="max_tokens LO,HI (default 16,64)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="the server's --max-num-seqs (default: largest N)")
    ap.add_argument("--server-args", default="", help="more `tidal serve` options, one string")
    ap.add_argument("--no-chat", action="store_true", help="completions only")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the KV pool to empty")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: want comma-separated integers")
    if not clients or min(clients) < 1:
        ap.error("--clients: at least one count, each >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    import serve as base  # Results rows, as every bench/ script writes them
    from report import print_table, write_markdown

    os.makedirs(args.out, exist_ok=True)
    fd_limit = raise_fd_limit()
    if fd_limit < 2 * max(clients) + 64:
        log(f"warning: the open-file limit is {fd_limit}; {max(clients)} clients need about {2 * max(clients) + 64}")
    card = device_name(args.device)
    res = base.Results(card, 1 if args.device.startswith("cuda") else 0)
    model = resolve_model(args.model, args.device)
    tmp = tempfile.mkdtemp(prefix="tidal-load-")
    served, shimmed = with_chat_template(model, tmp) if not args.no_chat else (model, False)
    flags = serve_flags()
    server = Server(served, server_args(args, flags, max(clients)), os.path.join(args.out, "load_server.log"))
    rows, failures, notes = [], [], []
    try:
        server.wait_healthy()
        info = asyncio.run(_model_info(server))
        plan = Plan(load_corpus(), info["max_model_len"], args.prompt_len, args.max_tokens, not args.no_chat)
        notes.append(f"model {model} (max_model_len {info['max_model_len']}); prompts {plan.prompt_len[0]}-"
                     f"{plan.prompt_len[1]} characters, max_tokens {args.max_tokens[0]}-{args.max_tokens[1]}, "
                     f"ignore_eos; {'completions and chat' if plan.chat else 'completions only'}")
        if shimmed:
            notes.append("the model has no chat template: served from a copy with a plain one added "
                         f"({CHAT_TEMPLATE!r})")
        if "--max-concurrent-requests" not in flags:
            notes.append("this server has no --max-concurrent-requests option")
        notes.append(f"server: `{shlex.join(server.command[1:])}`")
        bad = asyncio.run(warm_up(server.url, plan))
        if bad:
            failures.append(f"warm-up: {len(bad)} of 8 requests failed, first: {bad[0]['error']}")
        for n in clients:
            if not server.alive:
                failures.append(f"N={n}: the server is gone")
                break
            log(f"N={n}: {args.requests_per_client or 0} requests per client" if args.requests_per_client
                else f"N={n}: {args.duration:.0f} s")
            try:
                row = asyncio.run(measure(server, n, plan, args, res))
            except Exception as e:
                failures.append(f"N={n}: {type(e).__name__}: {e}")
                log(failures[-1])
                continue
            rows.append(row)
            if row["errors"]:
                failures.append(f"N={n}: {row['errors']} errors: {row['errors_by_type']}")
            if row["kv_blocks_leaked"]:
                failures.append(f"N={n}: {row['kv_blocks_leaked']} KV blocks still used {args.drain_timeout:.0f} s "
                                "after the clients stopped")
            if row["running_peak"] is not None and row["running_peak"] < n:
                notes.append(f"N={n}: at most {row['running_peak']} requests running at once on the server, "
                             f"sampled every 0.5 s (clients had up to {row['client_inflight_peak']} in flight)")
    except Exception as e:
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        code = server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if code not in (0, None):
        notes.append(f"server exit status {code} after SIGINT")

    header, table = build_table(rows)
    command = "python bench/load.py " + shlex.join(sys.argv[1:])
    md = os.path.join(args.out, "load.md")
    write_markdown(md, f"L1 load, {card}, `{command}`", header, table)
    with open(md, "a") as f:
        f.write("\n## Details\n" + "".join(f"- {x}\n" for x in notes))
        for r in rows:
            if r["errors_by_type"]:
                f.write(f"- N={r['clients']}: errors by type {r['errors_by_type']}\n")
        if failures:
            f.write("\n## Failures\n" + "".join(f"- {x}\n" for x in failures))
    with open(os.path.join(args.out, "load.jsonl"), "w") as f:
        for r in res.rows:
            f.write(json.dumps(r) + "\n")
    print()
    for x in notes:
        print(f"note: {x}")
    print_table(header, table)
    for x in failures:
        print(f"FAILED: {x}", file=sys.stderr)
    return 1 if failures else 0


async def _model_info(server: Server) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        return await server.model_info(client)


if __name__ == "__main__":
    sys.exit(main())
