"""tidal.LLM over a model object: a training engine's module served in place. After a training step
(and weights_updated()), greedy tokens equal those of a fresh tidal.LLM loaded from a checkpoint of
the same weights; no parameter was copied; bad models are clear errors."""

import pytest
import torch

import tidal
from tidal.models import load_model
from tidal.models.loader import save_model
from tiny_models import assert_pool_whole, build_model, hf_greedy

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42]]


def _greedy(llm):
    outs = llm.generate(PROMPTS, tidal.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_training_engine_module_served_in_place(tmp_path):
    hf = build_model(str(tmp_path / "hf"))
    model, _ = load_model(str(tmp_path / "hf"))
    model.train()
    engine = tidal.initialize(model, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
                                      "optimizer": {"type": "AdamW", "params": {"lr": 5e-2}}})
    llm = tidal.LLM(engine.module, device="cpu", num_kv_blocks=64, block_size=4, max_model_len=64)
    assert [hf_greedy(hf, p, 8, eos=False) for p in PROMPTS] == _greedy(llm)  # the same weights as loaded
    before = {n: p.data_ptr() for n, p in engine.module.named_parameters()}
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        engine.backward(engine(ids, labels=ids))
        engine.step()
    llm.weights_updated()
    assert any(not torch.equal(weights[n], p) for n, p in engine.module.named_parameters())  # it trained
    after = _greedy(llm)
    assert {n: p.data_ptr() for n, p in engine.module.named_parameters()} == before  # served in place
    save_model(engine.module, tmp_path / "trained")
    fresh = tidal.LLM(str(tmp_path / "trained"), device="cpu", num_kv_blocks=64, block_size=4, max_model_len=64,
                      tokenizer=str(tmp_path / "hf"))
    assert after == _greedy(fresh)
    assert_pool_whole(llm)


def test_bad_models_are_named(tmp_path):
    with pytest.raises(ValueError, match="model=Linear is not a tidal model"):
        tidal.LLM(torch.nn.Linear(2, 2), device="cpu")
    build_model(str(tmp_path))
    model, _ = load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype='bfloat16' but the model's parameters are torch.float32"):
        tidal.LLM(model, dtype="bfloat16", num_kv_blocks=16)
