"""``tidal quantize``: GPTQ and AWQ calibration, then the published layouts. Calibrated on real text,
each method's end-to-end logits error on held-out text against the float model is compared with
rounding to nearest at the same group size (GPTQ must beat it, AWQ must not lose to it); every written
checkpoint serves through tidal.LLM with the model's tokenizer, through the command line too; where
transformers has the method's loader installed, it loads the checkpoint to tidal's logits."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import tidal
from tidal.cli import main
from tidal.models import load_model
from tidal.quant.command import quantize
from tiny_models import assert_pool_whole, build_model

ROOT = Path(__file__).resolve().parents[2]
CALIB = (ROOT / "python" / "tidal" / "serve" / "engine.py").read_text()
HELD_OUT = (ROOT / "python" / "tidal" / "models" / "llama.py").read_text()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    # equal query and KV heads: AWQ also scales v_proj -> o_proj
    build_model(str(path), "llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                num_key_value_heads=4)
    (path / "calib.txt").write_text(CALIB)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def held_out_ids(model_dir):
    from tidal.tokenizer import Tokenizer

    tok = Tokenizer(str(model_dir))
    return torch.tensor(tok.encode(HELD_OUT)[:4 * 64]).reshape(4, 64)


@pytest.fixture(scope="module")
def errors(model_dir, tmp_path_factory):
    """Mean squared logits error against the float model, per method, on held-out text."""
    ids = held_out_ids(model_dir)
    reference = logits(load_model(model_dir)[0], ids)
    out = {}
    for method in ("gptq", "awq", "gptq act-order"):
        target = tmp_path_factory.mktemp(method.replace(" ", "_"))
        quantize(str(model_dir), method.split()[0], str(target), calib=str(model_dir / "calib.txt"), group_size=32,
                 num_samples=16, seq_len=64, device="cpu", progress=False, act_order=method.endswith("act-order"))
        out[method] = (target, (logits(load_model(target)[0], ids) - reference).pow(2).mean().item())
    rtn = tmp_path_factory.mktemp("rtn")
    from tidal.quant import QuantConfig, quantize_model_, save_quantized_model

    model, _ = load_model(model_dir)
    quantize_model_(model, QuantConfig("int4", 32))
    save_quantized_model(model, rtn, QuantConfig("int4", 32, "awq"))
    out["rtn"] = (rtn, (logits(load_model(rtn)[0], ids) - reference).pow(2).mean().item())
    return out


def test_gptq_beats_round_to_nearest(errors):
    assert errors["gptq"][1] < 0.9 * errors["rtn"][1], {k: v[1] for k, v in errors.items()}
    assert errors["gptq act-order"][1] < 0.9 * errors["rtn"][1], {k: v[1] for k, v in errors.items()}


def test_act_order_checkpoint_round_trips(errors, tmp_path):
    """The act-order checkpoint loads to layers whose inputs are gathered into group order, and
    writing it again gives the same tensors."""
    from safetensors.torch import load_file

    from tidal.quant import QuantConfig, save_quantized_model

    path = errors["gptq act-order"][0]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True
    model, _ = load_model(path)
    assert model.model.layers[0].mlp.down_proj.input_perm is not None
    save_quantized_model(model, tmp_path, QuantConfig("int4", 32, "gptq", gptq_zero_offset=1, act_order=True))
    first, again = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_awq_does_not_lose_to_round_to_nearest(errors):
    assert errors["awq"][1] <= 1.02 * errors["rtn"][1], {k: v[1] for k, v in errors.items()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_checkpoints_serve(errors, model_dir, method):
    path, _ = errors[method]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == method and config["group_size"] == 32
    assert (path / "tokenizer.json").is_file()
    llm = tidal.LLM(str(path), num_kv_blocks=64, block_size=4)
    text = llm.generate(["def step(self):"], tidal.SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert len(text[0].outputs[0].token_ids) == 6
    assert_pool_whole(llm)


@pytest.mark.parametrize("method", ["gptq", "awq", "int8", "fp8"])
def test_transformers_loads_what_tidal_writes(errors, model_dir, method, tmp_path):
    needed = {"gptq": ("optimum", "gptqmodel"), "awq": ("awq",), "int8": ("compressed_tensors",),
              "fp8": ("compressed_tensors",)}[method]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers' {method} loader needs {', '.join(missing)}")
    import transformers

    if method in ("gptq", "awq"):
        path = errors[method][0]
    else:
        path = tmp_path / method
        quantize(str(model_dir), method, str(path), device="cpu", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = held_out_ids(model_dir)[:1, :16]
    with torch.no_grad():
        want = hf(ids).logits.float()
    got = logits(load_model(path)[0], ids)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_command_line(model_dir, tmp_path, capsys):
    assert main(["quantize", str(model_dir), "--method", "int8", "--out", str(tmp_path / "q")]) == 0
    assert "int8 (compressed-tensors)" in capsys.readouterr().out
    assert main(["eval-ppl", str(tmp_path / "q"), "--file", str(model_dir / "calib.txt"), "--context", "64"]) == 0
    assert "perplexity:" in capsys.readouterr().out
    assert main(["generate", str(model_dir), "--prompt", "def", "--max-tokens", "3", "--temperature", "0",
                 "--quantization", "int4"]) == 0
    capsys.readouterr()
    # a quantized checkpoint is not quantized again; bad sizes name the option
    assert main(["quantize", str(tmp_path / "q"), "--method", "gptq", "--out", str(tmp_path / "qq")]) == 1
    assert "quantized already" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--method", "awq", "--out", str(tmp_path / "x"),
                 "--num-samples", "0"]) == 1
    assert "--num-samples=0" in capsys.readouterr().err
