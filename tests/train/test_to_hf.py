"""tidal.checkpoint.to_hf: a model trained with tidal.initialize and saved as a sharded training checkpoint
becomes a Hugging Face directory that transformers loads with the trained weights and tidal.LLM serves,
for tidal's own Llama model (fused parameters renamed to Hugging Face's) and for a transformers model,
tied embeddings or not; a checkpoint of an unknown module or with a corrupt shard is a clear error."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

import tidal
from conftest import assert_close
from tidal.models.loader import load_model
from tiny_models import VOCAB_SIZE, build_model, hf_greedy

STEPS, BATCH, SEQ = 3, 4, 16
PROMPTS = [[5, 17, 42], [9], [100, 3, 250, 77, 8, 61, 12]]


def train_config(stage: int) -> dict:
    return {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage}}


def batch(step: int) -> torch.Tensor:
    return torch.randint(2, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train(engine, logits_of) -> None:
    for step in range(STEPS):
        ids = batch(step)
        engine.backward(next_token_loss(logits_of(engine(ids)), ids))
        engine.step()


@pytest.fixture(scope="module", params=[(False, 0), (True, 1), (True, 3)],
                ids=["untied-stage0", "tied-stage1", "tied-stage3"])
def tidal_trained(request, tmp_path_factory):
    """A tiny tidal Llama trained a few steps: (checkpoint dir, the engine's full fp32 state, config,
    initial HF model)."""
    tie, stage = request.param
    root = tmp_path_factory.mktemp("tidal_trained")
    initial = build_model(str(root / "init"), tie=tie)
    model, config = load_model(str(root / "init"))
    engine = tidal.initialize(model.train(), train_config(stage))
    train(engine, lambda logits: logits)
    ckpt = str(root / "ckpt")
    engine.save_checkpoint(ckpt)
    return ckpt, engine.full_state_dict(), config, initial


def reference_model(state: dict, config) -> torch.nn.Module:
    """tidal's model holding the engine's full_state_dict (what the checkpoint should reproduce)."""
    model = tidal.models.LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()


def test_tidal_model_to_hf_loads_in_transformers_and_serves_in_tidal(tidal_trained, tmp_path):
    ckpt, state, config, initial = tidal_trained
    with open(os.path.join(ckpt, "global_step3", "index.json")) as f:
        assert json.load(f)["hf"] == {"kind": "tidal", "hf_config": config.hf_config}
    out = str(tmp_path / "hf")
    assert tidal.checkpoint.to_hf(ckpt, out) == out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == config.tie_word_embeddings
    ids = batch(100)
    with torch.no_grad():
        got = hf(ids).logits
        want = reference_model(state, config)(ids)
        assert not torch.allclose(initial(ids).logits, want, atol=1e-3)  # training moved the weights
    assert_close(got, want)

    expected = [hf_greedy(hf, prompt, 10) for prompt in PROMPTS]
    llm = tidal.LLM(out, block_size=4, num_kv_blocks=64)
    outputs = llm.generate(PROMPTS, tidal.SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_tidal_model_to_hf_bfloat16_sharded_then_single_file(tidal_trained, tmp_path):
    ckpt, state, config, _ = tidal_trained
    reference = dict(reference_model(state, config).hf_state_dict())
    out = tmp_path / "hf"
    tidal.checkpoint.to_hf(ckpt, out, tag="global_step3", dtype="bfloat16", max_shard_bytes=40_000)
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for loaded in (dict(load_model(out)[0].hf_state_dict()),
                   transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()):
        for name, tensor in reference.items():
            assert loaded[name].dtype == torch.bfloat16, name
            torch.testing.assert_close(loaded[name], tensor.to(torch.bfloat16), atol=0, rtol=0)

    # the same directory again, unsharded: the shards and their index are gone, not mixed in
    tidal.checkpoint.to_hf(ckpt, out, dtype=torch.float16)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = dict(load_model(out)[0].hf_state_dict())
    assert all(torch.equal(loaded[n], t.to(torch.float16)) for n, t in reference.items())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_model_to_hf_reloads_with_equal_weights(tie, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB_SIZE,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    model = transformers.AutoModelForCausalLM.from_config(config)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = tidal.initialize(model.train(), train_config(1))
    train(engine, lambda output: output.logits)
    state = engine.full_state_dict()
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    engine.save_checkpoint(ckpt, tag="final")
    with open(os.path.join(ckpt, "final", "index.json")) as f:
        source = json.load(f)["hf"]
    assert source["kind"] == "transformers" and source["hf_config"]["architectures"] == ["LlamaForCausalLM"]

    tidal.checkpoint.to_hf(ckpt, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is transformers.LlamaForCausalLM
    got = reloaded.state_dict()
    assert set(got) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0)
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    if tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    # the same directory loads in tidal too (the Llama architecture it names)
    ids = batch(7)
    with torch.no_grad():
        assert_close(load_model(out)[0](ids), reloaded.eval()(ids).logits)


def test_unknown_module_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    engine = tidal.initialize(model, train_config(0))
    ckpt = str(tmp_path / "ckpt")
    path = engine.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=f"checkpoint {path} has no Hugging Face config.*not a known model"):
        tidal.checkpoint.to_hf(ckpt, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_corrupt_shard_missing_checkpoint_and_bad_dtype_are_clear_errors(tidal_trained, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(tidal_trained[0], ckpt)
    shard = os.path.join(ckpt, "global_step3", "rank_00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(300)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="rank_00000.safetensors is corrupt"):
        tidal.checkpoint.to_hf(ckpt, str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="no_such_tag does not exist"):
        tidal.checkpoint.to_hf(ckpt, str(tmp_path / "hf"), tag="no_such_tag")
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        tidal.checkpoint.to_hf(tidal_trained[0], str(tmp_path / "hf"), dtype="int8")
