"""fused_linear_cross_entropy against torch's cross_entropy over the full logits: the loss and the
gradients of hidden, weight and bias in fp32 (and bf16 within its rounding), chunk sizes that do and
do not divide the rows, ignored rows, every row ignored; it keeps no [rows, vocab] tensor for the
backward pass; a Llama model trained with ``labels`` gets transformers' shifted next-token loss and the
same gradients as the logits path (tied embeddings too); bad input is named."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import gpu_only
from tidal.models import load_model
from tidal.models.losses import fused_linear_cross_entropy

ROWS, HIDDEN, VOCAB = 37, 16, 50


def _inputs(dtype, bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(ROWS, HIDDEN, generator=g).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(VOCAB, HIDDEN, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(VOCAB, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, VOCAB, (ROWS,), generator=g)
    y[[3, 10, 36]] = -100
    return h, w, b, y


def _grads(loss_fn, h, w, b, y):
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    loss = loss_fn(h, w, b, y)
    (3.0 * loss).backward()
    return [loss.detach()] + [t.grad.clone() for t in (h, w, b) if t is not None]


def _reference(h, w, b, y):
    logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    return F.cross_entropy(logits.float(), y, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_cross_entropy_fp32(chunk, bias):
    h, w, b, y = _inputs(torch.float32, bias)
    got = _grads(lambda *a: fused_linear_cross_entropy(a[0], a[1], a[3], bias=a[2], chunk_rows=chunk), h, w, b, y)
    want = _grads(_reference, h, w, b, y)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_within_rounding():
    h, w, b, y = _inputs(torch.bfloat16, False)
    got = _grads(lambda *a: fused_linear_cross_entropy(a[0], a[1], a[3], chunk_rows=8), h, w, b, y)
    want = _grads(_reference, h, w, b, y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)  # both reduce fp32 logits
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cross_entropy(dtype):
    """On a GPU (bf16: the weight gradient accumulated over the chunks in fp32 by the GEMM itself)."""
    h, w, b, y = (t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None
                  for t in _inputs(dtype, True))
    got = _grads(lambda *a: fused_linear_cross_entropy(a[0], a[1], a[3], bias=a[2], chunk_rows=8), h, w, b, y)
    want = _grads(_reference, h, w, b, y)
    if dtype == torch.float32:
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for g, r in zip(got[1:], want[1:]):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_every_row_ignored_gives_zero():
    h, w, _, y = _inputs(torch.float32, False)
    y[:] = -100
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not h.grad.any() and not w.grad.any()


def test_keeps_no_logits_for_the_backward_pass():
    h, w, _, y = _inputs(torch.float32, False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused_linear_cross_entropy(h, w, y, chunk_rows=8)
    assert saved and max(saved) < ROWS * VOCAB  # the gradients of hidden and weight, never [rows, vocab]


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.full((ROWS,), VOCAB)), f"labels holds {VOCAB}: labels must be in \\[0, {VOCAB}\\) or -100"),
    (dict(labels=torch.zeros(ROWS - 1, dtype=torch.long)), "labels.shape=\\(36,\\) must equal hidden.shape"),
    (dict(weight=torch.zeros(VOCAB, HIDDEN, dtype=torch.float64)), "weight.dtype=torch.float64 must equal"),
    (dict(chunk_rows=0), "chunk_rows=0 must be >= 1"),
])
def test_bad_input_is_named(kwargs, match):
    h, w, _, y = _inputs(torch.float32, False)
    args = dict(hidden=h, weight=w, labels=y) | kwargs
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(**args)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_labels_loss_and_gradients(tie, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    hf = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 4] = -100
    model, _ = load_model(str(tmp_path))
    model.train()

    fused = model(ids, labels=labels)
    fused.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, hf(ids, labels=labels).loss, rtol=1e-5, atol=1e-5)  # transformers' shift
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
