"""Vision-language config.json files: the language model's fields read from text_config (or
Qwen2.5-VL's older top-level layout), multimodal rotary sections in every RoPE layout, and errors
that name the bad value."""

import copy

import pytest

from tidal.models import ModelConfig

LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "image_size": 28, "patch_size": 14,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "text_config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 96, "vocab_size": 32064},
    "dtype": "bfloat16",
}
QWEN_VL_LEGACY = {  # transformers < 5: the language model's keys at the top level
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
    "vocab_size": 400, "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {"depth": 2, "hidden_size": 32}, "image_token_id": 390, "video_token_id": 391,
    "vision_start_token_id": 392,
}


def test_llava_reads_its_text_config():
    c = ModelConfig.from_dict(copy.deepcopy(LLAVA))
    assert c.multimodal_architecture == "LlavaForConditionalGeneration"
    assert c.architecture == "LlamaForCausalLM" and c.vocab_size == 32064 and c.hidden_size == 64
    assert c.mrope_section is None and c.hf_config["image_token_index"] == 32000
    assert str(c.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 1e6},
    {"rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]}, "rope_theta": 1e6},
    {"rope_parameters": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
])
def test_qwen2_5_vl_rope_layouts(rope):
    raw = {k: v for k, v in QWEN_VL_LEGACY.items() if k not in ("rope_scaling", "rope_theta")}
    c = ModelConfig.from_dict({**raw, **rope})
    assert c.architecture == "Qwen2ForCausalLM" and c.multimodal_architecture == "Qwen2_5_VLForConditionalGeneration"
    assert c.mrope_section == (2, 3, 3) and c.rope_scaling is None and c.rope_theta == 1e6
    assert c.attention_bias and not c.o_proj_bias  # Qwen2's projections


def test_qwen2_5_vl_text_config_layout():
    text = {k: QWEN_VL_LEGACY[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size")}
    text["rope_parameters"] = {"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default", "rope_theta": 5.0}
    raw = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "text_config": text,
           "vision_config": {"depth": 1}, "image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 3}
    c = ModelConfig.from_dict(raw)
    assert c.rope_theta == 5.0 and c.vocab_size == 400 and c.max_position_embeddings == 128000


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("vision_config"), "needs a 'vision_config'"),
    (lambda r: r["text_config"].update(model_type="mixtral"), "model_type='mixtral' is not a supported LLaVA"),
    (lambda r: r["text_config"].update(model_type="gpt2"), "model_type='gpt2'"),
])
def test_llava_config_errors(edit, match):
    raw = copy.deepcopy(LLAVA)
    edit(raw)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("rope, match", [
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 2]}}, r"mrope_section=\[2, 3, 2\] must sum to"),
    ({"rope_scaling": {"type": "mrope"}}, "needs 'mrope_section'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "mrope_section": [2, 3, 3]}}, "mrope_section with"),
    ({"rope_scaling": None}, "needs rope_scaling"),
])
def test_qwen2_5_vl_rope_errors(rope, match):
    raw = {**QWEN_VL_LEGACY, **rope}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw)
