"""Below stage 3 gradients reach the fp32 accumulator without a pass over the parameters (fp32:
every .grad is a view of the accumulator; bf16: a hook folds each one in as autograd produces it):
the engine gives the reference weights even when the caller drops the gradients (zero_grad) or holds
a reference to one (which makes autograd accumulate out of place), in fp32 and in bf16."""

import pytest
import torch

import tidal
from train_util import ACCUM, assert_state_close, config, make_model, micro_batch

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
