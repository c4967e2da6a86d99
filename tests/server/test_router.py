"""The prefill/decode router, live on loopback ports in front of fake engines: small FastAPI apps
that record what they receive and answer per the protocol (prefill: JSON with kv_transfer_params;
decode: JSON or server-sent events), and that can be made slow, reject a request, die mid-stream,
fail without an error body, or report themselves unhealthy."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
import httpx  # noqa: E402
import openai  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import PlainTextResponse, StreamingResponse  # noqa: E402

from tidal.serve.router import build_router_app  # noqa: E402
from live_server import LiveServer, free_port  # noqa: E402

MODEL = "tiny"
PIECES = ["Hel", "lo", " world"]
REJECTION = b'{"error":{"message":"temperature=-1 must be finite and >= 0","type":"invalid_request_error",' \
            b'"param":"temperature","code":null}}'
ORDER: list[tuple[str, str]] = []  # (role, engine name) of every completion request, in arrival order


def _wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class FakeEngine:
    """A tidal engine of one role, as far as the router can tell."""

    def __init__(self, role: str, name: str):
        self.role, self.name = role, name
        self.reset()
        app = FastAPI()
        app.post("/v1/completions")(self._complete)
        app.post("/v1/chat/completions")(self._complete)
        app.get("/health")(lambda: PlainTextResponse("", status_code=self.health))
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": MODEL, "object": "model",
                                                                    "owned_by": self.name}]})
        self.live = LiveServer(app, log_level="critical", timeout_graceful_shutdown=1)
        self.url = self.live.url

    def reset(self) -> None:
        self.received: list[tuple[str, dict, str | None]] = []  # (path, body, authorization header)
        self.health = 200
        self.kv: dict | None = {"engine": self.name, "block_ids": [3, 4]}
        self.delay = 0.0  # seconds before each streamed event
        self.num_pieces = len(PIECES)
        self.reject = False  # answer 400 with REJECTION
        self.plain_500 = False  # raise in the handler: a 500 without an error body
        self.die_after: int | None = None  # events streamed before the connection is cut
        self.disconnected = threading.Event()

    async def _complete(self, request: Request):
        body = await request.json()
        path = request.url.path
        chat = path.endswith("chat/completions")
        self.received.append((path, body, request.headers.get("authorization")))
        ORDER.append((self.role, self.name))
        if self.reject:
            return PlainTextResponse(REJECTION, status_code=400, media_type="application/json")
        if self.plain_500:
            raise RuntimeError("the engine broke")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}"
        if self.role == "prefill":
            finish = "length" if self.kv is not None else "stop"
            out = _completion(rid, chat, PIECES[0], finish, 1)
            return {**out, "kv_transfer_params": self.kv}
        if not body.get("stream"):
            return _completion(rid, chat, "".join(PIECES), "length", len(PIECES))
        return StreamingResponse(self._events(request, rid, chat, body), media_type="text/event-stream")

    async def _events(self, request: Request, rid: str, chat: bool, body: dict):
        obj = "chat.completion.chunk" if chat else "text_completion"
        pieces = (PIECES * self.num_pieces)[:self.num_pieces]
        finished = False
        try:
            if chat:
                yield _sse(rid, obj, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}])
            for i, piece in enumerate(pieces):
                if self.die_after is not None and i == self.die_after:
                    self.health = 503  # a crashed engine: its /health stops answering 200
                    finished = True
                    raise RuntimeError("the decode engine crashed")
                await asyncio.sleep(self.delay)
                if await request.is_disconnected():
                    return
                finish = "length" if i == len(pieces) - 1 else None
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield _sse(rid, obj, [{**choice, "logprobs": None, "finish_reason": finish}])
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}
                yield _sse(rid, obj, [], usage)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnected.set()


def _completion(rid: str, chat: bool, text: str, finish: str, num_tokens: int) -> dict:
    choice = {"index": 0, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": 1700000000,
            "model": MODEL, "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": num_tokens, "total_tokens": 3 + num_tokens}}


def _sse(rid: str, obj: str, choices: list, usage: dict | None = None) -> str:
    data = {"id": rid, "object": obj, "created": 1700000000, "model": MODEL, "choices": choices}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n"


@pytest.fixture(scope="module")
def fakes():
    prefill = [FakeEngine("prefill", f"p{i}") for i in range(2)]
    decode = [FakeEngine("decode", f"d{i}") for i in range(3)]
    yield prefill, decode
    for e in prefill + decode:
        e.live.stop()


@pytest.fixture(scope="module")
def router(fakes):
    prefill, decode = fakes
    app = build_router_app([e.url for e in prefill], [e.url for e in decode], health_interval=0.1,
                           request_timeout=5.0)
    with LiveServer(app, log_level="critical", timeout_graceful_shutdown=1) as live:
        yield live.url


def _health(url: str) -> httpx.Response:
    return httpx.get(url + "/health", timeout=5)


def _healthy(url: str, role: str) -> dict[str, bool]:
    r = _health(url)
    return {e["url"]: e["healthy"] for e in r.json()[role]} if r.status_code == 200 else {}


@pytest.fixture(autouse=True)
def fresh(request, fakes):
    for e in fakes[0] + fakes[1]:
        e.reset()
    ORDER.clear()
    if "router" in request.fixturenames:
        url = request.getfixturevalue("router")
        _wait_until(lambda: _health(url).status_code == 200 and
                    all(all(_healthy(url, role).values()) for role in ("prefill", "decode")), what="all healthy")
    yield


def _post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=10)


def _events(url: str, path: str, body: dict) -> list[str]:
    """The data: payloads of a streamed answer."""
    with httpx.stream("POST", url + path, json=body, timeout=10) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def _only(engines: list[FakeEngine]) -> FakeEngine:
    got = [e for e in engines if e.received]
    assert len(got) == 1 and len(got[0].received) == 1, [(e.name, len(e.received)) for e in engines]
    return got[0]


def _metric(text: str, name: str, engine: FakeEngine) -> float:
    key = f'{name}{{role="{engine.role}",url="{engine.url}"}} '
    values = [float(line[len(key):]) for line in text.splitlines() if line.startswith(key)]
    assert len(values) == 1, (key, text)
    return values[0]


def _assert_error(r: httpx.Response, status: int, type: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if type is not None:
        assert err["type"] == type, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- routing -------------------------------------------------------------------------------------


def test_routes_prefill_then_decode(router, fakes):
    prefill, decode = fakes
    body = {"model": MODEL, "prompt": "def add", "max_tokens": 8, "temperature": 0, "stop": ["\n"]}
    r = _post(router, "/v1/completions", body)
    assert r.status_code == 200, r.text
    p, d = _only(prefill), _only(decode)
    assert p.received[0][:2] == ("/v1/completions", {**body, "stream": False, "max_tokens": 1,
                                                     "kv_transfer_params": {"do_remote_decode": True}})
    assert d.received[0][:2] == ("/v1/completions", {**body, "kv_transfer_params": p.kv})
    assert r.json() == _completion(f"cmpl-{d.name}", False, "".join(PIECES), "length", 3)
    assert ORDER == [("prefill", p.name), ("decode", d.name)]


def test_routes_streamed_chat(router, fakes):
    prefill, decode = fakes
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8,
            "min_tokens": 3, "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": {"forged": True}}
    events = _events(router, "/v1/chat/completions", body)
    p, d = _only(prefill), _only(decode)
    assert p.received[0][:2] == ("/v1/chat/completions", {
        "model": MODEL, "messages": body["messages"], "min_tokens": 1, "stream": False, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert d.received[0][1] == {**body, "kv_transfer_params": p.kv}
    assert events[-1] == "[DONE]" and len(events) == 1 + 3 + 1 + 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and all(c["id"] == f"chatcmpl-{d.name}" for c in chunks)


def test_openai_client(router, fakes):
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=10)
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=5)
    assert out.choices[0].text == "Hello world" and out.usage.completion_tokens == 3
    parts = list(client.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in parts) == "Hello world"
    assert parts[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5)
    assert chat.choices[0].message.content == "Hello world"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert sum(len(e.received) for e in fakes[1]) == 4


# ---- answered from the prefill response ----------------------------------------------------------


def test_finished_at_prefill_json_and_stream(router, fakes):
    prefill, decode = fakes
    for e in prefill:
        e.kv = None
    r = _post(router, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 8})
    p = _only(prefill)
    assert r.status_code == 200 and r.json() == _completion(f"cmpl-{p.name}", False, "Hel", "stop", 1)
    events = _events(router, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 8, "stream": True})
    assert events[-1] == "[DONE]" and len(events) == 2
    chunk = json.loads(events[0])
    assert {k: chunk[k] for k in ("object", "created", "model")} == {"object": "text_completion",
                                                                     "created": 1700000000, "model": MODEL}
    assert chunk["id"].startswith("cmpl-p") and "usage" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": None}]
    events = _events(router, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                      "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and len(events) == 4
    role, content, usage = (json.loads(e) for e in events[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-p")
               for c in (role, content, usage))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and role["usage"] is None
    assert content["choices"][0]["delta"] == {"content": "Hel"} and content["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 4
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hel"
    assert all(not e.received for e in decode)


def test_max_tokens_1_answered_by_prefill(router, fakes):
    prefill, decode = fakes
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1,
            "max_tokens": 50}
    r = _post(router, "/v1/chat/completions", body)
    p = _only(prefill)
    assert r.status_code == 200 and r.json() == _completion(f"chatcmpl-{p.name}", True, "Hel", "length", 1)
    # no kv_transfer_params: the prefill engine keeps no KV for a decode that never comes
    assert p.received[0][1] == {"model": MODEL, "messages": body["messages"], "max_tokens": 1, "stream": False}
    events = _events(router, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": True})
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["Hel"] and events[-1] == "[DONE]"
    assert all(not e.received for e in decode)


# ---- balancing -----------------------------------------------------------------------------------


def test_round_robin_on_ties(router, fakes):
    prefill, decode = fakes
    for _ in range(6):
        assert _post(router, "/v1/completions", {"prompt": "x", "max_tokens": 4}).status_code == 200
    names = [e.name for e in decode]
    order = [name for role, name in ORDER if role == "decode"]
    start = names.index(order[0])
    assert order == [names[(start + i) % 3] for i in range(6)]
    order = [name for role, name in ORDER if role == "prefill"]
    assert order[0::2] == [order[0]] * 3 and order[1::2] == [order[1]] * 3 and order[0] != order[1]


def test_concurrent_slow_requests_spread(router, fakes):
    decode = fakes[1]
    for e in decode:
        e.delay = 0.3

    async def main():
        async with httpx.AsyncClient(timeout=10) as http:
            async def one(i):
                async with http.stream("POST", router + "/v1/completions",
                                       json={"prompt": f"p{i}", "max_tokens": 4, "stream": True}) as r:
                    return [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return await asyncio.gather(*(one(i) for i in range(6)))

    outs = asyncio.run(main())
    assert all(o[-1] == "data: [DONE]" and len(o) == 4 for o in outs)
    assert sorted(len(e.received) for e in decode) == [2, 2, 2]


def test_least_in_flight_avoids_a_busy_engine(router, fakes):
    decode = fakes[1]
    for e in decode:
        e.num_pieces, e.delay = 40, 0.05
    with httpx.stream("POST", router + "/v1/completions", json={"prompt": "long", "stream": True},
                      timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        busy = _only(decode)
        for i in range(4):  # JSON answers: not slowed
            assert _post(router, "/v1/completions", {"prompt": f"q{i}", "max_tokens": 4}).status_code == 200
        assert len(busy.received) == 1
        assert sorted(len(e.received) for e in decode if e is not busy) == [2, 2]
        rest = list(lines)
    assert "data: [DONE]" in rest


# ---- failures ------------------------------------------------------------------------------------


def test_decode_dies_mid_stream(router, fakes):
    decode = fakes[1]
    for e in decode:
        e.die_after = 2
    before = httpx.get(router + "/metrics", timeout=5).text
    t0 = time.time()
    events = _events(router, "/v1/completions", {"prompt": "x", "max_tokens": 8, "stream": True})
    assert time.time() - t0 < 3
    dead = _only(decode)
    after = httpx.get(router + "/metrics", timeout=5).text
    name = "tidal_router_engine_failures_total"  # marked down by the failure itself, not by a later poll
    assert _metric(after, name, dead) == _metric(before, name, dead) + 1
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == PIECES[:2]
    err = json.loads(events[2])["error"]
    assert err["type"] == "service_unavailable" and dead.url in err["message"] and events[3:] == ["[DONE]"]
    assert _healthy(router, "decode")[dead.url] is False
    for e in decode:
        e.die_after = None
    for i in range(4):
        assert _post(router, "/v1/completions", {"prompt": f"q{i}", "max_tokens": 4}).status_code == 200
    assert len(dead.received) == 1
    dead.health = 200  # restarted: it takes requests again
    _wait_until(lambda: _healthy(router, "decode").get(dead.url), what="the engine back up")
    for i in range(3):
        assert _post(router, "/v1/completions", {"prompt": f"r{i}", "max_tokens": 4}).status_code == 200
    assert len(dead.received) == 2


def test_decode_500_without_body(router, fakes):
    decode = fakes[1]
    for e in decode:
        e.plain_500 = True
    before = httpx.get(router + "/metrics", timeout=5).text
    r = _post(router, "/v1/completions", {"prompt": "x", "max_tokens": 4})
    failed = _only(decode)
    err = _assert_error(r, 502, "bad_gateway")
    assert failed.url in err["message"]
    after = httpx.get(router + "/metrics", timeout=5).text
    for e in decode:
        grew = _metric(after, "tidal_router_engine_failures_total", e) - \
            _metric(before, "tidal_router_engine_failures_total", e)
        assert grew == (e is failed)
    assert _metric(after, "tidal_router_engine_healthy", fakes[0][0]) == 1
    assert _metric(after, "tidal_router_engine_requests_in_flight", failed) == 0


def test_no_healthy_decode_is_503(router, fakes):
    prefill, decode = fakes
    for e in decode:
        e.health = 503
    _wait_until(lambda: _health(router).status_code == 503, what="/health to say 503")
    err = _assert_error(_health(router), 503, "service_unavailable")
    assert "decode" in err["message"] and "prefill" not in err["message"]
    for body, path in (({"prompt": "x"}, "/v1/completions"),
                       ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "/v1/chat/completions")):
        err = _assert_error(_post(router, path, body), 503, "service_unavailable")
        assert "decode" in err["message"] and all(e.url in err["message"] for e in decode)
    assert not any(e.received for e in prefill + decode)


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_engine_400_passes_through(router, fakes, role, stream):
    for e in fakes[0] if role == "prefill" else fakes[1]:
        e.reject = True
    r = _post(router, "/v1/completions", {"prompt": "x", "temperature": -1, "stream": stream})
    assert r.status_code == 400 and r.content == REJECTION
    assert _health(router).status_code == 200 and all(_healthy(router, role).values())


def test_router_refuses_n_and_bad_bodies(router, fakes):
    err = _assert_error(_post(router, "/v1/completions", {"prompt": "x", "n": 2}), 400, param="n")
    assert "n=2" in err["message"]
    _assert_error(_post(router, "/v1/chat/completions", {"messages": [], "stream": "yes"}), 400, param="stream")
    _assert_error(_post(router, "/v1/chat/completions", {"messages": [], "max_completion_tokens": 0}), 400,
                  param="max_completion_tokens")
    _assert_error(httpx.post(router + "/v1/completions", content=b"{nope", timeout=5), 400)
    assert not any(e.received for e in fakes[0] + fakes[1])


def test_client_disconnect_closes_upstream(router, fakes):
    decode = fakes[1]
    for e in decode:
        e.num_pieces, e.delay = 200, 0.02
    with httpx.stream("POST", router + "/v1/completions", json={"prompt": "x", "stream": True}, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    engine = _only(decode)
    assert engine.disconnected.wait(3), "the decode engine did not see the router go away"
    _wait_until(lambda: all(e["in_flight"] == 0 for e in _health(router).json()["decode"]), what="in_flight 0")


# ---- configurations ------------------------------------------------------------------------------


def test_auth_and_engine_key(fakes):
    prefill, decode = fakes
    app = build_router_app([prefill[0].url], [decode[0].url], api_key="sk-router", engine_api_key="sk-engine",
                           health_interval=0.1, request_timeout=5.0, served_model_name=MODEL)
    live = LiveServer(app, log_level="critical", timeout_graceful_shutdown=1)
    url = live.url
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
        _assert_error(_post(url, "/v1/completions", body), 401, "authentication_error")
        _assert_error(_post(url, "/v1/completions", body, {"Authorization": "Bearer sk-wrong"}), 401)
        _assert_error(httpx.get(url + "/v1/models", timeout=5), 401)
        assert not prefill[0].received
        auth = {"Authorization": "Bearer sk-router"}
        r = _post(url, "/v1/completions", body, auth)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world"
        assert prefill[0].received[0][2] == decode[0].received[0][2] == "Bearer sk-engine"
        _assert_error(_post(url, "/v1/completions", {**body, "model": "gpt-9"}, auth), 404, param="model")
        assert httpx.get(url + "/v1/models", headers=auth, timeout=5).json()["data"][0]["id"] == MODEL
        assert _health(url).status_code == 200  # no key needed, as on the engines
    finally:
        live.stop()


def test_unreachable_engine_is_skipped(fakes):
    doomed = FakeEngine("decode", "doomed")
    app = build_router_app([fakes[0][0].url], [doomed.url, fakes[1][0].url], health_interval=60.0,
                           request_timeout=5.0)
    live = LiveServer(app, log_level="critical", timeout_graceful_shutdown=1)
    url = live.url
    try:
        assert all(_healthy(url, "decode").values())
        doomed.live.stop()  # gone between two health checks: the first pick still takes it
        for i in range(2):
            r = _post(url, "/v1/completions", {"prompt": f"x{i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
        assert len(fakes[1][0].received) == 2
        state = {e["url"]: e for e in _health(url).json()["decode"]}
        assert state[doomed.url]["healthy"] is False and "Connect" in state[doomed.url]["error"]
    finally:
        live.stop()


def test_build_router_app_checks_arguments():
    with pytest.raises(ValueError, match="prefill_urls"):
        build_router_app([], ["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="decode_urls"):
        build_router_app(["http://127.0.0.1:1"], ["127.0.0.1:2"])
    with pytest.raises(ValueError, match="health_interval=0"):
        build_router_app(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], health_interval=0)


_RUN_ROUTER = """
import sys
from tidal.serve.router import run_router
run_router([sys.argv[1]], [sys.argv[2]], port=int(sys.argv[3]), health_interval=0.2)
print("RETURNED", flush=True)
"""


def test_run_router_stops_on_sigterm(fakes):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _RUN_ROUTER, fakes[0][0].url, fakes[1][0].url, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return _health(base).status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(up, timeout=30, what="run_router to serve")
        r = _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 4})
        assert r.json()["choices"][0]["text"] == "Hello world"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "RETURNED" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
