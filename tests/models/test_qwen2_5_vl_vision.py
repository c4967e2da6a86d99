"""Qwen2.5-VL's vision tower and mrope_positions (tidal.models.qwen2_5_vl_vision) against transformers'
Qwen2_5_VLForConditionalGeneration: a tiny random checkpoint, loaded as a user's loader would, CPU, fp32."""

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from tidal.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer, mrope_positions

IMG, VID, VSTART, VEND = 390, 391, 392, 393
MERGE, TOKENS_PER_SECOND = 2, 2
PATCH_NUMEL = 3 * 2 * 14 * 14
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, vision_config dict as saved, path of the safetensors file)."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=400,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        # window_size 56 = 2x2 merged cells of 2x2 patches of 14 pixels; block 1 attends whole frames
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=MERGE,
                           temporal_patch_size=2, tokens_per_second=TOKENS_PER_SECOND),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in name or "ln_q" in name:
                p.add_(1.0)
            if name.endswith("attn.qkv.weight"):
                # Large enough logits that attention is far from uniform: a wrong window, mask or
                # rotary position then moves the output by ~1e-1, not ~1e-6.
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(path)
    return model, model.config.vision_config.to_dict(), path / "model.safetensors"


def visual_weights(path):
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            for prefix in ("model.visual.", "visual."):
                if name.startswith(prefix):
                    yield name[len(prefix):], f.get_tensor(name)
                    break


@pytest.fixture(scope="module")
def tower(checkpoint):
    _, vision_config, path = checkpoint
    tower = Qwen2_5_VisionTransformer(vision_config, torch.float32, "cpu")
    tower.load_weights(visual_weights(path))
    return tower.eval()


def pixels(grids, seed=0):
    num_patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(num_patches, PATCH_NUMEL, generator=torch.Generator().manual_seed(seed))


def reference(model, pixel_values, grid_thw):
    with torch.no_grad():
        return model.model.visual(pixel_values, grid_thw=grid_thw).pooler_output


# ---- vision tower ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grids", [
    [(1, 8, 12)],  # 4x6 cells: whole 2x2-cell windows
    [(1, 10, 14)],  # 5x7 cells: partial windows on the right and bottom edges
    [(1, 8, 12), (1, 6, 10)],  # two images of different grids in one call
    [(2, 4, 6)],  # a video: two frames, each 2x3 cells
    [(2, 4, 6), (1, 10, 14)],  # a video and an image
], ids=["image", "image_partial_windows", "two_images", "video", "video_and_image"])
def test_tower_matches_transformers(checkpoint, tower, grids):
    model = checkpoint[0]
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    pixel_values = pixels(grids)
    ref = reference(model, pixel_values, grid_thw)
    with torch.no_grad():
        out = tower(pixel_values, grid_thw)
    assert out.shape == (pixel_values.shape[0] // MERGE ** 2, 64) == ref.shape
    assert out.dtype == torch.float32
    assert ref.abs().max() > 1.0
    assert (out - ref).abs().max().item() <= TOL


def test_tower_bf16_matches_transformers(checkpoint):
    """bf16 weights: rotary and norms in fp32, the rest in bf16, as transformers loads the checkpoint."""
    _, vision_config, path = checkpoint
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path.parent, dtype=torch.bfloat16)
    tower = Qwen2_5_VisionTransformer(vision_config, torch.bfloat16, "cpu")
    tower.load_weights(visual_weights(path))
    grids = [(2, 4, 6), (1, 10, 14)]
    grid_thw = torch.tensor(grids)
    pixel_values = pixels(grids, seed=3)
    ref = reference(model.eval(), pixel_values.bfloat16(), grid_thw)
    with torch.no_grad():
        out = tower(pixel_values, grid_thw)
    assert out.dtype == torch.bfloat16
    # NOTE: bitwise equal on CPU (same ops in the same order); rotary angles rounded to bf16 would
    # already be one bf16 step (0.016) off at these magnitudes.
    assert (out.float() - ref.float()).abs().max().item() == 0.0


def test_tower_items_are_independent(tower):
    grids = [(1, 8, 12), (2, 4, 6), (1, 6, 10)]
    pixel_values = pixels(grids, seed=1)
    with torch.no_grad():
        together = tower(pixel_values, torch.tensor(grids))
        alone = [tower(rows, torch.tensor([g])) for rows, g in
                 zip(pixel_values.split([t * h * w for t, h, w in grids]), grids)]
    assert (together - torch.cat(alone)).abs().max().item() <= 1e-6


