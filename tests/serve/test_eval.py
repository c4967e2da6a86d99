"""tidal.serve.eval.perplexity equals exp(mean NLL) from transformers' forward over the same windows
(disjoint and overlapping, a token budget that chunks them), from text or token ids; the windows
themselves; bad arguments name themselves."""

import math
import random

import pytest
import torch

import tidal
from tidal.serve.eval import perplexity, windows
from tiny_models import assert_pool_whole, build_model

TEXT = ("def add(a, b):\n    return a + b\n" * 3 + "The quick brown fox jumps over the lazy dog. " * 4
        + "for i in range(10):\n    print(i * i)\n")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval"))
    return path, build_model(path, "qwen2", max_position_embeddings=64)


@pytest.fixture(scope="module")
def llm(model):
    return tidal.LLM(model[0], block_size=4, num_kv_blocks=128, max_num_batched_tokens=24)


def hf_nll(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Summed NLL and count: windows [s, s + context) every `stride` tokens; each token scored by
    the first window in which it has a token before it."""
    total, count, scored_to, start = 0.0, 0, 1, 0
    while True:
        end = min(start + context, len(ids))
        with torch.no_grad():
            log_probs = hf(torch.tensor([ids[start:end]])).logits[0].float().log_softmax(-1)
        for p in range(max(start + 1, scored_to), end):
            total -= log_probs[p - start - 1, ids[p]].item()
            count += 1
        scored_to = end
        if end == len(ids):
            return total, count
        start += stride


@pytest.mark.parametrize("context,stride", [(16, None), (16, 5), (63, None), (7, 7)])
def test_perplexity_equals_transformers(model, llm, context, stride):
    _, hf = model
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 63  # several windows at every context
    total, count = hf_nll(hf, ids, context, stride or context)
    result = perplexity(llm, ids, context=context, stride=stride, windows_per_call=3)
    assert result.num_tokens == count
    assert math.isclose(result.nll, total / count, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)
    assert_pool_whole(llm)


def test_text_is_tokenized_as_a_prompt(llm):
    by_text = perplexity(llm, TEXT, context=20)
    by_ids = perplexity(llm, llm.tokenizer.encode(TEXT), context=20)
    assert by_text == by_ids
    whole = perplexity(llm, TEXT)  # default context: max_model_len - 1
    assert whole.num_windows == math.ceil(len(llm.tokenizer.encode(TEXT)) / 63)
    assert_pool_whole(llm)


def test_windows():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(4, 8) == [(0, 4, 1)]
    assert windows(9, 3, 1)[-1] == (6, 9, 8)
    rng = random.Random(0)
    for _ in range(100):
        n, context = rng.randrange(2, 60), rng.randrange(2, 12)
        stride = rng.randrange(1, context + 1)
        scored = [p for _, end, first in windows(n, context, stride) for p in range(first, end)]
        assert scored == list(range(1, n)) if stride < context else len(scored) == len(set(scored))


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=64), r"context=64 must be <= max_model_len - 1 = 63"),
    (dict(context=1), r"context=1 must be an integer >= 2"),
    (dict(context=8, stride=9), r"stride=9 must be an integer in \[1, context=8\]"),
    (dict(stride=0), r"stride=0 must be an integer in \[1, context=63\]"),
    (dict(windows_per_call=0), r"windows_per_call=0 must be None or an integer >= 1"),
])
def test_bad_arguments(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(llm, TEXT, **kwargs)
    with pytest.raises(ValueError, match=r"num_tokens=1: the text must hold at least 2 tokens"):
        perplexity(llm, [5])
