"""A public server's limits: body size (413, declared or streamed), prompt tokens, n, logprobs,
top_logprobs, prompt_logprobs, stop strings (count and length), requests in flight (429 with
Retry-After); the API key compared in constant time; a model name is only ever compared, never opened
as a path."""

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from tidal.serve.api_server import ServerLimits, build_app  # noqa: E402
from tidal.serve.async_engine import AsyncLLMEngine  # noqa: E402
from tidal.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from live_server import LiveServer  # noqa: E402
from tiny_models import assert_pool_whole, build_model  # noqa: E402

LIMITS = ServerLimits(max_request_bytes=2000, max_prompt_tokens=20, max_n=2, max_logprobs=3, max_stop_strings=2,
                      max_stop_length=5, max_concurrent_requests=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("limits"))
    build_model(path, max_position_embeddings=128)
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(path, block_size=4, num_kv_blocks=256, max_model_len=128)))
    with LiveServer(build_app(engine, "m", limits=LIMITS)) as live:
        yield live.url, engine


def _post(base, body, path="/v1/completions", **kw):
    return httpx.post(base + path, json=body, timeout=60, **kw)


@pytest.mark.parametrize("body, param, match", [
    ({"prompt": [5] * 21, "max_tokens": 1}, "prompt", "21 tokens; this server takes at most 20"),
    ({"prompt": "x", "n": 3, "temperature": 1.0}, "n", "n=3 exceeds"),
    ({"prompt": "x", "logprobs": 4}, "logprobs", "logprobs=4 exceeds"),
    ({"prompt": "x", "prompt_logprobs": 4}, "prompt_logprobs", "prompt_logprobs=4 exceeds"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "3 strings"),
    ({"prompt": "x", "stop": "abcdef"}, "stop", "6 characters"),
    ({"prompt": "x", "model": "../../etc/passwd"}, "model", "does not exist"),
])
def test_per_request_limits(server, body, param, match):
    base, engine = server
    r = _post(base, body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and match in error["message"], error
    r = _post(base, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 4},
              "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    assert_pool_whole(engine.engine)


def test_body_size(server):
    base, _ = server
    r = _post(base, {"prompt": "x" * 3000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server must count what it reads
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 100
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


def test_requests_in_flight_past_the_limit_get_429(server):
    base, engine = server

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            slow = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}
            streams = [client.stream("POST", base + "/v1/completions", json=slow) for _ in range(2)]
            opened = [await s.__aenter__() for s in streams]
            try:
                r = await client.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["type"] == "rate_limit_error"
            finally:
                for s, resp in zip(streams, opened):
                    await resp.aclose()
                    await s.__aexit__(None, None, None)

    asyncio.run(main())
    deadline = time.time() + 10
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert _post(base, {"prompt": "x", "max_tokens": 1}).status_code == 200  # room again
    assert_pool_whole(engine.engine)


def test_a_burst_is_held_to_the_limit(server):
    """Requests arriving together are counted from the moment they pass the check, not once their
    body is read: a burst of 8 against a limit of 2 admits at most 2 at a time."""
    base, engine = server

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*(client.post(base + "/v1/completions", json=body) for _ in range(8)))

    statuses = [r.status_code for r in asyncio.run(main())]
    assert set(statuses) <= {200, 429} and 1 <= statuses.count(200) <= 2, statuses
    deadline = time.time() + 10
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert_pool_whole(engine.engine)


def test_a_huge_text_prompt_is_refused_before_tokenizing(server):
    base, _ = server
    start = time.time()
    r = _post(base, {"prompt": "x" * 1900})  # under the body limit, past 64 characters per allowed token (20)
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    r = _post(base, {"messages": [{"role": "user", "content": "y" * 1900}]}, "/v1/chat/completions")
    assert r.status_code == 400, r.text
    assert time.time() - start < 10


def test_a_client_leaving_mid_body_is_not_a_server_error(server):
    import socket
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": \"de")
    assert _post(base, {"prompt": "x", "max_tokens": 1}).status_code == 200  # still serving


def test_limits_are_validated():
    for bad in (dict(max_n=0), dict(max_logprobs=-1), dict(max_prompt_tokens=0), dict(max_concurrent_requests="8")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerLimits(**bad)
