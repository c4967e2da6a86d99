"""Quantized serving end to end: tidal.LLM(quantization=...) on a float checkpoint gives transformers'
greedy tokens for the same model with its weights replaced by the dequantized codes (fp32, the
quantization being the only change); checkpoints written in the published GPTQ, AWQ and
compressed-tensors layouts load back to the very same codes and tokens; the layouts' bit packing
against hand-made words; unsupported settings are errors that name them. The KV pool is whole after
every scenario; on a GPU the same, through the decode kernel and CUDA graphs."""

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

import tidal
from conftest import DEVICES
from tidal.models import llama, load_model, save_model
from tidal.quant import QuantConfig, QuantLinear, save_quantized_model
from tidal.quant.formats import _pack_int32, _unpack_int32, quantization_config, read_tensors, write_tensors
from tiny_models import assert_pool_whole, build_model, hf_greedy

FORMATS = ["int8", "int4", "fp8"]
# (how tidal.LLM is told, the published layout)
LAYOUTS = [("int4", QuantConfig("int4", 64, "gptq", gptq_zero_offset=1)),
           ("int4", QuantConfig("int4", 64, "gptq", gptq_zero_offset=0)),
           ("int4", QuantConfig("int4", 64, "awq")),
           ("int8", QuantConfig("int8", None, "compressed-tensors")),
           ("fp8", QuantConfig("fp8", None, "compressed-tensors"))]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    build_model(path, request.param, hidden_size=128, intermediate_size=256)
    return path


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(n)] for n in lengths]


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantized_reference(path, quantized, out_dir):
    """transformers' model of the float checkpoint ``path`` with the weight of every projection that
    ``quantized`` (a tidal model) holds quantized replaced by what its codes mean."""
    reference, _ = load_model(path)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            modules[name].weight.copy_(layer.dequantized_weight())
    save_model(reference, out_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("skinny", [False, True], ids=["unfused", "skinny"])
def test_greedy_equals_transformers_on_the_dequantized_weights(model_dir, fmt, device, skinny, tmp_path,
                                                               monkeypatch):
    """skinny (GPU): decode steps of up to 4 tokens through ops.skinny_linear over the codes (norms,
    activation and residual adds fused in; on sm_90 the codes streamed by bulk copies)."""
    if skinny:
        if device != "cuda":
            pytest.skip("the fused decode path runs on a GPU")
        monkeypatch.setattr(tidal.quant.linear, "SKINNY_DECODE", (fmt,))
    else:
        monkeypatch.setattr(tidal.quant.linear, "SKINNY_DECODE", ())
        monkeypatch.setattr(llama, "SKINNY_MAX_TOKENS", 4)
    hf = dequantized_reference(model_dir, load_model(model_dir, quantization=fmt)[0], str(tmp_path / "ref"))
    batch = prompts([3, 5, 8, 13, 21])
    expected = [hf_greedy(hf, p, 10) for p in batch]
    # NOTE(tests): a step of at most 8 tokens keeps FP8 on its weight-only path (activations are
    # quantized past 8 rows, which the reference does not model); int8 and int4 take the dense path
    # too: prompts of 13 and 21 tokens chunk into 8-token steps, several prompts share a step.
    llm = tidal.LLM(model_dir, device=device, quantization=fmt, block_size=4, num_kv_blocks=96, max_num_seqs=4,
                    max_num_batched_tokens=8 if fmt == "fp8" else 32)
    outputs = llm.generate(batch, tidal.SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    layers = quantized_layers(llm.engine.model)
    assert len(layers) == 4 * 2 and all(layer.format == fmt for layer in layers.values())
    assert [layer.skinny_ok for layer in llm.engine.model.model.layers] == [skinny] * 2
    assert_pool_whole(llm)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_fp8_quant_gives_the_same_tokens(model_dir, device, monkeypatch):
    """llama.FUSED_FP8_QUANT: the norms before the W8A8 qkv and gate_up projections and the activation
    before down_proj write FP8 codes themselves (ops.quant.fused_add_rms_norm_quant_fp8_,
    ops.quant.silu_and_mul_quant_fp8_) in steps of more than 8 rows, where FP8 quantizes activations;
    the same greedy tokens as those kernels and the quantizer apart."""
    calls = {"fused_add_rms_norm_quant_fp8_": [], "silu_and_mul_quant_fp8_": []}
    for name, seen in calls.items():
        def counted(x, *args, _real=getattr(tidal.ops.quant, name), _seen=seen):
            _seen.append(x.shape[0])
            return _real(x, *args)
        monkeypatch.setattr(tidal.ops.quant, name, counted)
    batch, tokens = prompts([13, 21, 9, 30], seed=3), {}
    for fused in (False, True):
        monkeypatch.setattr(llama, "FUSED_FP8_QUANT", fused)
        llm = tidal.LLM(model_dir, device=device, quantization="fp8", block_size=4, num_kv_blocks=96, max_num_seqs=4,
                        max_num_batched_tokens=32)
        outputs = llm.generate(batch, tidal.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        tokens[fused] = [o.outputs[0].token_ids for o in outputs]
        assert_pool_whole(llm)
        assert all(bool(seen) == fused for seen in calls.values())
    assert tokens[True] == tokens[False]
    # in the prompt steps: two norms a layer after the first layer's input norm (which adds nothing),
    # and one activation a layer (the model has two)
    norms, acts = calls.values()
    assert all(n > 8 for n in norms + acts) and len(norms) % 3 == 0 and len(acts) == 2 * len(norms) // 3


def test_int4_layers_use_groups_of_128_by_default(model_dir):
    model, _ = load_model(model_dir, quantization="int4")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.scales.shape == (128, 256 // 128)
    assert model.lm_head.weight.dtype == torch.float32  # the head and embeddings stay float


@pytest.mark.parametrize("fmt,config", LAYOUTS, ids=["gptq", "gptq_v2", "awq", "ct-int8", "ct-fp8"])
def test_published_layouts_load_back_to_the_same_codes(model_dir, fmt, config, tmp_path):
    rtn_config = QuantConfig(fmt, config.group_size)
    from tidal.quant import quantize_model_

    source, _ = load_model(model_dir)
    quantize_model_(source, rtn_config)
    save_quantized_model(source, tmp_path, config)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == ("compressed-tensors" if config.source == "compressed-tensors" else config.source)
    loaded, _ = load_model(tmp_path)
    want, got = quantized_layers(source), quantized_layers(loaded)
    assert want.keys() == got.keys()
    for name in want:
        for tensor in ("qweight", "scales", "zeros"):
            a, b = getattr(want[name], tensor), getattr(got[name], tensor)
            if tensor == "scales" and config.source in ("gptq", "awq"):
                a = a.half().float()  # these layouts store fp16 scales
            assert (a is None and b is None) or torch.equal(a, b), (name, tensor)
    batch = prompts([4, 9, 17], seed=1)
    params = tidal.SamplingParams(temperature=0.0, max_tokens=8)
    llm = tidal.LLM(str(tmp_path), tokenizer=model_dir, block_size=4, num_kv_blocks=64)
    # the same codes quantized as they load (int4's fp16 scales and groups of 64 are the layouts' own)
    reference = None if fmt == "int4" else tidal.LLM(model_dir, quantization=fmt, block_size=4, num_kv_blocks=64)
    outputs = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    if reference is not None:
        assert outputs == [o.outputs[0].token_ids for o in reference.generate(batch, params, use_tqdm=False)]
        assert_pool_whole(reference)
    assert_pool_whole(llm)


def test_gptq_packing_against_hand_made_words():
    codes = torch.arange(8, dtype=torch.uint8).reshape(8, 1)  # inputs 0..7 of one output
    assert _pack_int32(codes, 0).item() == 0x76543210
    zeros = torch.arange(8, dtype=torch.uint8).reshape(1, 8)  # outputs 0..7 of one group
    assert _pack_int32(zeros, 1).item() == 0x76543210
    assert torch.equal(_unpack_int32(torch.tensor([[0x76543210]], dtype=torch.int32), 0), codes)
    config = QuantConfig("int4", None, "gptq", gptq_zero_offset=1)
    # GPTQ's original layout stores zero points minus one: a stored 0 means 1, a stored 15 means 0
    stored = {"l.qzeros": torch.tensor([[0x0000000F]], dtype=torch.int32),
              "l.qweight": torch.tensor([[0x76543210]] * 2, dtype=torch.int32).reshape(2, 1).repeat(1, 8),
              "l.scales": torch.ones(1, 8, dtype=torch.float16)}
    out = dict(read_tensors(iter(stored.items()), config))
    assert out["l.zeros"][:, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert out["l.qweight"].shape == (8, 8) and out["l.scales"].dtype == torch.float32


def test_awq_packing_against_hand_made_words():
    # AWQ packs outputs 0, 2, 4, 6, 1, 3, 5, 7 into nibbles 0..7: outputs with codes 0..7 give 0x75316420
    config = QuantConfig("int4", None, "awq")
    codes = torch.arange(8, dtype=torch.uint8).reshape(8, 1).repeat(1, 16)  # [n=8, k=16] code j in row j
    scales, zeros = torch.ones(8, 1), torch.arange(8, dtype=torch.uint8).reshape(8, 1)
    written = write_tensors("l", codes, scales, zeros, config)
    assert written["l.qweight"].shape == (16, 1) and (written["l.qweight"] == 0x75316420).all()
    assert written["l.qzeros"].item() == 0x75316420
    back = dict(read_tensors(iter(written.items()), config))
    assert torch.equal(back["l.zeros"], zeros)


@pytest.mark.parametrize("raw,match", [
    ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True}, "desc_act=True"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "format='marlin-24'"),
])
def test_unsupported_checkpoint_settings_are_named(model_dir, tmp_path, raw, match):
    import shutil

    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": raw}))
    with pytest.raises(ValueError, match=match):
        tidal.LLM(str(tmp_path))


def test_bad_quantization_arguments(model_dir, tmp_path):
    with pytest.raises(ValueError, match="quantization='int3'"):
        tidal.LLM(model_dir, quantization="int3")
    with pytest.raises(ValueError, match="quantization='gptq' needs a checkpoint in that layout"):
        tidal.LLM(model_dir, quantization="gptq")
    source, _ = load_model(model_dir, quantization="int4")
    save_quantized_model(source, tmp_path, QuantConfig("int4", 128, "gptq", gptq_zero_offset=1))
    with pytest.raises(ValueError, match="quantization='fp8' disagrees with the checkpoint"):
        tidal.LLM(str(tmp_path), tokenizer=model_dir, quantization="fp8")
    build_model(str(tmp_path / "odd"), "llama", hidden_size=96, intermediate_size=160)
    with pytest.raises(ValueError, match="group_size=128"):
        tidal.LLM(str(tmp_path / "odd"), quantization="int4")


def test_static_fp8_activation_scales(model_dir, tmp_path):
    """A compressed-tensors FP8 checkpoint with static activation scales: each fused layer takes the
    largest of its parts' scales, and past the decode kernel's rows the activations are quantized with
    it (the layer's output equals that arithmetic done in fp32)."""
    from safetensors.torch import load_file, save_file

    from tidal.quant import quantize_model_

    source, _ = load_model(model_dir)
    quantize_model_(source, QuantConfig("fp8"))
    save_quantized_model(source, tmp_path, QuantConfig("fp8", None, "compressed-tensors"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    scales = {}
    for i, name in enumerate(sorted(n for n in tensors if n.endswith(".weight_scale"))):
        prefix = name[:-len(".weight_scale")]
        scales[prefix] = torch.tensor([0.01 + 0.001 * i])
        tensors[f"{prefix}.input_scale"] = scales[prefix]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path)
    qkv = loaded.model.layers[0].self_attn.qkv_proj
    parts = [scales[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    assert torch.equal(qkv.input_scale, torch.stack(parts).max().reshape(1))
    x = torch.randn(12, qkv.in_features)
    codes = (x / qkv.input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * qkv.input_scale
    want = codes @ qkv.dequantized_weight().t()
    torch.testing.assert_close(qkv(x), want, atol=1e-4, rtol=1e-4)


def write_act_order_gptq(model_dir, path, group=32, seed=0):
    """A GPTQ desc_act checkpoint made by hand from the float model: each fused layer's input gets a
    random order, groups are runs of that order, the codes are stored in the model's input order with
    g_idx saying each input's group. Returns {layer prefix: dequantized weight}."""
    from safetensors.torch import save_file

    from tidal.quant.linear import int4_scales_zeros, quantize_int4

    model, _ = load_model(model_dir)
    state = {name: t.clone() for name, t in model.hf_state_dict()}
    gen = torch.Generator().manual_seed(seed)
    tensors, weights, config = {}, {}, QuantConfig("int4", group, "gptq", gptq_zero_offset=1)
    perms = {}
    for name, w in state.items():
        prefix, _, suffix = name.rpartition(".")
        projection = prefix.rsplit(".", 1)[-1]
        if suffix != "weight" or projection not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"):
            tensors[name] = w
            continue
        shared = prefix.rsplit(".", 1)[0] + {"q_proj": ".qkv", "k_proj": ".qkv", "v_proj": ".qkv",
                                             "gate_proj": ".gu", "up_proj": ".gu"}.get(projection, "." + projection)
        perm = perms.setdefault(shared, torch.randperm(w.shape[1], generator=gen))
        scales, zeros = int4_scales_zeros(w[:, perm], group)
        scales = scales.half().float()
        codes = quantize_int4(w[:, perm], scales, zeros)[:, torch.argsort(perm)]  # back in input order
        g_idx = torch.argsort(perm) // group  # input i sits at position argsort(perm)[i] of the order
        tensors.update(write_tensors(prefix, codes, scales, zeros, config))
        tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        weights[prefix] = (codes.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw["quantization_config"] = {**quantization_config(config), "desc_act": True}
    (path / "config.json").write_text(json.dumps(raw))
    return weights


def test_act_order_gptq(model_dir, tmp_path):
    """GPTQ with desc_act: the codes reordered at load, x gathered to match; the layers' weights equal
    the checkpoint's by definition, and greedy tokens equal transformers' on those weights."""
    weights = write_act_order_gptq(model_dir, tmp_path)
    loaded, _ = load_model(tmp_path)
    modules = {name: m for name, m in loaded.named_modules()}
    for layer in range(2):
        attn = modules[f"model.layers.{layer}.self_attn.qkv_proj"]
        assert attn.input_perm is not None
        want = torch.cat([weights[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"])
        torch.testing.assert_close(attn.dequantized_weight(), want, atol=0, rtol=0)
        down = modules[f"model.layers.{layer}.mlp.down_proj"]
        torch.testing.assert_close(down.dequantized_weight(), weights[f"model.layers.{layer}.mlp.down_proj"],
                                   atol=0, rtol=0)
    hf = dequantized_reference(model_dir, loaded, str(tmp_path / "ref"))
    batch = prompts([5, 12, 19], seed=3)
    llm = tidal.LLM(str(tmp_path), tokenizer=model_dir, block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    outputs = llm.generate(batch, tidal.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, 8) for p in batch]
    assert_pool_whole(llm)
    # written back: the very tensors it was read from
    from safetensors.torch import load_file

    save_quantized_model(loaded, tmp_path / "again",
                         QuantConfig("int4", 32, "gptq", gptq_zero_offset=1, act_order=True))
    first, again = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def pack_int32_columns(values: torch.Tensor, dim: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 from its definition: eight 4-bit values a word along ``dim``,
    value 8c + b of that dimension in bits 4b of word c."""
    v = values.to(torch.int64)
    v = v.reshape(v.shape[0], -1, 8) if dim == 1 else v.t().reshape(v.shape[1], -1, 8)
    words = sum(v[..., b] << (4 * b) for b in range(8))
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_compressed_tensors_pack_quantized(model_dir, tmp_path, symmetric):
    """W4A16 pack-quantized checkpoints (groups of 32): the layers' weights equal the checkpoint's by
    the format's definition, and greedy tokens equal transformers' on those weights."""
    from safetensors.torch import save_file

    from tidal.quant.linear import int4_scales_zeros, quantize_int4

    model, _ = load_model(model_dir)
    tensors, weights = {}, {}
    for name, w in ((n, t.clone()) for n, t in model.hf_state_dict()):
        prefix, _, suffix = name.rpartition(".")
        if suffix != "weight" or not prefix.endswith("_proj"):
            tensors[name] = w
            continue
        scales, zeros = int4_scales_zeros(w, 32)
        if symmetric:
            scales = (w.reshape(w.shape[0], -1, 32).abs().amax(-1) / 7).clamp(min=1e-8)
            zeros = torch.full_like(zeros, 8)
        codes = quantize_int4(w, scales, zeros)  # unsigned: the stored signed value + 8
        tensors[f"{prefix}.weight_packed"] = pack_int32_columns(codes, 1)
        tensors[f"{prefix}.weight_scale"] = scales.to(torch.bfloat16)
        tensors[f"{prefix}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
        if not symmetric:
            tensors[f"{prefix}.weight_zero_point"] = pack_int32_columns(zeros, 0)
        s = scales.to(torch.bfloat16).float()
        weights[prefix] = ((codes.float().reshape(w.shape[0], -1, 32) - zeros.float()[..., None]) * s[..., None]
                           ).reshape(w.shape)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": symmetric,
            "dynamic": False, "actorder": None}}}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded, _ = load_model(tmp_path)
    modules = dict(loaded.named_modules())
    qkv = modules["model.layers.1.self_attn.qkv_proj"]
    want = torch.cat([weights[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv"])
    torch.testing.assert_close(qkv.dequantized_weight(), want, atol=0, rtol=0)
    torch.testing.assert_close(modules["model.layers.0.mlp.down_proj"].dequantized_weight(),
                               weights["model.layers.0.mlp.down_proj"], atol=0, rtol=0)
    hf = dequantized_reference(model_dir, loaded, str(tmp_path / "ref"))
    batch = prompts([6, 13], seed=4)
    llm = tidal.LLM(str(tmp_path), tokenizer=model_dir, block_size=4, num_kv_blocks=64)
    outputs = llm.generate(batch, tidal.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, 8) for p in batch]
    assert_pool_whole(llm)
