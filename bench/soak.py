#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Soak test of ``tidal serve``: valid, aborted, disconnected and malformed traffic for a bounded time.

Not run in CI (20 minutes by default). Starts ``python -m tidal serve MODEL`` itself as bench/load.py
does (the demo model unless ``--model``; a plain chat template added to a model that has none).
``--concurrency`` workers (16) loop until ``--minutes`` have passed, each request drawn from
random.Random(seed, worker):

- valid (65%): ``/v1/completions`` or ``/v1/chat/completions`` through the ``openai`` client
  (``max_retries=0``), stream or not, n 1-2, max_tokens 1-64, temperature, top_p, top_k, min_p,
  seed, penalties, stop strings, logprobs, ignore_eos and min_tokens varied. It must answer 200 with
  n choices, each with a finish_reason of stop or length, and usage within n * max_tokens;
- abort (10%): a streaming request whose client reads 1-4 events and closes the connection;
- disconnect (7%): a raw socket that sends a whole request and closes before the answer, sends half a
  body and closes, or closes once the streamed answer has begun;
- malformed (18%): bad JSON, wrong types, out-of-range and oversized values, an unknown model, a
  prompt past max_model_len, image parts on a text model, a wrong method or path (malformed_cases below).
  Each must get a 4xx; "lenient" ones (values a server may accept, e.g. top_k past the vocabulary)
  may also get a 2xx, never a 5xx. A 33 MiB body and an 8 MiB text prompt are sent once, before the
  clock starts; rejections that take more than 2 s are listed.

The server's RSS (VmRSS of it and its children) is sampled every ``--rss-interval`` seconds. The run
FAILS if, after the warm-up (the first 20% of the time), a sample exceeds the warm-up's largest by
more than 5%; if a valid, aborted or disconnected request fails (an abort must get its 200 first); if
a malformed request gets a 5xx or a strict one a 2xx; if the server exits or stops answering; or if,
``--drain-timeout`` seconds after the clients stop, KV blocks are still used (free != total in
``GET /metrics``). A server whose RSS passes ``--rss-abort-mib`` (default: its RSS at the start + half
the available memory) is killed before it takes the machine's memory, and the run fails. The summary
also counts what the server's log holds (5xx answers, to clients already gone too; unhandled errors;
tracebacks) and gives the slowest ``GET /health`` sent with each RSS sample (a stalled event loop).

    python bench/soak.py --out DIR [--minutes 20] [--concurrency 16] [--model PATH] [--device cpu|cuda]
                         [--server-args "--kv-cache-memory-fraction 0.1"]

Writes DIR/soak.md, DIR/soak.jsonl and DIR/soak_server.log; exit status 1 on failure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time

import load
from load import SERVED_NAME, Plan, Server, log, prompt_text

WEIGHTS = {"valid": 0.65, "abort": 0.10, "disconnect": 0.07, "malformed": 0.18}
GROWTH_LIMIT = 1.05
WARMUP_FRACTION = 0.2


