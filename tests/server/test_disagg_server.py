"""Disaggregated serving end to end on loopback: a prefill engine and decode engines (``tidal serve
--role prefill|decode``) behind the router (``--role router``). Completions and chat, streamed and
not, through the official ``openai`` client equal one colocated server's; a decode engine killed
mid-stream fails its client's stream within seconds and leaks no block on the prefill side, and the
same engine restarted takes new requests."""

import os
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
from tidal.serve.router import build_router_app  # noqa: E402
from live_server import LiveServer, add_chat_template, assert_serves_as, free_port  # noqa: E402
from tiny_models import assert_pool_whole, build_model  # noqa: E402

MODEL = "tiny"


def _engine(path, role=None):
    config = EngineConfig(path, block_size=4, num_kv_blocks=256, max_model_len=128, kv_role=role)
    return AsyncLLMEngine(LLMEngine(config))


def _wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("disagg_server"))
    build_model(path, "llama", max_position_embeddings=128)
    return add_chat_template(path)


@pytest.fixture(scope="module")
def cluster(model_path):
    colocated = _engine(model_path)
    prefill = _engine(model_path, "prefill")
    decodes = [_engine(model_path, "decode") for _ in range(2)]
    servers = [LiveServer(build_app(e, MODEL)) for e in [colocated, prefill, *decodes]]
    router = LiveServer(build_router_app([servers[1].url], [s.url for s in servers[2:]], health_interval=0.2))
    _wait_healthy(router.url)
    yield dict(colocated=servers[0].url, router=router.url, engines=[prefill, *decodes])
    for s in [router, *servers]:
        s.stop()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completions_and_chat_equal_colocated(cluster):
    assert_serves_as(cluster["colocated"], cluster["router"], MODEL)
    routed = _client(cluster["router"])
    one = routed.completions.create(model=MODEL, prompt="def add", max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1  # answered by the prefill engine alone
    deadline = time.time() + 10
    while any(e.engine.has_pending_transfers for e in cluster["engines"]) and time.time() < deadline:
        time.sleep(0.05)
    for e in cluster["engines"]:
        assert_pool_whole(e.engine)


def test_a_killed_decode_engine_fails_its_stream_and_a_restart_serves(model_path):
    prefill = LiveServer(build_app(_engine(model_path, "prefill"), MODEL))
    port = free_port()
    command = [sys.executable, "-m", "tidal", "serve", model_path, "--role", "decode", "--port", str(port),
               "--device", "cpu", "--block-size", "4", "--max-model-len", "128", "--kv-transfer-timeout", "5",
               "--served-model-name", MODEL]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    decode = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    decode_url = f"http://127.0.0.1:{port}"
    router = LiveServer(build_router_app([prefill.url], [decode_url], health_interval=0.2))
    try:
        _wait_healthy(decode_url)
        _wait_healthy(router.url)
        client = _client(router.url)
        stream = client.completions.create(model=MODEL, prompt="class Engine:", max_tokens=120, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        received, start = 0, None
        with pytest.raises(openai.APIError):
            for chunk in stream:
                received += 1
                if received == 3:
                    decode.send_signal(signal.SIGKILL)
                    start = time.time()
        assert start is not None and time.time() - start < 10  # ended, not hung
        decode.wait(timeout=10)
        # the prefill engine's hold was read before the kill (or times out): its pool comes back whole
        deadline = time.time() + 10
        while prefill.server.config.app.state.engine.engine.has_pending_transfers and time.time() < deadline:
            time.sleep(0.05)
        assert_pool_whole(prefill.server.config.app.state.engine.engine)
        assert httpx.get(router.url + "/health", timeout=5).status_code == 503  # no decode engine is up
        decode = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_healthy(decode_url)
        _wait_healthy(router.url)
        reply = client.completions.create(model=MODEL, prompt="class Engine:", max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 6
    finally:
        decode.kill()
        decode.wait(timeout=10)
        router.stop()
        prefill.stop()
