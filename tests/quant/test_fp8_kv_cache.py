"""kv_cache_dtype="fp8": KV caches of FP8 E4M3 codes (uint8, scale 1) on the CPU and the GPU. The cache writes
(reshape_and_cache, rotary_embedding_and_cache) store torch's own FP8 cast of what a float cache would
hold in fp32; paged attention over FP8 caches equals paged attention over those caches widened back;
an engine holds 4x the blocks of an fp32 cache in the same memory, serves within FP8's error of the
float cache, and keeps its pool whole; on a GPU the cache writes equal the CPU's bit for bit, an engine
serves within FP8's error of a bf16 cache, and a model no GPU kernel can read FP8 for is refused by name.
The GPU attention kernels over FP8 caches: tests/ops/test_paged_attention_cuda.py."""

import pytest
import torch

import tidal
from conftest import gpu_only
from tiny_models import assert_pool_whole, build_model

FP8_MAX = 448.0


def fp8(x: torch.Tensor) -> torch.Tensor:
    """torch's FP8 E4M3 cast, saturated as the cache saturates, as uint8 codes."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def widen(codes: torch.Tensor, dtype) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn).float().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_fp8_codes(dtype):
    g = torch.Generator().manual_seed(0)
    key = (torch.randn(6, 2, 32, generator=g) * 100).to(dtype)[:, :, :]  # some past +-448: saturated
    value = torch.randn(6, 2, 32, generator=g).to(dtype)
    k_cache = torch.zeros(4, 4, 2, 32, dtype=torch.uint8)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, 6, -1, 9, 15])
    tidal.ops.reshape_and_cache_(key, value, k_cache, v_cache, slots)
    written = slots >= 0
    assert torch.equal(k_cache.view(16, 2, 32)[slots[written]], fp8(key[written]))
    assert torch.equal(v_cache.view(16, 2, 32)[slots[written]], fp8(value[written]))
    assert k_cache.view(16, 2, 32)[[1, 2, 3]].eq(0).all()  # untouched slots


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_and_cache_writes_the_rotated_keys_as_fp8(qk_norm):
    g = torch.Generator().manual_seed(1)
    num_tokens, heads, kv_heads, hd = 5, 4, 2, 64
    q = torch.randn(num_tokens, heads, hd, generator=g)
    k = torch.randn(num_tokens, kv_heads, hd, generator=g) * 3
    v = torch.randn(num_tokens, kv_heads, hd, generator=g)
    positions = torch.tensor([0, 3, 7, 2, 11])
    from tidal.models import rope

    table = rope.build_cos_sin_cache(hd, 32, 10000.0, None)
    norms = (torch.rand(hd, generator=g) + 0.5, torch.rand(hd, generator=g) + 0.5) if qk_norm else (None, None)
    slots = torch.tensor([1, 2, 3, 8, 9])
    float_k, float_v = torch.zeros(4, 4, kv_heads, hd), torch.zeros(4, 4, kv_heads, hd)
    fp8_k = torch.zeros(4, 4, kv_heads, hd, dtype=torch.uint8)
    fp8_v = torch.zeros_like(fp8_k)
    q_float, q_fp8 = q.clone(), q.clone()
    tidal.ops.rotary_embedding_and_cache_(positions, q_float, k, v, float_k, float_v, slots, table, True, *norms, 1e-6)
    tidal.ops.rotary_embedding_and_cache_(positions, q_fp8, k, v, fp8_k, fp8_v, slots, table, True, *norms, 1e-6)
    assert torch.equal(q_fp8, q_float)  # the query is rotated the same either way
    assert torch.equal(fp8_k, fp8(float_k)) and torch.equal(fp8_v, fp8(float_v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_paged_attention_reads_fp8_caches_exactly(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    num_blocks, block, kv_heads, heads = 12, 4, 2, 6
    k_codes = fp8(torch.randn(num_blocks, block, kv_heads, head_dim, generator=g) * 2)
    v_codes = fp8(torch.randn(num_blocks, block, kv_heads, head_dim, generator=g))
    query = torch.randn(7, heads, head_dim, generator=g).to(dtype)
    block_tables = torch.tensor([[3, 0, 7, 1], [5, 9, 2, 11]], dtype=torch.int32)
    seq_lens = torch.tensor([14, 9], dtype=torch.int32)  # 3 decode rows of one sequence, 4 prefill rows of another
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    args = (block_tables, seq_lens, cu, head_dim ** -0.5, -1, 4, 14)
    got = tidal.ops.paged_attention(query, k_codes, v_codes, *args)
    want = tidal.ops.paged_attention(query, widen(k_codes, dtype), widen(v_codes, dtype), *args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8kv"))
    build_model(path, "qwen3")
    return path


def test_engine_serves_from_an_fp8_cache(model_dir):
    params = tidal.SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0)
    prompts = [[5, 9, 33, 41, 7, 12, 90, 3, 18], [200, 4, 61]]
    # a small share of host memory: the same budget holds ~4x the blocks of an fp32 cache
    base = tidal.LLM(model_dir, device="cpu", kv_cache_dtype="auto", block_size=4, kv_cache_memory_fraction=0.002)
    quantized = tidal.LLM(model_dir, device="cpu", kv_cache_dtype="fp8", block_size=4, kv_cache_memory_fraction=0.002)
    block_bytes = [llm.engine.runner.kv_pool.nbytes // llm.engine.runner.num_kv_blocks for llm in (base, quantized)]
    assert block_bytes[0] == 4 * block_bytes[1]
    assert quantized.engine.runner.num_kv_blocks > 3.5 * base.engine.runner.num_kv_blocks
    assert quantized.engine.runner.kv_caches[0][0].dtype == torch.uint8
    want, got = base.generate(prompts, params, use_tqdm=False), quantized.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got):
        diffs = [abs(next(iter(x.values())) - next(iter(y.values())))
                 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
        assert max(diffs) < 0.25 and sum(diffs) / len(diffs) < 0.05, diffs  # FP8's 3 mantissa bits
        assert len(b.outputs[0].token_ids) == 8
    assert_pool_whole(quantized)


def test_bad_kv_cache_dtype_is_named(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        tidal.LLM(model_dir, kv_cache_dtype="int4")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_cache_writes_equal_the_cpus(dtype):
    """reshape_and_cache and rotary_embedding_and_cache (Qwen3's q/k norm in) write the same codes on
    the GPU as on the CPU, bit for bit, strided key/value views of one qkv tensor included."""
    g = torch.Generator().manual_seed(3)
    num_tokens, heads, kv_heads, hd = 9, 8, 2, 128
    qkv = (torch.randn(num_tokens, (heads + 2 * kv_heads) * hd, generator=g) * 40).to(dtype)  # some saturate
    slots = torch.tensor([0, 5, 6, -1, 9, 15, 2, 3, 31])
    positions = torch.tensor([0, 3, 7, 2, 11, 1, 4, 5, 30])
    from tidal.models import rope

    table = rope.build_cos_sin_cache(hd, 64, 10000.0, None)
    norms = (torch.rand(hd, generator=g) + 0.5).to(dtype), (torch.rand(hd, generator=g) + 0.5).to(dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        x = qkv.to(device)
        q, k, v = x.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=1)
        q, k, v = q.view(num_tokens, heads, hd), k.view(num_tokens, kv_heads, hd), v.view(num_tokens, kv_heads, hd)
        caches = [torch.zeros(8, 4, kv_heads, hd, dtype=torch.uint8, device=device) for _ in range(4)]
        tidal.ops.reshape_and_cache_(k, v, caches[0], caches[1], slots.to(device))
        q = q.clone()
        tidal.ops.rotary_embedding_and_cache_(positions.to(device), q, k, v, caches[2], caches[3], slots.to(device),
                                              table.to(device), True, norms[0].to(device), norms[1].to(device), 1e-6)
        outs[device] = [c.cpu() for c in caches] + [q.cpu()]
    assert outs["cpu"][0].ne(0).any()
    for want, got in zip(outs["cpu"], outs["cuda"]):
        if want.dtype == torch.uint8:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8kv_bf16"))
    build_model(path, "llama", hidden_size=256, intermediate_size=256)  # head_dim 64
    return path


@gpu_only
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_engine_serves_from_an_fp8_cache(bf16_model_dir, enforce_eager):
    """On the GPU: half the bytes per block of a bf16 cache, prompt logprobs within FP8's error of the
    bf16 cache's, chunked prefill over a cached prefix and CUDA-graph decode (or eager), pool whole."""
    params = tidal.SamplingParams(temperature=0.0, max_tokens=24, prompt_logprobs=0)
    prompts = [list(range(3, 3 + 70)), [200, 4, 61], list(range(3, 3 + 70)) + [9, 8, 7]]  # the third shares a prefix
    kwargs = dict(device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=64, max_num_batched_tokens=32, max_model_len=256,
                  enforce_eager=enforce_eager)
    base = tidal.LLM(bf16_model_dir, kv_cache_dtype="auto", **kwargs)
    quantized = tidal.LLM(bf16_model_dir, kv_cache_dtype="fp8", **kwargs)
    assert quantized.engine.runner.kv_caches[0][0].dtype == torch.uint8
    assert base.engine.runner.kv_pool.nbytes == 2 * quantized.engine.runner.kv_pool.nbytes
    want, got = base.generate(prompts, params, use_tqdm=False), quantized.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got):
        diffs = [abs(next(iter(x.values())) - next(iter(y.values())))
                 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
        # FP8's 3 mantissa bits on a bf16 model whose logits spread wide (measured on H100: mean ~0.04
        # nats); a cache read wrong is off by whole nats
        assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.1, (max(diffs), sum(diffs) / len(diffs))
        assert len(b.outputs[0].token_ids) == 24
    assert_pool_whole(quantized)
    del base, quantized
    torch.cuda.empty_cache()


@gpu_only
def test_gpu_refuses_an_fp8_cache_no_kernel_reads(model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' on the GPU needs a float16 or bfloat16 model .* "
                                         "dtype=torch.float32"):
        tidal.LLM(model_dir, device="cuda", dtype="float32", kv_cache_dtype="fp8")


def test_command_line_flag(model_dir, capsys):
    from tidal.cli import main

    assert main(["generate", model_dir, "--prompt", "def", "--max-tokens", "4", "--temperature", "0",
                 "--kv-cache-dtype", "fp8", "--device", "cpu"]) == 0
    capsys.readouterr()
