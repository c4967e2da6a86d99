"""LLM.sleep() / wake_up(): the KV cache's memory is given back between generate calls and taken
again; generation after wake-up equals generation before (greedy, and seeded sampling); the pool is
whole; asleep, requests are refused; a sleep with a request unfinished is refused and changes nothing.
On the GPU the pool comes back at the same address (the captured CUDA graphs replay correctly) and the
device's free memory grows by the pool's size while asleep."""

import pytest
import torch

import tidal
from conftest import DEVICES, gpu_only
from tiny_models import assert_pool_whole, build_model, hf_greedy

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42], list(range(3, 40))]


def _generate(llm, **kw):
    params = tidal.SamplingParams(max_tokens=10, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("device", DEVICES)
def test_sleep_and_wake_up_keep_generation_exact(tmp_path, device):
    hf = build_model(str(tmp_path))
    llm = tidal.LLM(str(tmp_path), device=device, num_kv_blocks=64, block_size=4, max_model_len=128)
    greedy = _generate(llm, temperature=0.0)
    assert greedy == [hf_greedy(hf, p, 10, eos=False) for p in PROMPTS]
    sampled = _generate(llm, temperature=1.0, seed=7)
    pool = llm.engine.runner.kv_pool
    key_cache = llm.engine.kv_caches[0][0]
    for _ in range(2):  # twice: a second cycle works as the first
        assert not llm.is_sleeping
        llm.sleep()
        llm.sleep()  # a no-op when asleep
        assert llm.is_sleeping and pool.is_released
        if device == "cpu":
            assert key_cache.untyped_storage().nbytes() == 0
        with pytest.raises(RuntimeError, match="asleep.*wake_up"):
            llm.generate(PROMPTS, tidal.SamplingParams(max_tokens=2), use_tqdm=False)
        assert_pool_whole(llm)
        llm.wake_up()
        assert not llm.is_sleeping
        assert llm.engine.kv_caches[0][0] is key_cache and not key_cache.any()  # zeroed, the same tensor
        assert _generate(llm, temperature=0.0) == greedy
        assert _generate(llm, temperature=1.0, seed=7) == sampled
        assert llm.stats()["prefix_cache_hit_tokens"] >= 0
        assert_pool_whole(llm)


def test_sleep_with_a_request_unfinished_is_refused(tmp_path):
    build_model(str(tmp_path))
    llm = tidal.LLM(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=128)
    llm.engine.add_request("r", [1, 2, 3], tidal.SamplingParams(max_tokens=4))
    llm.engine.step()
    with pytest.raises(RuntimeError, match=r"sleep\(\) with 1 requests unfinished"):
        llm.sleep()
    assert not llm.is_sleeping
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_pool_whole(llm)


@gpu_only
def test_gpu_sleep_releases_memory_at_the_same_address(tmp_path):
    build_model(str(tmp_path), num_layers=4)
    llm = tidal.LLM(str(tmp_path), device="cuda", num_kv_blocks=16384, block_size=16, max_model_len=128)
    runner = llm.engine.runner
    assert runner.use_graphs and runner._graphs  # decode steps replay graphs that captured the pool
    greedy = _generate(llm, temperature=0.0)
    pool = runner.kv_pool
    address = pool._memory.address
    assert llm.engine.kv_caches[0][0].data_ptr() == address
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    llm.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake >= 0.9 * pool.nbytes, (free_asleep, free_awake, pool.nbytes)
    # training in the meantime: torch's allocator takes and caches the memory the pool gave back
    scratch = torch.empty(pool.nbytes // 2, dtype=torch.uint8, device="cuda").fill_(255)
    del scratch
    llm.wake_up()
    assert pool._memory.address == address and llm.engine.kv_caches[0][0].data_ptr() == address
    assert torch.cuda.mem_get_info()[0] <= free_asleep - 0.9 * pool.nbytes
    assert _generate(llm, temperature=0.0) == greedy
    assert_pool_whole(llm)


@gpu_only
def test_gpu_pool_larger_than_the_free_memory_is_a_memory_error():
    from tidal import _core

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(MemoryError, match="out of device memory"):
        _core.kv.SleepableMemory(torch.cuda.current_device(), 2 * free)
