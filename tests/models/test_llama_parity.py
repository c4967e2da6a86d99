"""Llama-family parity with transformers: tiny random models of every family are built and saved with
transformers, loaded with tidal.models.load_model, and compared logit for logit, in training mode
(batched forward), serving mode (flat batch over a real paged KV cache: prefill, chunked prefill,
decode, greedy generation) and dynamic-NTK RoPE past max_position_embeddings."""

import random

import pytest
import torch
import transformers

import tidal
from conftest import DEVICES

# The serving-mode ops (rotary and the KV write, paged attention) on the CPU and, where there is one,
# the GPU (NaN-filled caches: a read of a slot nothing wrote shows).
SERVING_DEVICES = DEVICES
from tidal.models import AttentionMetadata, load_model

ATOL, RTOL = 2e-5, 1e-5  # fp32 end to end; only summation order differs

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama_bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama_mha": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama_rope_llama3": ("LlamaConfig", {"rope_parameters": LLAMA3}),
    "llama_rope_linear": ("LlamaConfig", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama_rope_dynamic": ("LlamaConfig", {"rope_scaling": {"type": "dynamic", "factor": 2.0},
                                           "max_position_embeddings": 16}),
    "mistral_window8": ("MistralConfig", {"sliding_window": 8}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
}
SERVING_OPS = ("silu_and_mul", "rotary_embedding_", "reshape_and_cache_", "paged_attention")
needs_serving_ops = pytest.mark.skipif(not all(hasattr(tidal.ops, name) for name in SERVING_OPS),
                                       reason="the serving kernels are not in tidal.ops yet")


def build_hf(family: str, path, seed: int = 0, **extra):
    """A random transformers model of ``family`` (every weight random, norms around 1, biases
    nonzero), saved to ``path``; returned in eval mode with eager attention."""
    config_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **overrides, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens], device=hf.device)).logits[0].float()


class PagedRunner:
    """Drives a tidal model the way the engine will: a flat batch per step over a paged KV cache,
    blocks handed out in a shuffled order so a wrong block table cannot pass by accident, unwritten
    slots NaN so a read past a sequence's length cannot either."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0):
        shape = model.kv_cache_shape(num_blocks, block_size)
        self.model, self.block_size = model, block_size
        # NaN everywhere: attention must never read a slot this test has not written
        self.kv_caches = [(torch.full(shape, float("nan"), dtype=model.dtype, device=model.device),
                           torch.full(shape, float("nan"), dtype=model.dtype, device=model.device))
                          for _ in range(model.num_layers)]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one step: ``chunks`` = (sequence id, its new tokens). Returns each chunk's logits."""
        bs, ids, positions, slots, seq_lens, cu = self.block_size, [], [], [], [], [0]
        for seq, tokens in chunks:
            start = self.num_computed.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            for pos in range(start, start + len(tokens)):
                if pos // bs == len(table):
                    table.append(self.free.pop())
                slots.append(table[pos // bs] * bs + pos % bs)
                positions.append(pos)
            ids += tokens
            self.num_computed[seq] = start + len(tokens)
            seq_lens.append(start + len(tokens))
            cu.append(cu[-1] + len(tokens))
        width = max(len(self.tables[seq]) for seq, _ in chunks)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in chunks]
        dev = self.model.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(len(t) for _, t in chunks), max_seqlen_k=max(seq_lens))
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev), attn, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), self.model.config.vocab_size)
        return [logits[cu[i]:cu[i + 1]] for i in range(len(chunks))]


def assert_logits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (actual.float().cpu() - expected.float().cpu()).abs().max().item()
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}")


# ---- training mode ---------------------------------------------------------------------------------

def test_training_logits(family, tmp_path):
    hf = build_hf(family, tmp_path)
    model, config = load_model(tmp_path)
    # 21 > max_position_embeddings=16 for the dynamic family: both rescale the base for seq_len 21
    ids = torch.randint(0, config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    actual = model(ids)
    assert actual.shape == (3, 21, config.vocab_size) and actual.requires_grad
    assert_logits(actual.detach(), expected, f"{family} training logits")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral_window8", "llama_tied"])
def test_training_gradients(family, tmp_path):
    """The training forward is differentiable and its gradients are transformers' (mapped to HF names)."""
    hf = build_hf(family, tmp_path).train()
    model, _ = load_model(tmp_path)
    model.train()
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    torch.nn.functional.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten()).backward()
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten()).backward()
    hf_params = dict(hf.named_parameters())
    for name, param, lo, hi in ((n, *t) for n, t in model._hf_targets().items()):
        grad = param.grad if lo is None else param.grad[lo:hi]
        torch.testing.assert_close(grad, hf_params[name].grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---- serving mode ----------------------------------------------------------------------------------

@needs_serving_ops
@pytest.mark.parametrize("device", SERVING_DEVICES)
def test_serving_prefill_flat_batch(family, device, tmp_path):
    """Prompts of different lengths in one flat batch reproduce transformers' logits at every position."""
    hf = build_hf(family, tmp_path).to(device)
    model, _ = load_model(tmp_path, device=device)
    rng = random.Random(4)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (3, 16, 9, 1)]
    runner = PagedRunner(model)
    for i, (prompt, logits) in enumerate(zip(prompts, runner.step(list(enumerate(prompts))))):
        assert_logits(logits, hf_logits(hf, prompt), f"{family} prefill of prompt {i} (len {len(prompt)})")


