"""Disaggregated serving in one process (``tidal serve MODEL --role disaggregated``): the router in front
of a prefill engine and decode engines of the same process, one copy of the weights, KV blocks copied
between the engines' pools. Through the official ``openai`` client its completions and chat, streamed
and not, equal a colocated server's; the engines share the model's parameters and copy blocks rather
than send them; the engines accept only the router; every pool ends whole; bad settings name themselves."""

import os
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
import torch  # noqa: E402

from tidal.serve.disagg_local import DisaggregatedServer, SmGroups, build_engines  # noqa: E402
from tidal.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from conftest import GPU_MARKS, gpu_only  # noqa: E402
from live_server import LiveServer, add_chat_template, assert_serves_as, free_port  # noqa: E402
from tiny_models import assert_pool_whole, build_model  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("disagg_local"))
    build_model(path, "llama", max_position_embeddings=128)
    return add_chat_template(path)


def _config(path, **kw):
    return EngineConfig(path, **{**dict(device="cpu", block_size=4, num_kv_blocks=256, max_model_len=128), **kw})


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _settle(engines, timeout=10.0):
    deadline = time.time() + timeout
    while any(e.has_pending_transfers for e in engines) and time.time() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("device, prefill_sms", [
    pytest.param("cpu", None, id="cpu"),
    pytest.param("cuda", None, marks=GPU_MARKS, id="cuda"),
    pytest.param("cuda", 16, marks=GPU_MARKS, id="cuda-sm-groups")])
