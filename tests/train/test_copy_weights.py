"""TrainingEngine.copy_weights_to: after training steps, a separate model (what the RLHF serving engine
serves at ZeRO stage 3) receives exactly the weights the training forward uses, cast to its dtype:
equal to full_state_dict() rounded to the compute dtype. At stage 3 the copy goes group by group, at
most two groups gathered at once; on 2 Gloo ranks as on one. A target missing a parameter is named."""

import pytest
import torch

import tidal
from tidal.models import load_model
from tiny_models import build_model
from train_util import spawn


def job(rank: int, world: int, path: str, stage: int, bf16: bool) -> dict:
    model, _ = load_model(path)
    model.train()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "bf16": {"enabled": bf16}}
    engine = tidal.initialize(model, config)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 10), generator=gen)
        engine.backward(engine(ids, labels=ids))
        engine.step()
    target, _ = load_model(path)
    target.requires_grad_(False)
    live = []
    if engine.gatherer is not None:
        def watch(slot):  # counts the live groups at each copy
            live.append(sum(g.buffer is not None for g in engine.gatherer.groups))
            return dest[names[id(slot.param)]]
        names = {id(p): n for n, p in engine.module.named_parameters()}
        dest = dict(target.named_parameters())
        engine.gatherer.copy_into(watch)
        target2, _ = load_model(path)
        engine.copy_weights_to(target2)
        for a, b in zip(target.parameters(), target2.parameters()):
            assert torch.equal(a, b)
    else:
        engine.copy_weights_to(target)
    full = engine.full_state_dict()
    dtype = engine.compute_dtype
    got = {n: p.detach().clone() for n, p in target.named_parameters()}
    want = {n: full[n].to(dtype).to(got[n].dtype) for n in got}
    return {"got": got, "want": want, "max_live": max(live, default=0),
            "groups": 0 if engine.gatherer is None else len(engine.gatherer.groups)}


@pytest.mark.parametrize("world,stage,bf16", [(1, 0, False), (1, 3, False), (2, 1, True), (2, 3, False),
                                              (2, 3, True)])
def test_copy_weights_equals_the_gathered_weights(tmp_path, world, stage, bf16):
    build_model(str(tmp_path / "hf"))
    results = spawn(world, job, (str(tmp_path / "hf"), stage, bf16), str(tmp_path))
    for r in results:
        assert set(r["got"]) == set(r["want"])
        for name, tensor in r["want"].items():
            assert torch.equal(r["got"][name], tensor), name
        if stage == 3:
            assert r["groups"] > 2 and 1 <= r["max_live"] <= 2


def test_a_target_missing_a_parameter_is_named(tmp_path):
    build_model(str(tmp_path / "a"))
    build_model(str(tmp_path / "b"), num_layers=1)
    model, _ = load_model(str(tmp_path / "a"))
    engine = tidal.initialize(model, {"train_micro_batch_size_per_gpu": 1,
                                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    small, _ = load_model(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"target has no parameter 'model\.layers\.1\..*' \(\d+ of the module's"):
        engine.copy_weights_to(small)