def malformed_cases(max_model_len: int) -> list[tuple[str, str, str, bytes | dict | None, bool]]:
    """(name, method, path, body: bytes sent as they are / dict sent as JSON / None, strict)."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    p = {"model": SERVED_NAME, "prompt": "def f(x):"}
    m = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}]}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    cases = [
        ("bad_json", "POST", c, b'{"model": "bench", "prompt": "hi"', True),
        ("not_an_object", "POST", c, b"[1, 2, 3]", True),
        ("empty_body", "POST", c, b"", True),
        ("not_utf8", "POST", c, b'{"prompt": "\xff\xfe"}', True),
        ("prompt_int", "POST", c, {**p, "prompt": 123}, True),
        ("prompt_empty_list", "POST", c, {**p, "prompt": []}, True),
        ("prompt_mixed_list", "POST", c, {**p, "prompt": [[1, "a"]]}, True),
        ("prompt_empty_ids", "POST", c, {**p, "prompt": [[]]}, True),
        ("prompt_id_out_of_vocab", "POST", c, {**p, "prompt": [10 ** 9]}, True),
        ("prompt_id_negative", "POST", c, {**p, "prompt": [3, -1]}, True),
        ("prompt_past_max_model_len", "POST", c, {**p, "prompt": [3] * (max_model_len + 8)}, True),
        ("max_tokens_string", "POST", c, {**p, "max_tokens": "ten"}, True),
        ("max_tokens_float", "POST", c, {**p, "max_tokens": 3.5}, True),
        ("max_tokens_bool", "POST", c, {**p, "max_tokens": True}, True),
        ("max_tokens_negative", "POST", c, {**p, "max_tokens": -5}, True),
        ("max_tokens_2e12", "POST", c, {**p, "max_tokens": 2 * 10 ** 12}, True),
        ("temperature_string", "POST", c, {**p, "temperature": "hot"}, True),
        ("temperature_negative", "POST", c, {**p, "temperature": -1}, True),
        ("temperature_nan", "POST", c, b'{"prompt": "x", "temperature": NaN}', True),
        ("temperature_infinity", "POST", c, b'{"prompt": "x", "temperature": Infinity}', True),
        ("top_p_zero", "POST", c, {**p, "top_p": 0}, True),
        ("top_p_nan", "POST", c, b'{"prompt": "x", "top_p": NaN}', True),
        ("top_k_zero", "POST", c, {**p, "top_k": 0}, True),
        ("top_k_2e40", "POST", c, {**p, "top_k": 2 ** 40}, True),
        ("min_p_two", "POST", c, {**p, "min_p": 2}, True),
        ("n_zero", "POST", c, {**p, "n": 0}, True),
        ("n_2e40", "POST", c, {**p, "n": 2 ** 40}, True),
        ("seed_string", "POST", c, {**p, "seed": "abc"}, True),
        ("seed_2e70", "POST", c, {**p, "seed": 2 ** 70}, True),
        ("logprobs_1e6", "POST", c, {**p, "logprobs": 10 ** 6}, True),
        ("stop_int", "POST", c, {**p, "stop": 5}, True),
        ("stop_empty", "POST", c, {**p, "stop": ""}, True),
        ("stop_token_ids_negative", "POST", c, {**p, "stop_token_ids": [-1]}, True),
        ("stop_token_ids_string", "POST", c, {**p, "stop_token_ids": ["a"]}, True),
        ("presence_penalty_5", "POST", c, {**p, "presence_penalty": 5}, True),
        ("repetition_penalty_zero", "POST", c, {**p, "repetition_penalty": 0}, True),
        ("min_tokens_past_max", "POST", c, {**p, "min_tokens": 10, "max_tokens": 5}, True),
        ("stream_string", "POST", c, {**p, "stream": "yes"}, True),
        ("stream_options_string", "POST", c, {**p, "stream": True, "stream_options": "x"}, True),
        ("unknown_model", "POST", c, {**p, "model": "no-such-model"}, True),
        ("chat_unknown_model", "POST", ch, {**m, "model": "no-such-model"}, True),
        ("chat_messages_string", "POST", ch, {**m, "messages": "hi"}, True),
        ("chat_messages_empty", "POST", ch, {**m, "messages": []}, True),
        ("chat_role_int", "POST", ch, {**m, "messages": [{"role": 1, "content": "x"}]}, True),
        ("chat_content_int", "POST", ch, {**m, "messages": [{"role": "user", "content": 5}]}, True),
        ("chat_image_on_text_model", "POST", ch, {**m, "messages": [{"role": "user", "content": [image]}]}, True),
        ("chat_unknown_part", "POST", ch, {**m, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
         True),
        ("chat_top_logprobs_1000", "POST", ch, {**m, "logprobs": True, "top_logprobs": 1000}, True),
        ("chat_top_logprobs_without_logprobs", "POST", ch, {**m, "top_logprobs": 3}, True),
        ("get_completions", "GET", c, None, True),
        ("unknown_path", "POST", "/v1/nope", {**p}, True),
        # lenient: values a server may take (clamped or harmless), as long as it does not fail on them
        ("max_tokens_2e30", "POST", c, {**p, "max_tokens": 2 ** 30}, False),
        ("temperature_1e308", "POST", c, {**p, "temperature": 1e308, "max_tokens": 4}, False),
        ("top_k_past_vocab", "POST", c, {**p, "top_k": 2 ** 30, "max_tokens": 4}, False),
        ("seed_negative", "POST", c, {**p, "seed": -5, "max_tokens": 4}, False),
        ("stop_1000_strings", "POST", c, {**p, "stop": [f"s{i}" for i in range(1000)], "max_tokens": 4}, False),
        ("stop_10k_chars", "POST", c, {**p, "stop": "y" * 10_000, "max_tokens": 4}, False),
        ("logprobs_20", "POST", c, {**p, "logprobs": 20, "max_tokens": 4}, False),
        ("unknown_fields", "POST", c, {**p, "foo": {"bar": [1]}, "max_tokens": 4}, False),
        ("chat_content_none", "POST", ch, {**m, "messages": [{"role": "user", "content": None}], "max_tokens": 4},
         False),
    ]
    return [(name, method, path, body, strict) for name, method, path, body, strict in cases]


def once_cases() -> list[tuple[str, str, str, bytes, bool]]:
    """Oversized requests sent once per run: a body past the server's 32 MiB default, and an 8 MiB text
    prompt (far past any max_model_len, within the body limit)."""
    return [("body_33MiB", "POST", "/v1/completions", json.dumps({"model": SERVED_NAME, "prompt": "x" * (33 << 20)})
             .encode(), True),
            ("prompt_8MiB_text", "POST", "/v1/completions", json.dumps({"model": SERVED_NAME, "prompt": "x" * (8 << 20)})
             .encode(), True)]


class Tally:
    """Counts by kind and label, and the failures (the first few kept with their details)."""

    def __init__(self):
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.statuses: dict[int, int] = {}  # malformed requests' HTTP status
        self.examples: list[str] = []
        self.notes: set[str] = set()
        self.slow: dict[str, float] = {}  # malformed request -> its slowest 4xx, seconds (those past 2 s)
        self.aborted: str | None = None
        self.health = (0.0, 0.0)  # the slowest GET /health during the run: (seconds, when)

    def ok(self, kind: str) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1

    def fail(self, kind: str, what: str) -> None:
        self.ok(kind)
        self.failed[kind] = self.failed.get(kind, 0) + 1
        if len(self.examples) < 30:
            self.examples.append(f"{kind}: {what}")
            log(f"FAIL {kind}: {what}")


def valid_request(rng: random.Random, plan: Plan) -> tuple[str, dict]:
    chat = plan.chat and rng.random() < 0.5
    n, max_tokens = rng.choice([1, 2]), rng.randint(1, 64)
    body = dict(model=SERVED_NAME, n=n, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.2, 0.7, 1.0, 1.5]),
                top_p=rng.choice([1.0, 0.9, 0.5]), stream=rng.random() < 0.5)
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.3:
        body["presence_penalty"] = round(rng.uniform(-1, 1), 2)
        body["frequency_penalty"] = round(rng.uniform(-1, 1), 2)
    if rng.random() < 0.3:
        body["stop"] = rng.choice(["\n\n", ["def ", "return"], ":"])
    extra = {"top_k": rng.choice([-1, 1, 5, 40]), "min_p": rng.choice([0.0, 0.05]),
             "repetition_penalty": rng.choice([1.0, 1.1]), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.2:
        extra["min_tokens"] = rng.randint(0, max_tokens)
    if rng.random() < 0.3:
        if chat:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
        else:
            body["logprobs"] = rng.randint(0, 3)
    if body["stream"] and rng.random() < 0.7:
        body["stream_options"] = {"include_usage": True}
    text = prompt_text(rng, plan.corpus, *plan.prompt_len)
    if chat:
        body["messages"] = ([{"role": "system", "content": "You write Python."}] if rng.random() < 0.3 else []) \
            + [{"role": "user", "content": text}]
    else:
        body["prompt"] = text if rng.random() < 0.9 else [text, text[::-1]]
    body["extra_body"] = extra
    return ("chat" if chat else "completion"), body


async def run_valid(client, rng: random.Random, plan: Plan, tally: Tally) -> None:
    kind, body = valid_request(rng, plan)
    label = f"valid {kind}{' stream' if body['stream'] else ''}"
    n, max_tokens = body["n"], body["max_tokens"]
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    want = set(range(n * prompts))
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    try:
        if not body["stream"]:
            out = await create(**body)
            got = sorted(c.index for c in out.choices)
            bad = [c.finish_reason for c in out.choices if c.finish_reason not in ("stop", "length")]
            tokens = out.usage.completion_tokens if out.usage else None
        else:
            stream = await create(**body)
            finish, tokens = {}, None
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for c in chunk.choices:
                    if c.finish_reason is not None:
                        finish[c.index] = c.finish_reason
            got = sorted(finish)
            bad = [r for r in finish.values() if r not in ("stop", "length")]
            if "stream_options" not in body:
                tokens = 0  # no usage asked for
    except Exception as e:
        tally.fail(label, f"{type(e).__name__}: {str(e)[:200]}")
        return
    if set(got) != want:
        tally.fail(label, f"choices {got}, want {sorted(want)} (n={n}, prompts={prompts})")
    elif bad:
        tally.fail(label, f"finish_reason {bad}")
    elif tokens is None or not 0 <= tokens <= len(want) * max_tokens:
        tally.fail(label, f"usage.completion_tokens {tokens} (n={n}, max_tokens={max_tokens})")
    else:
        tally.ok(label)


async def run_abort(http, url: str, rng: random.Random, plan: Plan, tally: Tally) -> None:
    chat = plan.chat and rng.random() < 0.5
    text = prompt_text(rng, plan.corpus, *plan.prompt_len)
    body = {"model": SERVED_NAME, "max_tokens": rng.randint(32, plan.max_tokens[1]), "stream": True,
            "ignore_eos": True, "n": rng.choice([1, 2])}
    body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
    label = "abort " + ("chat" if chat else "completion")
    keep = rng.randint(1, 4)
    try:
        async with http.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                               json=body) as resp:
            if resp.status_code != 200:
                tally.fail(label, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= keep:
                        break  # leaving the block closes the connection mid-stream
    except Exception as e:
        tally.fail(label, f"{type(e).__name__}: {str(e)[:200]}")
        return
    tally.ok(label)


async def run_disconnect(port: int, rng: random.Random, plan: Plan, tally: Tally) -> None:
    how = rng.choice(["before_answer", "half_body", "after_headers"])
    body = json.dumps({"model": SERVED_NAME, "prompt": prompt_text(rng, plan.corpus, *plan.prompt_len),
                       "max_tokens": rng.randint(8, 64), "stream": how == "after_headers"}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    label = f"disconnect {how}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        writer.write(head + (body[:len(body) // 2] if how == "half_body" else body))
        await writer.drain()
        if how == "after_headers":
            status = await asyncio.wait_for(reader.readline(), 120)
            if b" 200 " not in status:
                writer.close()
                tally.fail(label, f"status line {status[:80]!r}")
                return
            await asyncio.wait_for(reader.readuntil(b"data: "), 120)
        writer.close()
        await writer.wait_closed()
    except Exception as e:
        tally.fail(label, f"{type(e).__name__}: {str(e)[:200]}")
        return
    tally.ok(label)


async def run_malformed(http, url: str, case, tally: Tally) -> None:
    name, method, path, body, strict = case
    label = "malformed" if strict else "malformed (lenient)"
    headers = {"Content-Type": "application/json"}
    content = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    sent = time.perf_counter()
    try:
        resp = await http.request(method, url + path, content=content, headers=headers)
        status = resp.status_code
        await resp.aread()
    except Exception as e:
        tally.fail(label, f"{name}: {type(e).__name__}: {str(e)[:200]}")
        return
    seconds = time.perf_counter() - sent
    if seconds > 2.0 and status >= 400:  # a rejection should not take long (a lenient 200 may generate)
        tally.slow[name] = max(seconds, tally.slow.get(name, 0.0))
    tally.statuses[status] = tally.statuses.get(status, 0) + 1
    if status >= 500:
        tally.fail(label, f"{name}: HTTP {status}: {resp.text[:200]}")
    elif strict and status < 400:
        tally.fail(label, f"{name}: HTTP {status} (accepted; a 4xx was expected): {resp.text[:120]}")
    else:
        if status >= 400:
            try:
                if "message" not in resp.json()["error"]:
                    raise KeyError
            except (ValueError, KeyError, TypeError):
                tally.notes.add(f"{name}: HTTP {status} without OpenAI's error body: {resp.text[:80]!r}")
        tally.ok(label)


async def soak(server: Server, plan: Plan, max_model_len: int, args, tally: Tally) -> list[tuple[float, float]]:
    """Runs the workers until the deadline; returns the RSS series [(seconds since start, MiB)]."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=2 * args.concurrency + 8, max_keepalive_connections=2 * args.concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=60.0)
    http = httpx.AsyncClient(limits=limits, timeout=timeout)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                http_client=httpx.AsyncClient(limits=limits, timeout=timeout))
    cases = malformed_cases(max_model_len)
    # NOTE(tidal): the oversized ones once, before the clock starts: the memory they take for a moment
    # is not in the RSS series (it would raise the warm-up's largest sample).
    for case in once_cases():
        await run_malformed(http, server.url, case, tally)
    await asyncio.sleep(5)  # what they freed goes back to the system before the first sample
    start = time.perf_counter()
    deadline = start + 60 * args.minutes
    series: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def time_health():
        sent = time.perf_counter()
        try:
            await http.get(server.url + "/health")
        except Exception:
            pass
        seconds = time.perf_counter() - sent
        if seconds > tally.health[0]:
            tally.health = (seconds, sent - start)

    async def sample_rss():
        last, pings = -args.rss_interval, []
        while not stop.is_set():
            rss, now = server.rss_mib(), time.perf_counter() - start
            if rss is not None and now - last >= args.rss_interval:
                series.append((now, rss))
                last = now
                pings.append(asyncio.create_task(time_health()))  # a stalled event loop answers late
            if rss is not None and rss > args.rss_abort_mib and server.alive:
                tally.aborted = f"the server's RSS reached {rss:,.0f} MiB (cap {args.rss_abort_mib:,.0f}): killed it"
                log(tally.aborted)
                series.append((now, rss))
                server.proc.kill()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        await asyncio.gather(*pings)

    async def worker(w: int):
        rng = random.Random(args.seed * 1_000_003 + w)
        while time.perf_counter() < deadline and server.alive:
            kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            if kind == "valid":
                await run_valid(client, rng, plan, tally)
            elif kind == "abort":
                await run_abort(http, server.url, rng, plan, tally)
            elif kind == "disconnect":
                await run_disconnect(server.port, rng, plan, tally)
            else:
                await run_malformed(http, server.url, rng.choice(cases), tally)

    async def progress():
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 30)
            except asyncio.TimeoutError:
                rss = f"{series[-1][1]:,.0f} MiB" if series else "-"
                log(f"{sum(tally.sent.values())} requests, {sum(tally.failed.values())} failed, RSS {rss}")

    sampler, reporter = asyncio.create_task(sample_rss()), asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    finally:
        stop.set()
        await sampler
        await reporter
        await client.close()
        await http.aclose()
    return series


