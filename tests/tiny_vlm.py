"""Tiny random vision-language checkpoints for tests: LLaVA-1.5 (CLIP tower) and Qwen2.5-VL, built
with transformers, saved with a tokenizer that knows their placeholder tokens, a chat template that
renders image parts, and the image processor's preprocessor_config.json."""

import json
import os

import numpy as np
import torch
import transformers
from PIL import Image

from tiny_models import BOS, EOS, VOCAB_SIZE, build_tokenizer

# LLaVA: "<image>" is id 2. Qwen2.5-VL: vision start/end and the image/video pads are ids 2-5.
LLAVA_IMAGE = 2
QWEN_START, QWEN_END, QWEN_IMAGE, QWEN_VIDEO = 2, 3, 4, 5

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'text' %}{{ p.text }}{% elif p.type == 'image' %}IMAGE{% elif p.type == 'video' %}VIDEO"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():  # spread the logits so greedy paths depend on the image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.eval()


def _save_tokenizer(path: str, special: tuple[str, ...], image_text: str, video_text: str | None) -> None:
    build_tokenizer(path, special)
    template = CHAT_TEMPLATE.replace("IMAGE", image_text).replace("VIDEO", video_text or "")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
                   "chat_template": template}, f)


def build_llava(path: str, seed: int = 0, image_size: int = 56, strategy: str = "default", tower: str = "clip",
                feature_layer: int | list[int] = -2):
    """LLaVA with a 3-layer CLIP (or SigLIP) tower over 56x56 images (16 patches: 16 placeholder
    rows, CLIP under the "default" strategy dropping its class token) and a 2-layer Llama; returns
    the transformers model."""
    vision_config = transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig
    vision = vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=96, vocab_size=VOCAB_SIZE, max_position_embeddings=128,
                                    bos_token_id=BOS, eos_token_id=EOS, rms_norm_eps=1e-6)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE,
                                      vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer)
    model = transformers.LlavaForConditionalGeneration(config)
    _randomize(model, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    _save_tokenizer(path, ("<image>",), "<image>", None)
    # transformers 5 names its Pillow processors ...Pil; before 5 the plain names were the Pillow ones
    if tower == "clip":
        getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    else:
        getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)(
            size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def build_qwen2_5_vl(path: str, seed: int = 0):
    """Qwen2.5-VL with a 3-block vision tower (block 1 full attention, the others in 2x2-cell
    windows) and a 2-layer Qwen2 language model; images between 56 and 224 pixels a side keep their
    native resolution (rounded to multiples of 28)."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=BOS,
                         eos_token_id=EOS, rms_norm_eps=1e-6),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, tokens_per_second=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, bos_token_id=BOS, eos_token_id=EOS)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    _randomize(model, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    _save_tokenizer(path, ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                          temporal_patch_size=2).save_pretrained(path)
    return model


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def random_frames(count: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def hf_generate(model, input_ids: list[int], max_new_tokens: int, **inputs) -> list[int]:
    """transformers' greedy generate with the given vision inputs; new tokens only."""
    ids = torch.tensor([input_ids])
    if isinstance(model, transformers.Qwen2_5_VLForConditionalGeneration):  # what its processor adds
        inputs["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    config = model.generation_config
    config.eos_token_id, config.pad_token_id, config.do_sample = EOS, EOS, False
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             generation_config=config, **inputs)
    return out[0, len(input_ids):].tolist()
