"""Tensor-parallel serving over Gloo on the CPU (tidal.LLM(tensor_parallel_size=N)): N = 2 and 4 give
the greedy tokens of N = 1 and its prompt and sampled log-probs within fp32's reordering of the
all-reduced sums, for each model family (GQA with a KV head per rank and KV heads replicated across
ranks, Qwen3's q/k norm, Mistral's sliding window, Qwen2's qkv bias, tied embeddings, a vocabulary the
ranks do not divide, Mixtral's and Qwen2-MoE's experts with a shared expert), an FP8 KV cache on
every rank included, and int8/int4 quantized layers (each rank's codes, scales and zero points); FP8
layers with per-token activation scales sum exactly and follow N = 1 end to end within FP8's rounding; the
pool stays whole; a worker that dies fails the requests of the step with an error instead of hanging;
shapes the split cannot take are refused by name."""

import os
import subprocess
import sys
import time

import pytest
import torch

import tidal
from tidal.models.tensor_parallel import RowParallelLinear, TensorParallelGroup, kv_heads_of_rank
from tidal.quant.config import QuantConfig
from tidal.quant.linear import QuantLinear, quantize_weight
from conftest import DEVICES, gpu_only
from tiny_models import assert_pool_whole, build_model

# hidden 64, 4 query heads over 2 KV heads, intermediate 96 (divisible by 2 and 4)
CASES = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3"),
    "mistral": dict(family="mistral"),
    "qwen2": dict(family="qwen2"),
    "llama_tied_odd_vocab": dict(family="llama", tie=True, vocab_size=301),
}
PROMPTS = [[5, 9, 33, 41, 7, 12, 90, 3, 18, 27, 44, 61, 2 + 70, 88, 19], [200, 4, 61], list(range(10, 40))]


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"tp_{request.param}"))
    kwargs = dict(CASES[request.param])
    build_model(path, kwargs.pop("family"), **kwargs)
    return path


def run(path, tp: int, kv_cache_dtype: str = "auto", quantization: str | None = None, device: str = "cpu"):
    params = tidal.SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=0, logprobs=3, ignore_eos=True)
    extra = dict(max_num_seqs=8) if device == "cuda" else {}  # on a GPU: decode graphs of 1, 2, 4 and 8 rows
    llm = tidal.LLM(path, device=device, dtype="float32", tensor_parallel_size=tp, num_kv_blocks=40, block_size=4,
                    max_model_len=128, max_num_batched_tokens=24,  # chunked prefill: the 30-token prompt: two steps
                    kv_cache_dtype=kv_cache_dtype, quantization=quantization, **extra)
    try:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert_pool_whole(llm)
        return outputs
    finally:
        llm.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_rank(model_dir, tp):
    assert_same(run(model_dir, 1), run(model_dir, tp))


def test_ranks_that_read_the_checkpoint_in_turns(tmp_path, monkeypatch):
    """Where the ranks' host copies would not fit together they read one after another (forced here):
    the same outputs."""
    path = str(tmp_path / "m")
    build_model(path, "llama")
    want = run(path, 1)
    monkeypatch.setenv("TIDAL_TP_LOAD_IN_TURNS", "1")
    assert_same(want, run(path, 2))


def test_tensor_parallel_with_an_fp8_kv_cache(tmp_path):
    """Each rank's keys and values are those of one rank's (whole dot products per head), so their FP8
    codes are too: the workers' FP8 caches give the tokens of an FP8 cache on one rank."""
    path = str(tmp_path / "m")
    build_model(path, "qwen3")
    assert_same(run(path, 1, "fp8"), run(path, 2, "fp8"))


MOE = {
    "mixtral": dict(family="mixtral"),
    "qwen2_moe": dict(family="qwen2_moe"),  # a shared expert and its gate, experts' intermediate 48
}


@pytest.mark.parametrize("family", list(MOE))
@pytest.mark.parametrize("tp", [2, 4])
def test_mixture_of_experts_splits_each_expert(tmp_path, family, tp):
    path = str(tmp_path / "m")
    build_model(path, family)
    assert_same(run(path, 1), run(path, tp))


