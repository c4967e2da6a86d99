"""tidal.zero.Init: parameters built on the meta device, materialised by tidal.initialize straight
into each rank's ZeRO-3 shard (a module at a time): from a Hugging Face checkpoint (load_model under
the context), from tidal's own initialisation and from a torch module's reset_parameters(). The
shards and the weights after training equal the ordinary stage-3 engine's on 1 and 2 Gloo ranks;
below stage 3 it is refused by name."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import tidal
from tidal.models import load_model
from tidal.models.config import ModelConfig
from tidal.models.llama import LlamaForCausalLM
from train_util import IN, OUT, assert_state_close, config, micro_batch, spawn

VOCAB, SEQ, BATCH, STEPS = 64, 9, 4, 3
OPT = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}


def save_tiny(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def train_llama(rank: int, world: int, path: str, under_init: bool) -> dict:
    if under_init:
        with tidal.zero.Init():
            model, _ = load_model(path)
        assert all(p.is_meta for p in model.parameters())
    else:
        model, _ = load_model(path)
    engine = tidal.initialize(model, {"train_batch_size": BATCH, "zero_optimization": {"stage": 3},
                                      "optimizer": OPT, "gradient_clipping": 1.0})
    assert not model.fuse_across_modules  # stage 3 gathers around each module's own call
    shard = engine.master.numel()
    initial = {k: v.cpu() for k, v in engine.full_state_dict().items()}
    micro = BATCH // world
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
        rows = ids[rank * micro:(rank + 1) * micro]
        engine.backward(engine(rows, labels=rows))
        engine.step()
    return {"initial": initial, "state": {k: v.cpu() for k, v in engine.full_state_dict().items()},
            "shard": shard, "shard_numel": engine.plan.shard_numel}


@pytest.mark.parametrize("world", [1, 2])
def test_checkpoint_straight_into_the_shards(world, tmp_path):
    save_tiny(tmp_path / "model")
    got = spawn(world, train_llama, (str(tmp_path / "model"), True), str(tmp_path))
    want = spawn(world, train_llama, (str(tmp_path / "model"), False), str(tmp_path))
    for r in range(world):
        assert got[r]["shard"] == got[r]["shard_numel"]  # a rank's master weights: its shard only
        assert_state_close(got[r]["initial"], want[r]["initial"], rtol=0, atol=0)
        assert_state_close(got[r]["state"], want[r]["state"], rtol=0, atol=0)


def test_tidal_model_initialised_a_module_at_a_time():
    cfg = ModelConfig.from_dict(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64).to_dict() | {"architectures": ["LlamaForCausalLM"]})
    torch.manual_seed(5)
    plain = LlamaForCausalLM(cfg)
    plain.initialize_weights()
    want = tidal.initialize(plain, {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "optimizer": OPT})
    torch.manual_seed(5)
    with tidal.zero.Init():
        meta = LlamaForCausalLM(cfg)  # the device argument is overridden: shapes only
    assert all(p.is_meta for p in meta.parameters())
    got = tidal.initialize(meta, {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "optimizer": OPT})
    assert_state_close(got.full_state_dict(), want.full_state_dict(), rtol=0, atol=0)


def train_torch_module(rank: int, world: int, under_init: bool) -> dict:
    torch.manual_seed(0)
    if under_init:
        with tidal.zero.Init():
            model = _build()
    else:
        model = _build()
    engine = tidal.initialize(model, config(3, world))
    for step in range(STEPS):
        for a in range(2):
            x, y = micro_batch(step, a, rank, world)
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
    return {k: v.cpu() for k, v in engine.full_state_dict().items()}


def _build():
    """train_util.make_model's architecture without its seeding (the caller seeds once)."""
    return torch.nn.Sequential(torch.nn.Linear(IN, 37), torch.nn.Tanh(), torch.nn.Linear(37, OUT),
                               torch.nn.LayerNorm(OUT))


@pytest.mark.parametrize("world", [1, 2])
def test_torch_module_reset_parameters_into_the_shards(world, tmp_path):
    got = spawn(world, train_torch_module, (True,), str(tmp_path))
    want = spawn(world, train_torch_module, (False,), str(tmp_path))
    assert_state_close(got[0], want[0], rtol=0, atol=0)


def test_below_stage_3_is_refused():
    with tidal.zero.Init():
        model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="built under tidal.zero.Init needs zero_optimization.stage=3, got stage 2"):
        tidal.initialize(model, {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "optimizer": OPT})
