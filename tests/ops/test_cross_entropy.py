"""softmax_cross_entropy_ (the fused LM-head loss's kernel) against a pure-torch fp32 reference, on the
CPU here and on CUDA where there is a GPU (also against the CPU kernel): losses, the gradient written
over the logits, ignored rows, strided rows, the scalar and 16-byte paths, errors."""

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close, cuda_param, to_device

IGNORE = -100


def reference(logits: torch.Tensor, labels: torch.Tensor, scale: float):
    """(per-row losses fp32, gradient in the logits' dtype) through fp32 autograd."""
    x = logits.float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x, labels, ignore_index=IGNORE, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum() * scale, x)
    return loss.detach(), grad.to(logits.dtype)


def make(rows, vocab, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    base = 4 * torch.randn(rows, vocab + (24 if strided else 0), generator=g)
    logits = base[:, :vocab].to(dtype) if not strided else base.to(dtype)[:, :vocab]
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::3] = IGNORE
    return logits, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("vocab", [1, 8, 1000, 1001, 32768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype, vocab, strided, device):
    logits, labels = make(7, vocab, dtype, seed=vocab, strided=strided)
    want_loss, want_grad = reference(logits, labels, 0.25)
    x = to_device(logits, device)
    assert x.stride(0) == (vocab + 24 if strided else vocab)
    loss = tidal.ops.softmax_cross_entropy_(x, labels.to(device), torch.tensor([0.25], device=device))
    torch.testing.assert_close(loss.cpu(), want_loss, atol=2e-5 * max(1.0, want_loss.abs().max().item()), rtol=1e-5)
    assert_close(x.cpu(), want_grad)
    assert (x.cpu()[labels == IGNORE] == 0).all()
    if device == "cuda":  # the GPU kernel against the CPU kernel
        cpu_x = logits.clone()
        cpu_loss = tidal.ops.softmax_cross_entropy_(cpu_x, labels, torch.tensor([0.25]))
        torch.testing.assert_close(loss.cpu(), cpu_loss, atol=1e-4, rtol=1e-5)
        assert_close(x.cpu(), cpu_x)


@pytest.mark.parametrize("device", DEVICES)
def test_without_gradient_leaves_logits(device):
    logits, labels = make(5, 300, torch.bfloat16, seed=1)
    x = logits.to(device)
    loss = tidal.ops.softmax_cross_entropy_(x, labels.to(device), torch.ones(1, device=device), write_grad=False)
    torch.testing.assert_close(loss.cpu(), reference(logits, labels, 1.0)[0], atol=1e-4, rtol=1e-5)
    assert torch.equal(x.cpu(), logits)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_opcheck(device):
    out = tidal.ops.softmax_cross_entropy_(torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.long, device=device),
                                           torch.ones(1, device=device))
    assert out.shape == (0,)
    logits, labels = make(4, 16, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.tidal.softmax_cross_entropy_.default,
                          (logits.to(device), labels.to(device), torch.ones(1, device=device), IGNORE, True))


def test_bad_arguments_name_the_argument():
    x, y, s = torch.randn(3, 5), torch.tensor([0, 4, IGNORE]), torch.ones(1)
    with pytest.raises(ValueError, match=r"labels\[1\]=5 must be in \[0, 5\) or ignore_index=-100"):
        tidal.ops.softmax_cross_entropy_(x, torch.tensor([0, 5, 1]), s)
    with pytest.raises(ValueError, match=r"labels.shape=\(2,\) must be \(rows,\) = \(3,\)"):
        tidal.ops.softmax_cross_entropy_(x, y[:2], s)
    with pytest.raises(ValueError, match="labels.dtype=torch.int32 must be torch.int64"):
        tidal.ops.softmax_cross_entropy_(x, y.int(), s)
    with pytest.raises(ValueError, match="scale must be one float32 element"):
        tidal.ops.softmax_cross_entropy_(x, y, torch.ones(2))
    with pytest.raises(ValueError, match="logits.dtype=torch.int64"):
        tidal.ops.softmax_cross_entropy_(x.long(), y, s)
    with pytest.raises(ValueError, match=r"logits.stride\(-1\)=3 must be 1"):
        tidal.ops.softmax_cross_entropy_(torch.randn(5, 3).t(), y, s)


@pytest.mark.parametrize("device", [cuda_param("cuda")])
def test_cuda_out_of_range_label_is_nan_not_a_fault(device):
    x = torch.randn(2, 64, device=device)
    loss = tidal.ops.softmax_cross_entropy_(x, torch.tensor([3, 64], device=device), torch.ones(1, device=device))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
