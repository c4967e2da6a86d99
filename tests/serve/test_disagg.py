"""Disaggregated prefill and decode in one process: a prefill engine computes each prompt and its
first token, a decode engine reads the KV blocks through a connector (torch.distributed over Gloo,
and NIXL where installed) and generates; the tokens equal one colocated engine's, greedy and
seeded, with 1 and 3 decode engines. Holds end when read, on a stop at the first token, or at the
timeout; failed transfers end their requests with an error. Both pools are whole after every
scenario."""

import dataclasses
import time

import pytest

from tidal.serve.engine import EngineConfig, LLMEngine
from tidal.serve.kv_transfer import TorchConnector, nixl_available
from tidal.serve.sampling_params import SamplingParams
from tiny_models import assert_pool_whole, build_model

from conftest import DEVICES

CONNECTORS = ["torch", pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL not installed"))]
PROMPTS = [[5, 9, 13, 2, 40, 41, 42], list(range(60, 83)), [7] * 3, list(range(100, 117))]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("disagg"))
    build_model(path, "qwen2", max_position_embeddings=128)
    return path


def engine(path, role=None, connector="torch", **kw):
    options = dict(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16, max_num_seqs=8)
    options.update(kw)
    return LLMEngine(EngineConfig(path, kv_role=role, kv_connector=connector, **options))


def run(engine_, prompts, params) -> dict:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine_.add_request(str(i), p, sp)
    done = {}
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.finished:
                done[out.request_id] = out
    return done


