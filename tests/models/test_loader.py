"""config.json parsing, the safetensors loader (single file, shards, dtype, errors), weight name
mapping both ways, the registry and the rotary tables against transformers' own."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tidal.models import (SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelConfig, build_cos_sin_cache,
                          get_model_class, load_model, save_model)
from tidal.models import rope
from tidal.models.loader import iter_safetensors, safetensors_files

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96, max_position_embeddings=64)


def save_tiny(path, config_cls=transformers.LlamaConfig, seed=0, dtype=torch.float32, max_shard_size=None, **kw):
    config = config_cls(**{**TINY, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model = model.to(dtype).eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def write_config(path, **raw):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path


LLAMA_RAW = dict(architectures=["LlamaForCausalLM"], **TINY)


# ---- config ----------------------------------------------------------------------------------------

def test_config_fields_per_family(tmp_path):
    for cls, arch in [(transformers.LlamaConfig, "LlamaForCausalLM"), (transformers.MistralConfig, "MistralForCausalLM"),
                      (transformers.Qwen2Config, "Qwen2ForCausalLM"), (transformers.Qwen3Config, "Qwen3ForCausalLM")]:
        cls(**TINY, head_dim=24 if cls is transformers.Qwen3Config else None).save_pretrained(tmp_path / arch)
        cfg = ModelConfig.from_pretrained(tmp_path / arch)  # no "architectures" key: from model_type
        assert cfg.architecture == arch
        assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.rope_scaling) == (2, 10000.0, None)
        assert cfg.head_dim == (24 if arch == "Qwen3ForCausalLM" else 16)
        assert cfg.qk_norm == (arch == "Qwen3ForCausalLM")
        assert (cfg.attention_bias, cfg.o_proj_bias) == ((True, False) if arch == "Qwen2ForCausalLM" else (False, False))
        assert cfg.sliding_window == (4096 if arch == "MistralForCausalLM" else None)


def test_config_legacy_and_v5_rope_layouts(tmp_path):
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    layouts = [  # transformers 5 writes rope_parameters with rope_theta inside; older files rope_scaling
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **llama3}},
        {"rope_scaling": {"rope_type": "llama3", **llama3}, "rope_theta": 5e5},
        {"rope_scaling": {"type": "llama3", **llama3}, "rope_theta": 5e5},
    ]
    for i, layout in enumerate(layouts):
        cfg = ModelConfig.from_pretrained(write_config(tmp_path / str(i), **LLAMA_RAW, **layout))
        assert cfg.rope_theta == 5e5
        assert cfg.rope_scaling == {"rope_type": "llama3", **llama3}
    cfg = ModelConfig.from_pretrained(write_config(tmp_path / "d", **LLAMA_RAW, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert cfg.rope_scaling == {"rope_type": "dynamic", "factor": 2.0} and cfg.rope_theta == 10000.0
    cfg = ModelConfig.from_pretrained(write_config(tmp_path / "n", **LLAMA_RAW, rope_scaling=None, rope_theta=1e6))
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6


def test_config_dtype_eos_and_windows(tmp_path):
    cfg = ModelConfig.from_pretrained(write_config(tmp_path / "a", **LLAMA_RAW, torch_dtype="bfloat16",
                                                   eos_token_id=[7, 9], bos_token_id=3))
    assert (cfg.dtype, cfg.eos_token_ids, cfg.bos_token_id) == (torch.bfloat16, (7, 9), 3)
    cfg = ModelConfig.from_pretrained(write_config(tmp_path / "b", **LLAMA_RAW, dtype="float16", eos_token_id=2))
    assert (cfg.dtype, cfg.eos_token_ids) == (torch.float16, (2,))
    assert ModelConfig.from_pretrained(write_config(tmp_path / "c", **LLAMA_RAW)).dtype is None
    transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6, max_window_layers=1).save_pretrained(tmp_path / "q")
    cfg = ModelConfig.from_pretrained(tmp_path / "q")
    assert cfg.sliding_window == 6 and cfg.sliding_window_layers == (False, True)
    assert [cfg.layer_sliding_window(i) for i in range(2)] == [None, 6]
    cfg = ModelConfig.from_pretrained(write_config(tmp_path / "m", **{**LLAMA_RAW, "architectures": ["MistralForCausalLM"]},
                                                   sliding_window=None, head_dim=None))
    assert cfg.sliding_window is None and cfg.head_dim == 16 and cfg.num_key_value_heads == 2


@pytest.mark.parametrize("raw, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, "
                                             r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"needs 'factor'"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3"),
    ({"dtype": "float8"}, r"dtype='float8'"),
    ({"vocab_size": None}, r"'vocab_size' is missing"),
])
def test_config_errors_name_the_value(tmp_path, raw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_pretrained(write_config(tmp_path, **{**LLAMA_RAW, **raw}))


def test_registry():
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                            "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"}
    assert all(get_model_class(a) is LlamaForCausalLM for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="'FooForCausalLM' is not supported; supported: LlamaForCausalLM"):
        get_model_class("FooForCausalLM")


# ---- rotary tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [
    None, {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "factor": 3.0},
])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_cos_sin_cache_is_transformers_bit_for_bit(scaling, head_dim):
    hf_config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=64,
                                         rope_parameters={"rope_theta": 5e5, **(scaling or {"rope_type": "default"})})
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    pos = torch.arange(64)[None]
    cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos)
    table = build_cos_sin_cache(head_dim, 64, 5e5, scaling)
    assert table.shape == (64, head_dim) and table.dtype == torch.float32
    half = head_dim // 2
    assert torch.equal(table[:, :half], cos[0, :, :half]) and torch.equal(table[:, half:], sin[0, :, :half])
    if scaling and scaling["rope_type"] == "dynamic":  # past max_position_embeddings: the base for seq_len
        pos = torch.arange(100)[None]
        cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos)
        freqs = rope.inv_freq(head_dim, 5e5, scaling, seq_len=100, max_position_embeddings=64)
        table = rope.cos_sin(pos[0], freqs)
        assert torch.equal(table[:, :half], cos[0, :, :half]) and torch.equal(table[:, half:], sin[0, :, :half])


# ---- loader ----------------------------------------------------------------------------------------

def test_load_single_and_sharded_with_dtypes(tmp_path):
    hf = save_tiny(tmp_path / "one")
    save_tiny(tmp_path / "sharded", max_shard_size="30KB")
    assert len(safetensors_files(tmp_path / "sharded")) > 2
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    for sub in ("one", "sharded"):
        model, config = load_model(tmp_path / sub)
        assert model.dtype == torch.float32 and not model.training
        assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 16)
        torch.testing.assert_close(model(ids).detach(), expected, atol=2e-5, rtol=1e-5)
    model, _ = load_model(tmp_path / "sharded", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight.bfloat16())
    save_tiny(tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_model(tmp_path / "bf16")[0].dtype == torch.bfloat16  # "auto" follows config.json
    assert load_model(tmp_path / "bf16", dtype=torch.float16)[0].dtype == torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_model(tmp_path / "one", dtype="int8")


def test_fused_layout_and_tied_embeddings(tmp_path):
    hf = save_tiny(tmp_path, transformers.Qwen2Config, tie_word_embeddings=True)
    model, _ = load_model(tmp_path)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hf_attn, hf_mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    assert torch.equal(attn.qkv_proj.weight, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))
    assert torch.equal(attn.qkv_proj.bias, torch.cat([hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias]))
    assert attn.o_proj.bias is None
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hf_state_dict_and_save_model_round_trip(tmp_path):
    hf = save_tiny(tmp_path / "src", transformers.Qwen3Config, head_dim=24)
    model, _ = load_model(tmp_path / "src")
    names = [n for n, _ in model.hf_state_dict()]
    assert sorted(names) == sorted(load_file(tmp_path / "src" / "model.safetensors"))
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    for sub, shard_bytes in (("one", 5 << 30), ("sharded", 40_000)):
        save_model(model, tmp_path / sub, max_shard_bytes=shard_bytes)
        assert (tmp_path / sub / "model.safetensors.index.json").exists() == (sub == "sharded")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub, attn_implementation="eager")
        with torch.no_grad():
            assert torch.equal(back(ids).logits, expected)
        again, _ = load_model(tmp_path / sub)
        assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    save_model(load_model(tmp_path / "src", dtype="bfloat16")[0], tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16")[0].dtype == torch.bfloat16


def test_weight_errors_name_the_tensor(tmp_path):
    save_tiny(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    config = ModelConfig.from_pretrained(tmp_path / "src")

    def load(weights):
        LlamaForCausalLM(config).load_weights(weights.items())

    load({**tensors, "model.rotary_emb.inv_freq": torch.ones(8)})  # ignored
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing.*'model.layers.1.self_attn.k_proj.weight'"):
        load({n: t for n, t in tensors.items() if n != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(ValueError, match="missing.*'lm_head.weight'"):  # untied: lm_head is required
        load({n: t for n, t in tensors.items() if n != "lm_head.weight"})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(96, 63\), expected \(96, 64\)"):
        load({**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(96, 63)})


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
        load_model(tmp_path / "empty")
    write_config(tmp_path / "noweights", **LLAMA_RAW)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json in .*noweights"):
        load_model(tmp_path / "noweights")
    save_tiny(tmp_path / "sharded", max_shard_size="30KB")
    victim = safetensors_files(tmp_path / "sharded")[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{victim.name}.* does not exist"):
        load_model(tmp_path / "sharded")


def test_progress_bar_only_for_big_checkpoints_on_a_terminal(tmp_path, monkeypatch, capsys):
    import sys

    from tidal.models import loader

    save_tiny(tmp_path)
    files = safetensors_files(tmp_path)
    capsys.readouterr()
    num_tensors = len(load_file(files[0]))
    assert len(list(iter_safetensors(files))) == num_tensors  # small checkpoint: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(loader, "_PROGRESS_MIN_BYTES", 0)  # "big" from now on
    list(iter_safetensors(files))  # stderr is not a terminal: no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    list(iter_safetensors(files))
    assert "Loading weights" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar, no error
    assert len(list(iter_safetensors(files))) == num_tensors
    assert capsys.readouterr().err == ""