def rss_verdict(series, minutes: float) -> tuple[dict, str | None]:
    warm_end = WARMUP_FRACTION * 60 * minutes
    warm = [v for t, v in series if t <= warm_end]
    later = [(t, v) for t, v in series if t > warm_end]
    stats = dict(rss_mib_min=min((v for _, v in series), default=None),
                 rss_mib_max=max((v for _, v in series), default=None),
                 rss_mib_warmup_max=max(warm, default=None), rss_samples=len(series))
    if not warm or not later:
        return stats, f"too few RSS samples ({len(warm)} in the warm-up, {len(later)} after)"
    peak_t, peak = max(later, key=lambda x: x[1])
    stats["rss_mib_after_warmup_max"] = peak
    stats["rss_growth_pct"] = 100 * (peak / stats["rss_mib_warmup_max"] - 1)
    if peak > GROWTH_LIMIT * stats["rss_mib_warmup_max"]:
        return stats, (f"RSS {peak:,.0f} MiB at {peak_t:.0f} s is {stats['rss_growth_pct']:.1f}% above the warm-up's "
                       f"largest {stats['rss_mib_warmup_max']:,.0f} MiB (limit {100 * (GROWTH_LIMIT - 1):.0f}%)")
    return stats, None


async def finish(server: Server, timeout: float) -> tuple[dict, float, bool]:
    import httpx

    async with httpx.AsyncClient() as client:
        m, seconds = await server.drain(client, timeout)
        healthy = (await client.get(server.url + "/health", timeout=30)).status_code == 200
    return m, seconds, healthy


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def server_log_notes(path: str) -> list[str]:
    """What the server's log says went wrong: 5xx answers (some to clients already gone, which never
    saw them), unhandled errors and tracebacks, with the first of each."""
    found: dict[str, list] = {"5xx answers": [], "unhandled errors": [], "tracebacks": []}
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if '" 5' in line and "HTTP/1.1" in line:
            found["5xx answers"].append(line.strip())
        elif "unhandled error" in line:
            found["unhandled errors"].append(line.strip())
        elif line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j] and not lines[j].startswith(" ")), i)
            found["tracebacks"].append(lines[end].strip())
    return [f"server log: {len(v)} {k}, first: {v[0][:300]}" for k, v in found.items() if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for soak.md, soak.jsonl and soak_server.log")
    ap.add_argument("--minutes", type=float, default=20.0, help="how long the clients run (default 20)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--model", default=None, help="a Hugging Face model directory (default: the demo model)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--server-args", default="", help="more `tidal serve` options, one string")
    ap.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the KV pool to empty")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take (default 120)")
    ap.add_argument("--rss-abort-mib", type=float, default=None,
                    help="kill the server and fail past this RSS (default: its RSS at start + half the available memory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.minutes <= 0 or args.concurrency < 1:
        ap.error("--minutes must be > 0 and --concurrency >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    import serve as base
    from report import print_table, write_markdown

    os.makedirs(args.out, exist_ok=True)
    load.raise_fd_limit()
    card = load.device_name(args.device)
    res = base.Results(card, 1 if args.device.startswith("cuda") else 0)
    model = load.resolve_model(args.model, args.device)
    tmp = tempfile.mkdtemp(prefix="tidal-soak-")
    served, shimmed = load.with_chat_template(model, tmp)
    server = Server(served, ["--device", args.device, *shlex.split(args.server_args)],
                    os.path.join(args.out, "soak_server.log"))
    tally, reasons, notes, series = Tally(), [], [], []
    drained, kv_total, leaked = {}, 0, None
    try:
        server.wait_healthy()
        info = asyncio.run(load._model_info(server))
        max_model_len = info["max_model_len"]
        plan = Plan(load.load_corpus(), max_model_len, (8, 256), (1, 128), True)
        notes.append(f"model {model} (max_model_len {max_model_len}); server `{shlex.join(server.command[1:])}`")
        if shimmed:
            notes.append("the model has no chat template: served from a copy with a plain one added")
        log(f"soak: {args.minutes:g} min, {args.concurrency} clients")
        if args.rss_abort_mib is None:  # a runaway server is stopped before the machine runs out of memory
            args.rss_abort_mib = (server.rss_mib() or 0) + 0.5 * mem_available_mib()
        series = asyncio.run(soak(server, plan, max_model_len, args, tally))
        if tally.aborted:
            reasons.append(tally.aborted)
        elif not server.alive:
            reasons.append(f"the server exited with {server.proc.returncode} during the run: {server.tail(5)}")
        else:
            drained, drain_s, healthy = asyncio.run(finish(server, args.drain_timeout))
            kv_total = int(drained.get("tidal_kv_blocks_total", 0))
            leaked = int(drained.get("tidal_kv_blocks_used", 0))
            rss = server.rss_mib()
            if rss is not None:
                series.append((60 * args.minutes + drain_s, rss))
            notes.append(f"drained in {drain_s:.1f} s: KV blocks free {kv_total - leaked}/{kv_total}, running "
                         f"{drained.get('tidal_num_requests_running', 0):.0f}, waiting "
                         f"{drained.get('tidal_num_requests_waiting', 0):.0f}; /health {'200' if healthy else 'failed'}")
            if leaked:
                reasons.append(f"{leaked} KV blocks still used {args.drain_timeout:.0f} s after the clients stopped")
            if not healthy:
                reasons.append("/health does not answer 200 after the run")
    except Exception as e:
        reasons.append(f"{type(e).__name__}: {e}")
    finally:
        code = server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if code not in (0, None):
        notes.append(f"server exit status {code} after SIGINT")
    notes += server_log_notes(server.log_path)

    rss_stats, rss_reason = rss_verdict(series, args.minutes)
    if rss_reason:
        reasons.append(rss_reason)
    for kind, count in sorted(tally.failed.items()):
        reasons.append(f"{count} {kind} requests failed")
    passed = not reasons

    header = ["kind", "requests", "failed"]
    table = [[kind, str(count), str(tally.failed.get(kind, 0))] for kind, count in sorted(tally.sent.items())]
    table.append(["all", str(sum(tally.sent.values())), str(sum(tally.failed.values()))])
    for kind, count in sorted(tally.sent.items()):
        res.add("soak", "tidal", "requests_" + kind.replace(" (", "_").replace(" ", "_").rstrip(")"), count, "requests", failed=tally.failed.get(kind, 0))
    for metric, value in rss_stats.items():
        if value is not None:
            res.add("soak", "tidal", metric, value, "%" if metric.endswith("pct") else "samples"
                    if metric == "rss_samples" else "MiB")
    res.add("soak", "tidal", "malformed_statuses", len(tally.statuses), "statuses",
            statuses={str(k): v for k, v in sorted(tally.statuses.items())})
    if leaked is not None:
        res.add("soak", "tidal", "kv_blocks_leaked", leaked, "blocks", note=f"of {kv_total}")
    res.add("soak", "tidal", "passed", int(passed), "bool", minutes=args.minutes, concurrency=args.concurrency)

    slow = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(tally.slow.items(), key=lambda kv: -kv[1]))
    series_text = ", ".join(f"{t:.0f}s {v:,.0f}" for t, v in series)
    rss_line = (f"RSS (MiB): min {rss_stats['rss_mib_min']:,.0f}, max {rss_stats['rss_mib_max']:,.0f}, warm-up "
                f"(first {100 * WARMUP_FRACTION:.0f}%) max {rss_stats['rss_mib_warmup_max'] or 0:,.0f}, growth after it "
                f"{rss_stats.get('rss_growth_pct', float('nan')):+.1f}% (limit +{100 * (GROWTH_LIMIT - 1):.0f}%)"
                if series else "RSS: no samples")
    health = f"slowest GET /health during the run: {tally.health[0]:.2f} s (at {tally.health[1]:.0f} s)"
    res.add("soak", "tidal", "health_slowest_s", tally.health[0], "s")
    verdict = "PASSED" if passed else "FAILED: " + "; ".join(reasons)
    command = "python bench/soak.py " + shlex.join(sys.argv[1:])
    md = os.path.join(args.out, "soak.md")
    write_markdown(md, f"soak, {card}, `{command}`", header, table)
    with open(md, "a") as f:
        f.write(f"\n**{verdict}**\n\n## Details\n" + "".join(f"- {x}\n" for x in notes))
        f.write(f"- malformed requests by HTTP status: {dict(sorted(tally.statuses.items()))}\n")
        f.write(f"- {health}\n- {rss_line}\n- RSS series (seconds since start, MiB): {series_text}\n")
        f.write("".join(f"- note: {x}\n" for x in sorted(tally.notes)))
        if tally.slow:
            f.write(f"- malformed requests rejected after more than 2 s: {slow}\n")
        if tally.examples:
            f.write("\n## Failed requests (first 30)\n" + "".join(f"- {x}\n" for x in tally.examples))
    with open(os.path.join(args.out, "soak.jsonl"), "w") as f:
        for r in res.rows:
            f.write(json.dumps(r) + "\n")
    print()
    for x in notes:
        print(f"note: {x}")
    print(f"malformed requests by HTTP status: {dict(sorted(tally.statuses.items()))}")
    for x in sorted(tally.notes):
        print(f"note: {x}")
    if tally.slow:
        print(f"malformed requests rejected after more than 2 s: {slow}")
    print(health)
    print(rss_line)
    print_table(header, table)
    print(verdict, file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
