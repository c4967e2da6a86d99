"""The OpenAI-compatible server, live on a free loopback port: the official ``openai`` client for the
happy paths, raw httpx for bad requests, and a client that walks away mid-stream."""

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
import httpx  # noqa: E402
import openai  # noqa: E402

from tidal.serve.api_server import build_app  # noqa: E402
from tidal.serve.async_engine import AsyncLLMEngine  # noqa: E402
from tidal.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from live_server import LiveServer, add_chat_template, free_port  # noqa: E402
from tiny_models import assert_pool_whole, build_model  # noqa: E402

MODEL = "tiny-llama"
KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api"))
    build_model(path, "llama", max_position_embeddings=128)
    add_chat_template(path)
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(path, block_size=4, num_kv_blocks=512, max_model_len=96)))
    app = build_app(engine, MODEL, api_key=KEY)
    with LiveServer(app) as live:
        yield live.url, engine, path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _still_serving(base):
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200
    r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": MODEL, "prompt": "def add", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_usage_and_options(client, server):
    engine = server[1].engine
    out = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.0})
    prompt_len = len(engine.tokenizer.encode("def add(a, b):"))
    assert out.usage.prompt_tokens == prompt_len
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == prompt_len + 5
    assert out.choices[0].finish_reason == "length" and isinstance(out.choices[0].text, str)
    # list of token-id prompts, n samples, seeded sampling with penalties and logprobs
    many = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2, seed=3,
                                     temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == 5 and many.usage.completion_tokens == 12
    lp = many.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(x <= 0 for x in lp.token_logprobs)


def test_chat_and_stream_equal_greedy(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "class Engine:"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=2)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and full.usage.completion_tokens >= 1
    assert len(choice.logprobs.content) == full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finish == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_streamed_completion_with_stop(client):
    full = client.completions.create(model=MODEL, prompt="for i in", max_tokens=8, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt="for i in", max_tokens=8, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    if len(full.choices[0].text) > 2:
        stop = full.choices[0].text[1:3]
        cut = client.completions.create(model=MODEL, prompt="for i in", max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_32_concurrent_requests(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        outs = await asyncio.gather(*(aclient.completions.create(
            model=MODEL, prompt=f"The quick brown {i}", max_tokens=4, temperature=0,
            extra_body={"ignore_eos": True}) for i in range(32)))
        await aclient.close()
        return outs

    import asyncio
    outs = asyncio.run(main())
    assert len(outs) == 32 and all(o.usage.completion_tokens == 4 for o in outs)
    assert len({o.id for o in outs}) == 32


def test_completion_prompt_logprobs(server):
    base, engine, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    url = base + "/v1/completions"
    body = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    r = httpx.post(url, headers=auth, json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = engine.engine.tokenizer.encode("def add(a, b):")
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) == r.json()["usage"]["prompt_tokens"] and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:]):
        assert str(token_id) in entry and len(entry) in (2, 3)
        ranks = sorted(v["rank"] for v in entry.values() if v["rank"] is not None)
        assert ranks == [1, 2] and all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str)
                                       for v in entry.values())
        assert (entry[str(token_id)]["rank"] is None) == (len(entry) == 3)
    plain = httpx.post(url, headers=auth, json={**body, "prompt_logprobs": None}, timeout=30).json()
    assert "prompt_logprobs" not in plain["choices"][0] and plain["choices"][0]["text"] == choice["text"]
    _assert_error(httpx.post(url, headers=auth, json={**body, "stream": True}, timeout=10), 400, "prompt_logprobs")
    _assert_error(httpx.post(url, headers=auth, json={**body, "prompt_logprobs": -1}, timeout=10), 400,
                  "prompt_logprobs")
    _assert_error(httpx.post(url, headers=auth, json={**body, "prompt_logprobs": "2"}, timeout=10), 400,
                  "prompt_logprobs")
    assert_pool_whole(engine)


def _assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err


def test_bad_requests(server):
    base, engine, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    url = base + "/v1/completions"
    _assert_error(httpx.post(url, headers={**auth, "Content-Type": "application/json"}, content=b"{not json",
                             timeout=10), 400)
    _still_serving(base)
    r = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": "x", "max_tokens": -1}, timeout=10)
    _assert_error(r, 400, "max_tokens")
    r = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": "x", "temperature": -1}, timeout=10)
    _assert_error(r, 400, "temperature")
    r = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": "x", "top_p": "high"}, timeout=10)
    _assert_error(r, 400, "top_p")
    _assert_error(httpx.post(url, headers=auth, json={"model": "gpt-9", "prompt": "x"}, timeout=10), 404, "model")
    _assert_error(httpx.post(url, json={"model": MODEL, "prompt": "x"}, timeout=10), 401)
    _assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
    r = httpx.post(url, headers=auth, json={"model": MODEL, "prompt": [5] * 200}, timeout=10)
    _assert_error(r, 400)
    assert "max_model_len" in r.json()["error"]["message"]
    _assert_error(httpx.post(url, headers=auth, json={"model": MODEL, "prompt": []}, timeout=10), 400, "prompt")
    chat = base + "/v1/chat/completions"
    _assert_error(httpx.post(chat, headers=auth, json={"model": MODEL, "messages": "hi"}, timeout=10), 400,
                  "messages")
    tokenizer = engine.engine.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        r = httpx.post(chat, headers=auth, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                       timeout=10)
        _assert_error(r, 400)
        assert "chat template" in r.json()["error"]["message"]
    finally:
        tokenizer.chat_template = template
    _still_serving(base)
    assert_pool_whole(engine)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_aborts(server):
    base, engine, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", base + "/v1/completions", headers=auth,
                         json={"model": MODEL, "prompt": "def add", "max_tokens": 90, "temperature": 0,
                               "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
    deadline = time.time() + 20
    while True:
        text = httpx.get(base + "/metrics", timeout=10).text
        if _metric(text, "tidal_num_requests_running") == 0 and _metric(text, "tidal_kv_blocks_used") == 0:
            break
        assert time.time() < deadline, text
        time.sleep(0.05)
    assert 'finished_reason="abort"' in text
    assert _metric(text, "tidal_kv_blocks_total") == 512
    for name in ("tidal_num_requests_waiting", "tidal_prefix_cache_hit_rate", "tidal_num_preemptions_total",
                 "tidal_prompt_tokens_total", "tidal_generation_tokens_total",
                 "tidal_time_to_first_token_seconds_count", "tidal_time_per_output_token_seconds_count"):
        _metric(text, name)
    assert _metric(text, "tidal_generation_tokens_total") > 0
    assert_pool_whole(engine)
    _still_serving(base)


_RUN_SERVER = """
import sys
from tidal.serve.api_server import run_server
from tidal.serve.engine import EngineConfig
run_server(EngineConfig(sys.argv[1], block_size=4, num_kv_blocks=128), port=int(sys.argv[2]), api_key="k",
           served_model_name="m")
print("RETURNED", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_server_graceful_shutdown(server, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _RUN_SERVER, server[2], str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.1)
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "m"
        events = []
        with httpx.stream("POST", base + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                          json={"prompt": [5, 6], "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        proc.send_signal(sig)  # in flight: aborted (or just finished), then the server exits
        assert events[-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
        assert "RETURNED" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