@pytest.mark.parametrize("num_decode", [1, 2])
def test_one_process_equals_colocated(model_path, num_decode, device, prefill_sms):
    """On a GPU each engine steps on a CUDA stream of its own (decode graphs replayed there); with
    prefill_sms the streams belong to two SM groups."""
    config = _config(model_path, device=device)
    with LiveServer(build_app(AsyncLLMEngine(LLMEngine(config)), MODEL)) as colocated, \
            DisaggregatedServer(config, num_decode=num_decode, port=free_port(), served_model_name=MODEL,
                                log_level="warning", prefill_sms=prefill_sms) as server:
        prefill, *decodes = server.engines
        if prefill_sms is not None:
            groups = server.sm_groups
            assert server.streams == [groups.prefill_stream, *groups.decode_streams(num_decode)]
            assert all(e.runner._graphs for e in decodes)  # graphs captured on the decode group's streams
        assert [e.config.kv_role for e in server.engines] == ["prefill"] + ["decode"] * num_decode
        assert all(e.model is prefill.model for e in decodes)  # one copy of the weights
        assert prefill.config.enforce_eager
        assert_serves_as(colocated.url, server.url, MODEL)
        pairs = [p for d in decodes for p in d.transfers.connector._pairs.values()]
        assert pairs and all(p.direct for p in pairs)  # blocks copied between the pools, not sent
        # the engines listen on loopback for the router alone
        engine_url = server._engine_servers[0].config
        r = httpx.post(f"http://127.0.0.1:{engine_url.port}/v1/completions",
                       json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 401
        _settle(server.engines)
        for e in server.engines:
            assert_pool_whole(e)


def test_the_kv_memory_is_split(model_path):
    prefill, decodes, streams, sm_groups = build_engines(
        _config(model_path, num_kv_blocks=None, kv_cache_memory_fraction=0.5), num_decode=3, prefill_share=0.4)
    assert streams == [None] * 4 and sm_groups is None  # on the CPU
    try:
        assert prefill.config.kv_cache_memory_fraction == pytest.approx(0.5 * 0.4)
        assert [d.config.kv_cache_memory_fraction for d in decodes] == pytest.approx([0.5 * 0.6 / 3] * 3)
    finally:
        for e in [prefill, *decodes]:
            e.close()


def test_bad_settings_name_themselves(model_path):
    cases = [(dict(num_decode=0), "num_decode=0 must be an integer >= 1"),
             (dict(prefill_share=1.0), r"prefill_share=1.0 must be in \(0, 1\)"),
             (dict(prefill_sms=0), r"prefill_sms=0 must be a positive integer"),
             (dict(prefill_sms=8), r"prefill_sms=8 splits a GPU's SMs; device='cpu' is cpu")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            build_engines(_config(model_path), **kw)
    with pytest.raises(ValueError, match="kv_role='decode': the engines of one process take their roles"):
        build_engines(_config(model_path, kv_role="decode"))


def sm_ids(stream) -> set[int]:
    """The SMs four resident thread blocks per SM of the card occupy when launched on ``stream``."""
    from tidal import _core

    blocks = 4 * torch.cuda.get_device_properties(stream.device).multi_processor_count
    out = torch.full((blocks,), -1, dtype=torch.int32, device=stream.device)
    stream.wait_stream(torch.cuda.current_stream(stream.device))  # `out` is written before the launch
    _core.device.SmPartition.record_sm_ids(stream.cuda_stream, blocks, out.data_ptr())
    stream.synchronize()
    return set(out.tolist())


@gpu_only
def test_sm_groups_keep_their_sms():
    """Each group's streams run kernels on that group's SMs only, launched directly and replayed from
    a CUDA graph captured on the stream; a plain stream spreads over more SMs than either group has
    (so the check can fail)."""
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).multi_processor_count
    groups = SmGroups.get(device, 16)
    prefill_count, decode_count = groups.sm_counts
    assert prefill_count >= 16 and prefill_count + decode_count == total
    assert SmGroups.get(device, 16) is groups
    prefill_ids = sm_ids(groups.prefill_stream)
    decode_stream = groups.decode_streams(2)[1]
    decode_ids = sm_ids(decode_stream)
    assert len(prefill_ids) <= prefill_count and len(decode_ids) <= decode_count
    assert not prefill_ids & decode_ids and -1 not in prefill_ids | decode_ids
    assert len(sm_ids(torch.cuda.Stream(device))) > max(prefill_count, decode_count)
    # torch's events (made in the device's primary context) record on a group's stream and order
    # other streams after it, as the sampler's copy of the tokens to the host needs
    event = torch.cuda.Event()
    with torch.cuda.stream(decode_stream):
        torch.cuda._sleep(1_000_000)
        event.record()
    torch.cuda.current_stream(device).wait_event(event)
    event.synchronize()
    assert event.query()

    from tidal import _core

    blocks = 4 * total
    out = torch.full((blocks,), -1, dtype=torch.int32, device=device)
    graph = torch.cuda.CUDAGraph()
    decode_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.graph(graph, stream=decode_stream):
        _core.device.SmPartition.record_sm_ids(decode_stream.cuda_stream, blocks, out.data_ptr())
    with torch.cuda.stream(decode_stream):
        out.fill_(-1)
        graph.replay()
    decode_stream.synchronize()
    replayed = set(out.tolist())
    assert -1 not in replayed and not replayed & prefill_ids and len(replayed) <= decode_count


@gpu_only
def test_kernels_on_a_group_stream_size_their_grids_by_its_sms():
    """Launchers size their grids by the SMs of the stream's group (one block per SM of the device
    would run in two waves there): the persistent skinny kernel gives the same bits on a group's
    stream as on a plain one, eager and captured in a graph."""
    from tidal import ops

    device = torch.device("cuda", torch.cuda.current_device())
    groups = SmGroups.get(device, 16)
    stream = groups.decode_streams(1)[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 1024, device=device, dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(8192, 1024, device=device, dtype=torch.bfloat16, generator=gen) / 32
    want = ops.skinny_linear(x, weight)
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):
        got = ops.skinny_linear(x, weight)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            replayed = ops.skinny_linear(x, weight)
        graph.replay()
    stream.synchronize()
    assert torch.equal(got, want) and torch.equal(replayed, want)


@gpu_only
def test_sm_groups_bad_sizes_name_themselves():
    from tidal import _core

    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).multi_processor_count
    with pytest.raises(ValueError, match=f"first_sms={total} must be in \\[1, {total - 1}\\]"):
        _core.device.SmPartition(device, total)
    with pytest.raises(ValueError, match="first_sms=0 must be in"):
        _core.device.SmPartition(device, 0)
    layout = _core.device.sm_layout(device)
    assert layout["sm_count"] == total and layout["min_group"] >= 1 and layout["alignment"] >= 1
    align = layout["alignment"]
    if max(layout["min_group"], -(-(total - 1) // align) * align) >= total:  # H100 / H200: 131 SMs round to 136
        with pytest.raises(ValueError, match=f"first_sms={total - 1} rounds up to"):
            _core.device.SmPartition(device, total - 1)
    partition = _core.device.SmPartition(device, 8)
    with pytest.raises(IndexError, match=r"group=2 is not in \[0, 2\)"):
        partition.create_stream(2)


def test_the_command_line_serves(model_path):
    port = free_port()
    command = [sys.executable, "-m", "tidal", "serve", model_path, "--role", "disaggregated", "--num-decode", "2",
               "--port", str(port), "--device", "cpu", "--block-size", "4", "--max-model-len", "128",
               "--served-model-name", MODEL]
    server = subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server never became healthy"
            time.sleep(0.2)
        reply = _client(url).completions.create(model=MODEL, prompt="class Engine:", max_tokens=6, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 6
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