def test_tower_comparison_detects_wrong_attention(checkpoint, tower, monkeypatch):
    """The tolerance above is tight enough to see a wrong window layout or rotary frequency."""
    model = checkpoint[0]
    grids = [(1, 10, 14)]
    grid_thw = torch.tensor(grids)
    pixel_values = pixels(grids, seed=2)
    ref = reference(model, pixel_values, grid_thw)
    with torch.no_grad():
        monkeypatch.setattr(tower, "fullatt_block_indexes", frozenset(range(3)))
        all_full = tower(pixel_values, grid_thw)
        monkeypatch.undo()
        monkeypatch.setattr(tower, "rope_theta", 100.0)
        other_theta = tower(pixel_values, grid_thw)
        monkeypatch.undo()
        assert (tower(pixel_values, grid_thw) - ref).abs().max().item() <= TOL
    assert (all_full - ref).abs().max().item() > 1e-2
    assert (other_theta - ref).abs().max().item() > 1e-2


def test_tower_parameter_names_are_the_checkpoint_names(checkpoint, tower):
    names = {name for name, _ in visual_weights(checkpoint[2])}
    assert {name for name, _ in tower.named_parameters()} == names
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.norm1.weight", "merger.ln_q.weight",
            "merger.mlp.0.weight", "merger.mlp.2.bias"} <= names


def test_load_weights_errors(checkpoint):
    _, vision_config, path = checkpoint
    weights = dict(visual_weights(path))
    fresh = Qwen2_5_VisionTransformer(vision_config, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"unexpected tensor 'blocks\.9\.attn\.qkv\.weight'"):
        fresh.load_weights([*weights.items(), ("blocks.9.attn.qkv.weight", torch.zeros(96, 32))])
    with pytest.raises(ValueError, match=r"'merger\.mlp\.2\.bias'.*shape \(63,\), expected \(64,\)"):
        fresh.load_weights([*weights.items(), ("merger.mlp.2.bias", torch.zeros(63))])
    with pytest.raises(ValueError, match=r"1 tensor\(s\).*missing: 'blocks\.2\.norm2\.weight'"):
        fresh.load_weights((name, t) for name, t in weights.items() if name != "blocks.2.norm2.weight")
    with pytest.raises(ValueError, match=r"unexpected tensor 'visual\.blocks\.0\."):
        fresh.load_weights([("visual." + name, t) for name, t in weights.items()])


def test_config_spellings_of_released_checkpoints():
    # Qwen's own config.json says in_chans and has no rope parameters.
    cfg = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, in_chans=3,
               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
               fullatt_block_indexes=[0], hidden_act="silu", tokens_per_second=2)
    tower = Qwen2_5_VisionTransformer(cfg, torch.float32, "cpu")
    assert tower.patch_embed.proj.weight.shape == (32, 3, 2, 14, 14)
    assert (tower.rope_theta, tower.cells_per_window) == (10000.0, 4)
    with pytest.raises(ValueError, match="hidden_act='relu6'"):
        Qwen2_5_VisionTransformer({**cfg, "hidden_act": "relu6"}, torch.float32, "cpu")
    with pytest.raises(ValueError, match="hidden_size=30"):
        Qwen2_5_VisionTransformer({**cfg, "hidden_size": 30}, torch.float32, "cpu")


def test_tower_rejects_bad_inputs(tower):
    with pytest.raises(ValueError, match=r"pixel_values has shape \(95, 1176\).*\(96, 1176\)"):
        tower(pixels([(1, 8, 12)])[:95], torch.tensor([[1, 8, 12]]))
    with pytest.raises(ValueError, match=r"grid_thw row \(1, 7, 12\)"):
        tower(torch.zeros(84, PATCH_NUMEL), torch.tensor([[1, 7, 12]]))
    with pytest.raises(ValueError, match="grid_thw must be"):
        tower(torch.zeros(96, PATCH_NUMEL), torch.tensor([1, 8, 12]))


# ---- mrope_positions ---------------------------------------------------------------------------------