def run_disagg(prefill, decodes, prompts, params, max_steps=5000) -> dict:
    """Prefill every prompt with max_tokens=1, then decode request i on decodes[i % len(decodes)]."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        first = dataclasses.replace(sp, max_tokens=1)
        prefill.add_request(str(i), p, first, kv_transfer_params={"do_remote_decode": True})
    firsts = {}
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            if out.finished:
                firsts[out.request_id] = out
    done = {}
    for i, sp in enumerate(params):
        out = firsts[str(i)]
        if out.kv_transfer_params is None:  # finished at its first token
            done[str(i)] = out
            continue
        decodes[i % len(decodes)].add_request(str(i), prompts[i], sp, kv_transfer_params=out.kv_transfer_params)
    for _ in range(max_steps):
        if not any(d.has_unfinished_requests() for d in decodes) and not prefill.has_pending_transfers:
            break
        for d in decodes:
            for out in d.step():
                if out.finished:
                    done[out.request_id] = out
        prefill.poll_transfers()
    return done


def tokens(outputs: dict) -> list[list[int]]:
    return [outputs[k].outputs[0].token_ids for k in sorted(outputs, key=int)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("num_decode", [1, 3])
@pytest.mark.parametrize("within_process", [True, False], ids=["copied", "sent"])
def test_disaggregated_equals_colocated(model_path, connector, num_decode, device, within_process, monkeypatch):
    if connector != "torch" and not within_process:
        pytest.skip("only the torch connector copies blocks between engines of one process")
    monkeypatch.setattr(TorchConnector, "copy_within_process", within_process)
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, seed=3, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, repetition_penalty=1.3)]
    want = run(engine(model_path, device=device), PROMPTS, params)
    prefill = engine(model_path, "prefill", connector, device=device)
    decodes = [engine(model_path, "decode", connector, device=device) for _ in range(num_decode)]
    got = run_disagg(prefill, decodes, PROMPTS, params)
    assert tokens(got) == tokens(want)
    for k in want:
        assert got[k].prompt_token_ids == want[k].prompt_token_ids
        assert got[k].outputs[0].finish_reason == want[k].outputs[0].finish_reason
        if want[k].outputs[0].logprobs is not None:  # the first token's log-probs come from the prefill engine
            for a, b in zip(got[k].outputs[0].logprobs, want[k].outputs[0].logprobs):
                assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert got["1"].num_cached_tokens == len(PROMPTS[1])  # the decode engine computed none of the prompt
    if connector == "torch":  # pools of one process on one device are copied; else the blocks travel the group
        pairs = [p for d in decodes for p in d.transfers.connector._pairs.values()]
        assert pairs and all(p.direct == within_process for p in pairs)
    for e in [prefill, *decodes]:
        assert_pool_whole(e)


def test_a_stop_at_the_first_token_releases_the_hold(model_path):
    first = tokens(run(engine(model_path), PROMPTS[:1], [SamplingParams(temperature=0.0, max_tokens=1)]))[0][0]
    prefill = engine(model_path, "prefill")
    params = [SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first])]
    got = run_disagg(prefill, [engine(model_path, "decode")], PROMPTS[:1], params)
    assert got["0"].outputs[0].token_ids == [first] and got["0"].outputs[0].finish_reason == "stop"
    assert got["0"].kv_transfer_params is None and not prefill.has_pending_transfers
    assert_pool_whole(prefill)


def test_unread_holds_expire(model_path):
    prefill = engine(model_path, "prefill", kv_transfer_timeout=0.3)
    prefill.add_request("a", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1),
                        kv_transfer_params={"do_remote_decode": True})
    outs = []
    while prefill.has_unfinished_requests():
        outs += prefill.step()
    assert outs[-1].kv_transfer_params["block_ids"] and prefill.has_pending_transfers
    stats = prefill.stats()
    assert stats["kv_blocks_free"] < stats["kv_blocks_total"]  # held for the decode engine
    time.sleep(0.4)
    prefill.poll_transfers()
    assert not prefill.has_pending_transfers
    assert_pool_whole(prefill)


def test_failed_transfers_fail_their_requests(model_path):
    prefill = engine(model_path, "prefill")
    decode = engine(model_path, "decode", kv_transfer_timeout=3.0)
    prefill.add_request("a", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1),
                        kv_transfer_params={"do_remote_decode": True})
    while prefill.has_unfinished_requests():
        outs = prefill.step()
    params = outs[-1].kv_transfer_params
    prefill.transfers.release(params["transfer_id"])  # as if it had timed out
    done = run_disagg_decode(decode, "a", PROMPTS[1], params)
    assert done.outputs[0].finish_reason == "error" and "no longer holds" in done.error
    gone = {**params, "engine": {**params["engine"], "engine_id": "prefill-gone", "port": 1}}  # nothing listens
    done = run_disagg_decode(decode, "b", PROMPTS[1], gone)
    assert done.outputs[0].finish_reason == "error" and "cannot reach the prefill engine" in done.error
    assert_pool_whole(decode)
    assert_pool_whole(prefill)


def run_disagg_decode(decode, request_id, prompt, params):
    decode.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=4), kv_transfer_params=params)
    while decode.has_unfinished_requests():
        for out in decode.step():
            if out.finished:
                return out
    raise AssertionError("the request never finished")


def test_abort_while_reading_frees_the_blocks(model_path):
    prefill = engine(model_path, "prefill")
    decode = engine(model_path, "decode")
    prefill.add_request("a", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=1),
                        kv_transfer_params={"do_remote_decode": True})
    while prefill.has_unfinished_requests():
        outs = prefill.step()
    decode.add_request("a", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=5),
                       kv_transfer_params=outs[-1].kv_transfer_params)
    decode.step()  # reserves the blocks and starts the read
    assert decode.abort_request("a")
    for _ in range(2000):
        decode.step()
        prefill.poll_transfers()
        if not decode.has_pending_transfers and not prefill.has_pending_transfers:
            break
    assert_pool_whole(decode)
    assert_pool_whole(prefill)


def test_bad_transfer_params_are_errors(model_path):
    plain, prefill, decode = engine(model_path), engine(model_path, "prefill"), engine(model_path, "decode")
    cases = [
        (plain, {"do_remote_decode": True}, SamplingParams(), "no kv_role"),
        (prefill, {"transfer_id": "x"}, SamplingParams(), "do_remote_decode"),
        (prefill, {"do_remote_decode": True}, SamplingParams(n=2, temperature=1.0), "n=2"),
        (prefill, {"do_remote_decode": True}, SamplingParams(prompt_logprobs=1), "prompt_logprobs=1"),
        (decode, {"do_remote_decode": True}, SamplingParams(max_tokens=4), "lacks"),
        (decode, {"transfer_id": "x", "engine": {"kind": "nixl"}, "block_ids": [1], "num_computed_tokens": 3,
                  "prompt_token_ids": [1, 2, 3], "first_token": 4}, SamplingParams(max_tokens=4), "connector"),
        (decode, {"transfer_id": "x", "engine": {"kind": "torch"}, "block_ids": [1], "num_computed_tokens": 3,
                  "prompt_token_ids": [1, 2, 3], "first_token": 4}, SamplingParams(max_tokens=1), "max_tokens=1"),
        (decode, {"transfer_id": "x", "engine": {"kind": "torch"}, "block_ids": [1, 2, 3], "num_computed_tokens": 3,
                  "prompt_token_ids": [1, 2, 3], "first_token": 4}, SamplingParams(max_tokens=4), "3 blocks"),
    ]
    for e, kv, sp, match in cases:
        with pytest.raises(ValueError, match=match):
            e.add_request("r", [1, 2, 3], sp, kv_transfer_params=kv)
        assert not e.has_unfinished_requests()
    with pytest.raises(ValueError, match="kv_role='middle'"):
        EngineConfig(model_path, kv_role="middle")
