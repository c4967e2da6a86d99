"""Below stage 3 gradients reach the accumulator without a pass over the parameters (fp32, and bf16
on one rank without accumulation: every .grad is a view of the accumulator; bf16 otherwise: a hook
folds each one into fp32 as autograd produces it):
the engine gives the reference weights even when the caller drops the gradients (zero_grad) or holds
a reference to one (which makes autograd accumulate out of place), in fp32 and in bf16."""

import pytest
import torch

import tidal
from train_util import ACCUM, assert_state_close, config, global_batch, make_model, micro_batch

STEPS = 2


def train(interfere: str, bf16: bool) -> dict:
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    engine = tidal.initialize(make_model().to(torch.bfloat16 if bf16 else torch.float32), config(1, 1, **extra))
    held = []
    for step in range(STEPS):
        for a in range(ACCUM):
            x, y = micro_batch(step, a, 0, 1)
            x = x.to(torch.bfloat16) if bf16 else x
            if interfere == "hold":  # a live reference to a .grad: autograd adds out of place
                held = [p.grad for p in engine.module.parameters()]
            engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
            if interfere == "zero_grad":
                engine.module.zero_grad()  # set_to_none: the engine re-attaches its views
            engine.step()
    del held
    return engine.full_state_dict()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("interfere", ["zero_grad", "hold"])
def test_gradients_survive_the_caller(interfere, bf16):
    want = train("none", bf16)
    got = train(interfere, bf16)
    assert_state_close(got, want, rtol=0, atol=0)


def test_fp32_grads_are_views_of_the_accumulator_and_bf16_grads_are_freed():
    engine = tidal.initialize(make_model(), config(0, 1))
    x, y = micro_batch(0, 0, 0, 1)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    base = engine.grad_accum.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == base for p in engine.module.parameters())
    assert engine.grad_accum.abs().sum() > 0
    engine = tidal.initialize(make_model().to(torch.bfloat16), config(0, 1, bf16={"enabled": True}))
    engine.backward(torch.nn.functional.mse_loss(engine(x.to(torch.bfloat16)).float(), y))
    assert all(p.grad is None for p in engine.module.parameters()) and engine.grad_accum.abs().sum() > 0


def _train_without_accumulation(offload: bool) -> tuple[dict, torch.Tensor]:
    """bf16, one rank, no accumulation over micro-batches: the whole global batch per step."""
    zero = {"stage": 0}
    if offload:  # the optimizer on the host keeps the fp32 accumulator and its fold hooks
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = config(0, 1, bf16={"enabled": True}, gradient_accumulation_steps=1, zero_optimization=zero)
    engine = tidal.initialize(make_model().to(torch.bfloat16), cfg)
    for step in range(3):
        x, y = global_batch(step)
        engine.backward(torch.nn.functional.mse_loss(engine(x.to(torch.bfloat16)).float(), y))
        engine.step()
    return engine.full_state_dict(), engine.grad_accum


def test_bf16_without_accumulation_uses_the_compute_dtype_buffer_with_the_same_weights():
    """One rank, no accumulation, optimizer on the device: .grad are views of a bf16 accumulator
    (half the memory of fp32, no fold), and the weights equal the fp32-accumulator path's bit for bit
    (an fp32 accumulator holds exactly the bf16 gradients; Adam widens them as it reads)."""
    got, accum = _train_without_accumulation(offload=False)
    want, fp32_accum = _train_without_accumulation(offload=True)
    assert accum.dtype == torch.bfloat16 and fp32_accum.dtype == torch.float32
    assert_state_close(got, want, rtol=0, atol=0)

    engine = tidal.initialize(make_model().to(torch.bfloat16),
                              config(0, 1, bf16={"enabled": True}, gradient_accumulation_steps=1))
    x, y = global_batch(0)
    engine.backward(torch.nn.functional.mse_loss(engine(x.to(torch.bfloat16)).float(), y))
    base = engine.grad_accum.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == base for p in engine.module.parameters())
    assert engine.grad_accum.abs().sum() > 0