@needs_serving_ops
@pytest.mark.parametrize("device", SERVING_DEVICES)
def test_serving_chunked_prefill_and_decode(family, device, tmp_path):
    """A scheduler-like mix: chunked prefills beside decodes and whole prefills, then decode steps of
    all sequences together; every new token's logits equal transformers' on the whole sequence."""
    hf = build_hf(family, tmp_path).to(device)
    model, _ = load_model(tmp_path, device=device)
    rng = random.Random(5)
    seqs = [[rng.randrange(128) for _ in range(16)] for _ in range(3)]
    runner = PagedRunner(model)
    got = {s: [] for s in range(3)}

    def run(step):
        chunks = [(s, seqs[s][runner.num_computed.get(s, 0):runner.num_computed.get(s, 0) + n]) for s, n in step]
        for (s, _), logits in zip(chunks, runner.step(chunks)):
            got[s].append(logits)

    run([(0, 6), (1, 9)])          # seq 0: first prefill chunk; seq 1: whole prompt
    run([(0, 7), (1, 1), (2, 5)])  # seq 0: second chunk; seq 1 decodes; seq 2 prefills
    while any(runner.num_computed[s] < len(seqs[s]) for s in range(3)):
        run([(s, 1) for s in range(3) if runner.num_computed[s] < len(seqs[s])])
    for s, seq in enumerate(seqs):
        actual = torch.cat(got[s])
        assert actual.shape[0] == len(seq)
        assert_logits(actual, hf_logits(hf, seq), f"{family} sequence {s}")


def greedy(runner: PagedRunner, prompts: list[list[int]], num_new: int):
    """Greedy generation of all prompts side by side: one prefill step, then decode steps.
    Returns per sequence (generated tokens, logits [num_new, vocab] that chose them)."""
    tokens = {s: [] for s in range(len(prompts))}
    logits = {s: [] for s in range(len(prompts))}
    chunks = list(enumerate(prompts))
    for _ in range(num_new):
        out = runner.step(chunks)
        chunks = []
        for (s, _), rows in zip(enumerate(prompts), out):
            logits[s].append(rows[-1])
            tokens[s].append(int(rows[-1].argmax()))
            chunks.append((s, [tokens[s][-1]]))
    return {s: (tokens[s], torch.stack(logits[s])) for s in tokens}


def hf_generate(hf, prompt: list[int], num_new: int):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=num_new,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


@needs_serving_ops
@pytest.mark.parametrize("family", ["llama", "llama_rope_llama3", "mistral_window8", "qwen2_window", "qwen3"])
def test_serving_greedy_generation(family, tmp_path):
    """Greedy tokens and the logits behind them equal transformers' generate() (KV cache on both sides)."""
    hf = build_hf(family, tmp_path)
    model, _ = load_model(tmp_path)
    rng = random.Random(6)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (7, 2, 12)]
    got = greedy(PagedRunner(model), prompts, num_new=20)
    for s, prompt in enumerate(prompts):
        tokens, logits = hf_generate(hf, prompt, 20)
        assert_logits(got[s][1], logits, f"{family} generation {s}")
        assert got[s][0] == tokens


@needs_serving_ops
def test_serving_dynamic_rope_past_max_position(tmp_path):
    """Dynamic NTK RoPE, max_position_embeddings=16, generating to 40 tokens: each sequence's new
    tokens use the base for its own length, as transformers' generate() does for that sequence alone.
    Three sequences share every step: one crossing 16 during decode, one whose prompt (20) is past 16
    already, one that starts short (3) and crosses it later than the first."""
    build_hf("llama_rope_dynamic", tmp_path)
    model, config = load_model(tmp_path)
    assert config.max_position_embeddings == 16 and config.rope_scaling["rope_type"] == "dynamic"
    rng = random.Random(7)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (10, 20, 3)]
    num_new = 30
    got = greedy(PagedRunner(model, num_blocks=64), prompts, num_new)
    for s, prompt in enumerate(prompts):
        # a fresh transformers model per sequence: its rotary module keeps the longest length seen
        hf = build_hf("llama_rope_dynamic", tmp_path / f"fresh{s}")
        tokens, logits = hf_generate(hf, prompt, num_new)
        assert_logits(got[s][1], logits, f"dynamic rope sequence {s} (prompt {len(prompt)})")
        assert got[s][0] == tokens


@needs_serving_ops
@pytest.mark.parametrize("family", ["llama_rope_llama3", "llama_rope_linear"])
def test_serving_past_max_position_grows_rope_table(family, tmp_path):
    """With a scaled RoPE an engine may run past max_position_embeddings (transformers computes any
    position): the table grows on demand and the logits still match."""
    hf = build_hf(family, tmp_path, max_position_embeddings=8)
    model, _ = load_model(tmp_path)
    seq = [random.Random(8).randrange(128) for _ in range(30)]
    runner = PagedRunner(model)
    logits = torch.cat([*runner.step([(0, seq[:5])]), *runner.step([(0, seq[5:20])]),
                        *(runner.step([(0, [t])])[0] for t in seq[20:])])
    assert model.cos_sin_cache.shape[0] >= 30
    assert_logits(logits, hf_logits(hf, seq), f"{family} past max_position_embeddings")


@needs_serving_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama_tied", "qwen3"])
def test_serving_half_precision(family, dtype, tmp_path):
    """Serving in bf16/fp16 (fp32 rotary table, half KV cache) stays within rounding of transformers
    in the same dtype: tidal rounds once per fused op where transformers rounds per torch op."""
    hf = build_hf(family, tmp_path).to(dtype)
    model, _ = load_model(tmp_path, dtype=dtype)
    assert model.dtype == dtype and model.cos_sin_cache.dtype == torch.float32
    rng = random.Random(9)
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (5, 14)]
    got = greedy(PagedRunner(model), prompts, num_new=6)
    for s, prompt in enumerate(prompts):
        expected = hf_logits(hf, prompt + got[s][0][:-1])[len(prompt) - 1:]
        torch.testing.assert_close(got[s][1], expected, atol=0.1, rtol=0.02)