def prompt(*parts):
    """Token ids: an int n is n text tokens; ("image" | "video", (t, h, w)) an item with its pads."""
    ids, text = [], 10
    for part in parts:
        if isinstance(part, int):
            ids += range(text, text + part)
            text += part
        else:
            kind, (t, h, w) = part
            ids += [VSTART] + [IMG if kind == "image" else VID] * (t * h * w // MERGE ** 2) + [VEND]
    return ids


def ours(ids, images=None, videos=None, seconds=None):
    return mrope_positions(ids, images, videos, seconds, image_token_id=IMG, video_token_id=VID,
                           vision_start_token_id=VSTART, spatial_merge_size=MERGE,
                           tokens_per_second=TOKENS_PER_SECOND)


def transformers_rope_index(model, ids, images, videos, seconds):
    input_ids = torch.tensor([ids])
    token_types = (input_ids == IMG).int() + 2 * (input_ids == VID).int()
    positions, deltas = model.model.get_rope_index(
        input_ids, token_types, image_grid_thw=None if images is None else torch.tensor(images),
        video_grid_thw=None if videos is None else torch.tensor(videos),
        second_per_grid_ts=None if seconds is None else torch.tensor(seconds, dtype=torch.float32))
    return positions[:, 0].numpy(), int(deltas.item())


MROPE_CASES = {
    "one_image": (prompt(3, ("image", (1, 8, 12)), 4), [(1, 8, 12)], None, None),
    "images_of_different_grids": (prompt(3, ("image", (1, 8, 12)), 2, ("image", (1, 6, 10)), ("image", (1, 4, 4)), 5),
                                  [(1, 8, 12), (1, 6, 10), (1, 4, 4)], None, None),
    "video": (prompt(3, ("video", (2, 4, 6)), 4), None, [(2, 4, 6)], [1.0]),
    # 0.35 s * 2 tokens/s = 0.7 per grid step: temporal 0, 0.7, 1.4, 2.1 truncate to 0, 0, 1, 2
    "video_fractional_step": (prompt(2, ("video", (4, 4, 6)), 3), None, [(4, 4, 6)], [0.35]),
    "image_and_video": (prompt(2, ("image", (1, 8, 12)), 1, ("video", (2, 4, 6)), 3, ("image", (1, 4, 6)), 1),
                        [(1, 8, 12), (1, 4, 6)], [(2, 4, 6)], [1.0]),
    "text_only": (prompt(7), None, None, None),
}


@pytest.mark.parametrize("case", list(MROPE_CASES))
def test_mrope_positions_match_transformers(checkpoint, case):
    ids, images, videos, seconds = MROPE_CASES[case]
    positions, delta = ours(ids, images, videos, seconds)
    ref_positions, ref_delta = transformers_rope_index(checkpoint[0], ids, images, videos, seconds)
    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    np.testing.assert_array_equal(positions, ref_positions)
    assert delta == ref_delta
    # decode token i continues at i + delta on all three axes, one past the prompt's largest position
    assert len(ids) + delta == positions.max() + 1


def test_mrope_positions_text_after_a_long_video_continues_past_its_temporal_positions():
    # 2 s * 2 tokens/s: temporal positions 0 and 4, past the 2x3 grid's rows and columns.
    # NOTE: transformers 5.25 continues this text from start + max(rows, cols) (7, below the video's
    # temporal 8) and its delta is -9; Qwen's release code (transformers <= 5.2) and vLLM continue
    # from the largest position + 1, as here.
    ids = prompt(3, ("video", (2, 4, 6)), 4)
    positions, delta = ours(ids, None, [(2, 4, 6)], [2.0])
    t, h, w = np.meshgrid([0, 4], [0, 1], [0, 1, 2], indexing="ij")
    video = np.stack([t, h, w]).reshape(3, -1) + 4
    expected = np.concatenate([np.tile(np.arange(4), (3, 1)), video, np.tile(np.arange(9, 14), (3, 1))], axis=1)
    np.testing.assert_array_equal(positions, expected)
    assert delta == 14 - len(ids) == -7


def test_mrope_positions_errors():
    ids = prompt(3, ("image", (1, 8, 12)), 4)
    with pytest.raises(ValueError, match=r"image_grid_thw has 2 row\(s\) but input_ids hold 1"):
        ours(ids, [(1, 8, 12), (1, 4, 4)])
    with pytest.raises(ValueError, match="more images than the 0 image_grid_thw"):
        ours(ids, None)
    with pytest.raises(ValueError, match=r"fewer than the 24 image tokens"):
        ours(ids[:10] + ids[-5:], [(1, 8, 12)])
    with pytest.raises(ValueError, match=r"image token 390 at input_ids\[28\] is not preceded by vision_start"):
        ours(ids[:28] + [IMG] + ids[28:], [(1, 8, 12)])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 values for 1 video"):
        ours(prompt(("video", (2, 4, 6))), None, [(2, 4, 6)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"image_grid_thw=\[\[1, 5, 4\]\]"):
        ours(ids, [(1, 5, 4)])