# hidden 256 over 4 heads of 64, intermediate 512: at 2 ranks o_proj's and down_proj's inputs per rank
# (128 and 256) are whole groups of int4's 128
QUANT_SHAPE = dict(hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_layers_split_by_rows_and_groups(tmp_path, quantization):
    path = str(tmp_path / "m")
    build_model(path, "qwen2", **QUANT_SHAPE)  # a qkv bias: sliced with the rows
    assert_same(run(path, 1, quantization=quantization), run(path, 2, quantization=quantization))


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_row_parallel_layer_sums_to_the_whole(tp):
    """At prefill's rows FP8 quantizes activations per token: a row-parallel layer takes each token's
    scale from the amax over every rank's slice, so the ranks' partial products sum to the whole
    layer's product (within fp32's reordering), not to N differently scaled ones."""
    torch.manual_seed(0)
    k, n, m = 256, 96, 24
    whole = QuantLinear(k, n, False, QuantConfig("fp8"), torch.float32, "cpu")
    codes, scales, _ = quantize_weight(torch.randn(n, k), "fp8")
    whole.qweight.copy_(codes)
    whole.scales.copy_(scales)
    x = torch.randn(m, k) * torch.logspace(-3, 0, k)[torch.randperm(k)]  # amax in a different slice per row
    assert whole.quantizes_activations(x)
    slices = [slice(r * k // tp, (r + 1) * k // tp) for r in range(tp)]

    class Ranks(TensorParallelGroup):  # the MAX all-reduce of `tp` ranks, in one process
        def all_reduce_max_(self, a):
            return a.copy_(torch.stack([x[:, s].abs().amax(1, keepdim=True) for s in slices]).amax(0))

        def all_reduce_(self, y):
            return y

    total = sum(RowParallelLinear(whole.slice_inputs(s.start, s.stop), None, Ranks(0, 1))(x[:, s]) for s in slices)
    torch.testing.assert_close(total, whole(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_layers_split(tmp_path, tp):
    """FP8 weights end to end: N's greedy tokens and log-probs follow N = 1's within FP8's rounding
    (the layer's sums are exact as above, but fp32's reordering upstream of a quantizer can move a
    value across an FP8 rounding boundary: one code of 16 per octave)."""
    path = str(tmp_path / "m")
    build_model(path, "llama", **QUANT_SHAPE)
    want, got = run(path, 1, quantization="fp8"), run(path, tp, quantization="fp8")
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for ea, eb in zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs):
            token = next(iter(ea))  # the prompt's or the sampled token
            assert abs(ea[token] - eb[token]) < 0.05


def test_quantized_split_that_cuts_a_group_is_named(tmp_path):
    path = str(tmp_path / "m")
    build_model(path, "llama", **QUANT_SHAPE)
    # 4 ranks: 64 of o_proj's inputs each, half of an int4 group of 128
    with pytest.raises(ValueError, match="o_proj \\(int4\\) splits into 64 inputs per rank.*group_size=128"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=4, quantization="int4")


def assert_same(want, got):
    for a, b in zip(want, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == "length"
        for entries_a, entries_b in ((a.prompt_logprobs[1:], b.prompt_logprobs[1:]),
                                     (a.outputs[0].logprobs, b.outputs[0].logprobs)):
            assert len(entries_a) == len(entries_b)
            for ea, eb in zip(entries_a, entries_b):
                assert sorted(ea) == sorted(eb)  # the same tokens (the prompt's or sampled, and the top ones)
                torch.testing.assert_close(torch.tensor([eb[t] for t in sorted(eb)]),
                                           torch.tensor([ea[t] for t in sorted(ea)]), atol=1e-4, rtol=1e-4)


def test_kv_heads_of_each_rank():
    assert [kv_heads_of_rank(8, 4, r, 2) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_heads_of_rank(8, 2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_heads_of_rank(8, 1, r, 4) for r in range(4)] == [(0, 1)] * 4  # MQA: one head everywhere


@pytest.mark.parametrize("device", DEVICES)
def test_a_dead_worker_fails_the_step_with_an_error(tmp_path, monkeypatch, device):
    monkeypatch.setenv("TIDAL_TP_TIMEOUT_S", "20")
    if device == "cuda" and torch.cuda.device_count() < 2:
        monkeypatch.setenv("TIDAL_TP_BACKEND", "gloo")  # both ranks on the one GPU
    path = str(tmp_path / "m")
    build_model(path, "llama")
    extra = dict(max_num_seqs=4) if device == "cuda" else {}
    llm = tidal.LLM(path, device=device, dtype="float32", tensor_parallel_size=2, num_kv_blocks=40, block_size=4,
                    max_model_len=128, **extra)
    try:
        params = tidal.SamplingParams(temperature=0.0, max_tokens=4)
        assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        worker = llm.engine.tp_driver.workers[0]
        worker.kill()
        worker.join(timeout=10)
        start = time.monotonic()
        out = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        assert time.monotonic() - start < 20
        for o in out:
            assert o.outputs[0].finish_reason == "error" and "tidal-tp-1" in o.error, o.error
        assert_pool_whole(llm)
    finally:
        llm.close()
    assert not llm.engine.tp_driver.workers[0].is_alive()


@gpu_only
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensor_parallel_on_gpus_equals_one_rank(tmp_path, monkeypatch, family, backend):
    """One process per rank on the GPU: over NCCL (one GPU each; decode graphs with the all-reduces
    captured) and over Gloo (every rank on one GPU, eager), the tokens and log-probs of one rank."""
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    monkeypatch.setenv("TIDAL_TP_BACKEND", backend)
    path = str(tmp_path / "m")
    build_model(path, family)
    assert_same(run(path, 1, device="cuda"), run(path, 2, device="cuda"))


def test_gpu_tensor_parallel_needs_a_gpu_per_rank(tmp_path, monkeypatch):
    from tidal.serve.engine import _start_tensor_parallel
    from tidal.serve.config import EngineConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("TIDAL_TP_BACKEND", raising=False)
    path = str(tmp_path / "m")
    build_model(path, "llama")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs one GPU per rank, cuda:0 to cuda:1, but "
                                         r"this machine has 1"):
        _start_tensor_parallel(EngineConfig(path, tensor_parallel_size=2), torch.device("cuda", 0))
    monkeypatch.setenv("TIDAL_TP_BACKEND", "mpi")
    with pytest.raises(ValueError, match="TIDAL_TP_BACKEND='mpi' must be 'nccl' or 'gloo'"):
        _start_tensor_parallel(EngineConfig(path, tensor_parallel_size=2), torch.device("cuda", 0))


def test_ranks_started_by_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m tidal generate ... --tensor-parallel-size 2``: rank 0 runs the
    command, rank 1 serves as its worker (no process started by tidal), the same text as one rank."""
    path = str(tmp_path / "m")
    build_model(path, "llama")
    args = ["generate", path, "--prompt", "def", "--max-tokens", "8", "--temperature", "0", "--device", "cpu",
            "--dtype", "float32"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TIDAL_TP_TIMEOUT_S="60")
    one = subprocess.run([sys.executable, "-m", "tidal", *args], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tidal", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == one.stdout.strip() and one.stdout.startswith("def")


def test_torchrun_world_must_match_the_ranks(tmp_path, monkeypatch):
    path = str(tmp_path / "m")
    build_model(path, "llama")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 but torchrun started WORLD_SIZE=2 processes"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="under torchrun only rank 0 builds the engine; this is rank 1"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=2)


def test_shapes_that_do_not_split_are_named(tmp_path):
    path = str(tmp_path / "m")
    build_model(path, "llama")  # 4 query heads, 2 KV heads, intermediate 96
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide num_attention_heads=4"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be an integer >= 1"):
        tidal.LLM(path, device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        TensorParallelGroup(2, 2)


def test_command_line_flag(tmp_path, capsys):
    from tidal.cli import main

    path = str(tmp_path / "m")
    build_model(path, "llama")
    assert main(["generate", path, "--prompt", "def", "--max-tokens", "4", "--temperature", "0", "--device", "cpu",
                 "--tensor-parallel-size", "2"]) == 0
    capsys.readouterr()
