"""tidal.multimodal.processing: pixel tensors equal transformers' Pillow processors (CLIP, SigLIP,
Qwen2-VL) for images of odd sizes and modes given as PIL images, arrays and encoded bytes; Qwen2-VL
grids and token counts; video decoding at a sampling rate, video patches built from the same
per-frame math; content hashes; and ValueErrors that name the argument."""

import io
import json

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")  # Pillow: a dependency, absent where tidal came in --no-deps
from tidal.multimodal import (CLIPImageProcessor, ImageProcessor, Qwen2VLImageProcessor,  # noqa: E402
                              SiglipImageProcessor, content_hash, load_video, smart_resize)

transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")

TOL = 1e-5


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("RGBA", "LA"):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
        return image if mode == "RGBA" else image.convert("LA")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def mixed_images() -> list:
    """Odd sizes, portrait and landscape, several modes."""
    return [random_image(57, 91, 1), random_image(301, 43, 2, "RGBA"), random_image(33, 35, 3, "L"),
            random_image(120, 80, 4, "P"), random_image(64, 64, 5, "LA"), random_image(19, 230, 6)]


def save(hf, path) -> ImageProcessor:
    hf.save_pretrained(str(path))
    return ImageProcessor.from_pretrained(str(path))


def max_diff(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(np.asarray(b))
    assert a.dtype == torch.float32 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
    return (a - b.float()).abs().max().item()


def write_video(file, levels: list[int], width: int = 64, height: int = 48, rate: int = 6, codec: str = "mpeg4"):
    """A video whose frame i is a flat grey of levels[i] (survives lossy coding), or random frames."""
    with av.open(file, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for level in levels:
            frame = np.full((height, width, 3), level, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---- CLIP / SigLIP ------------------------------------------------------------------------------------


CLIP_CASES = {
    "llava": dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
    "crop_pads": dict(size={"shortest_edge": 40}, crop_size={"height": 45, "width": 61}),
    "no_resize_crop_pads": dict(do_resize=False, crop_size={"height": 64, "width": 64}),
    "bilinear_longest_edge": dict(size={"shortest_edge": 50, "longest_edge": 70}, resample=2,
                                  crop_size={"height": 30, "width": 30}),
    "no_normalize": dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, do_normalize=False),
    "no_rescale": dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, do_rescale=False,
                       image_mean=[120.0, 110.0, 100.0], image_std=[60.0, 50.0, 70.0]),
}


@pytest.mark.parametrize("case", sorted(CLIP_CASES))
def test_clip_matches_transformers(tmp_path, case):
    hf = transformers.CLIPImageProcessorPil(**CLIP_CASES[case])
    mine = save(hf, tmp_path)
    assert type(mine) is CLIPImageProcessor
    images = mixed_images()
    out = mine(images)
    assert out.grid_thw is None and out.num_tokens is None  # no config.json, no tokens_per_image
    assert max_diff(out.pixel_values, hf(images)["pixel_values"]) <= TOL


def test_clip_without_crop_matches_transformers_per_image(tmp_path):
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 37}, do_center_crop=False)
    mine = save(hf, tmp_path)
    for image in mixed_images():
        out = mine([image])
        assert max_diff(out.pixel_values, hf([image])["pixel_values"]) <= TOL
    with pytest.raises(ValueError, match="different sizes"):
        mine([random_image(40, 50, 1), random_image(50, 40, 2)])


@pytest.mark.parametrize("kwargs", [dict(size={"height": 48, "width": 64}), dict(size={"height": 31, "width": 29},
                                    resample=1, image_mean=[0.2, 0.3, 0.4], image_std=[0.9, 0.8, 0.7])])
def test_siglip_matches_transformers(tmp_path, kwargs):
    hf = transformers.SiglipImageProcessorPil(**kwargs)
    mine = save(hf, tmp_path)
    assert type(mine) is SiglipImageProcessor
    images = mixed_images()
    out = mine(images)
    assert out.pixel_values.shape == (len(images), 3, kwargs["size"]["height"], kwargs["size"]["width"])
    assert max_diff(out.pixel_values, hf(images)["pixel_values"]) <= TOL


def test_legacy_int_sizes(tmp_path):
    """Old CLIP configs hold ``size: 56, crop_size: 56`` (shortest edge, square crop)."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 56, "crop_size": 56, "do_center_crop": True}))
    mine = ImageProcessor.from_pretrained(tmp_path)
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    images = mixed_images()
    assert max_diff(mine(images).pixel_values, hf(images)["pixel_values"]) <= TOL


def test_clip_token_counts(tmp_path):
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 56},
                                       crop_size={"height": 56, "width": 56}).save_pretrained(str(tmp_path))
    images = [random_image(60, 70, 1), random_image(90, 40, 2)]
    assert ImageProcessor.from_pretrained(tmp_path, tokens_per_image=7)(images).num_tokens == [7, 7]
    config = {"model_type": "llava", "vision_feature_select_strategy": "default",
              "vision_config": {"model_type": "clip_vision_model", "patch_size": 14, "image_size": 56}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ImageProcessor.from_pretrained(tmp_path)(images).num_tokens == [16, 16]  # CLS dropped
    config["vision_feature_select_strategy"] = "full"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ImageProcessor.from_pretrained(tmp_path)(images).num_tokens == [17, 17]  # CLS kept
    config["vision_config"]["model_type"] = "siglip_vision_model"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ImageProcessor.from_pretrained(tmp_path)(images).num_tokens == [16, 16]  # no CLS to keep
    assert ImageProcessor.from_pretrained(tmp_path, tokens_per_image=3)(images).num_tokens == [3, 3]
    with pytest.raises(ValueError, match="tokens_per_image"):
        CLIPImageProcessor(tokens_per_image=0)


# ---- Qwen2-VL -----------------------------------------------------------------------------------------


QWEN_CASES = {
    "tiny": dict(min_pixels=56 * 56, max_pixels=224 * 224),
    "upscales": dict(min_pixels=112 * 112, max_pixels=300 * 300),
    "downscales": dict(min_pixels=28 * 28, max_pixels=60 * 60),
    "patch16_merge1_t3": dict(min_pixels=32 * 32, max_pixels=128 * 128, patch_size=16, merge_size=1,
                              temporal_patch_size=3),
}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen2vl_matches_transformers(tmp_path, case):
    hf = transformers.Qwen2VLImageProcessorPil(**QWEN_CASES[case])
    mine = save(hf, tmp_path)
    assert type(mine) is Qwen2VLImageProcessor
    images = mixed_images()
    out, ref = mine(images), hf(images)
    assert out.grid_thw.dtype == torch.int64
    assert out.grid_thw.tolist() == np.asarray(ref["image_grid_thw"]).tolist()
    assert max_diff(out.pixel_values, ref["pixel_values"]) <= TOL
    merge = QWEN_CASES[case].get("merge_size", 2)
    assert out.num_tokens == [int(g.prod()) // merge ** 2 for g in out.grid_thw]
    # one call over many images equals one call per image, concatenated
    single = [mine([im]) for im in images]
    assert torch.equal(out.pixel_values, torch.cat([s.pixel_values for s in single]))
    assert out.num_tokens == [s.num_tokens[0] for s in single]


def test_qwen2vl_legacy_min_max_pixels(tmp_path):
    """Hub Qwen2.5-VL configs carry top-level min_pixels / max_pixels and no size."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 40000,
        "size": {"shortest_edge": 1, "longest_edge": 10 ** 9}, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "Qwen2_5_VLProcessor"}))
    mine = ImageProcessor.from_pretrained(tmp_path)
    hf = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=40000)
    images = [random_image(400, 300, 1), random_image(20, 30, 2)]
    out, ref = mine(images), hf(images)
    assert out.grid_thw.tolist() == np.asarray(ref["image_grid_thw"]).tolist()
    assert int(out.grid_thw[0].prod()) * 14 * 14 <= 40000  # max_pixels won over size
    assert max_diff(out.pixel_values, ref["pixel_values"]) <= TOL


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for h, w in [(14, 14), (28, 42), (42, 70), (1000, 7), (3, 500), *rng.integers(1, 2000, (200, 2)).tolist()]:
        for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (28, 112 * 112, 224 * 224), (32, 1024, 64 * 64)]:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 56 * 56, 28 * 28 * 1280)


# ---- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("CLIPImageProcessor", CLIPImageProcessor),
                                       ("CLIPImageProcessorFast", CLIPImageProcessor),
                                       ("SiglipImageProcessorPil", SiglipImageProcessor),
                                       ("Qwen2VLImageProcessorFast", Qwen2VLImageProcessor),
                                       ("Qwen2VLImageProcessorPil", Qwen2VLImageProcessor)])
def test_processor_type_names(tmp_path, name, cls):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": name}))
    assert type(ImageProcessor.from_pretrained(tmp_path)) is cls


def test_processor_config_nested_entry_wins(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 20, "width": 30}}}))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is SiglipImageProcessor
    assert processor([random_image(50, 50, 0)]).pixel_values.shape == (1, 3, 20, 30)


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="path: .* not a directory"):
        ImageProcessor.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"image_processor_type": "LlavaNextImageProcessor"}))
    with pytest.raises(ValueError, match="image_processor_type 'LlavaNextImageProcessor' is not supported"):
        ImageProcessor.from_pretrained(tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not a readable JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    for bad, match in [({"image_mean": [0.5, 0.5]}, "image_mean must be"), ({"size": {"width": 3}}, "size must be"),
                       ({"resample": 9}, "resample must be"), ({"image_std": [1, 0, 1]}, "image_std must not")]:
        config.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", **bad}))
        with pytest.raises(ValueError, match=match):
            ImageProcessor.from_pretrained(tmp_path)
    config.write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 0}))
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        ImageProcessor.from_pretrained(tmp_path)
    config.write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))
    with pytest.raises(ValueError, match="tokens_per_image=4"):
        ImageProcessor.from_pretrained(tmp_path, tokens_per_image=4)


# ---- inputs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    hf = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    return hf, save(hf, path)


def test_arrays_and_bytes_equal_pil(qwen):
    hf, mine = qwen
    rgb = random_image(71, 45, 7)
    array = np.asarray(rgb)
    want = mine([rgb]).pixel_values
    assert torch.equal(mine([array]).pixel_values, want)
    assert torch.equal(mine([png_bytes(rgb)]).pixel_values, want)
    assert torch.equal(mine([bytearray(png_bytes(rgb))]).pixel_values, want)
    jpeg = png_bytes(rgb, "JPEG")
    assert torch.equal(mine([jpeg]).pixel_values, mine([Image.open(io.BytesIO(jpeg))]).pixel_values)
    # grey arrays [H, W] and [H, W, 1] are the grey PIL image; RGBA arrays follow transformers' numpy blend
    grey = random_image(40, 50, 8, "L")
    assert torch.equal(mine([np.asarray(grey)]).pixel_values, mine([grey]).pixel_values)
    assert torch.equal(mine([np.asarray(grey)[:, :, None]]).pixel_values, mine([grey]).pixel_values)
    rgba = np.asarray(random_image(45, 60, 9, "RGBA"))
    assert max_diff(mine([rgba]).pixel_values, hf([rgba])["pixel_values"]) <= TOL
    assert not torch.equal(mine([rgba]).pixel_values, mine([np.ascontiguousarray(rgba[..., :3])]).pixel_values)


def test_transparency_is_composited_on_white(qwen):
    _, mine = qwen
    clear = Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    assert torch.equal(mine([clear]).pixel_values, mine([Image.new("RGB", (56, 56), "white")]).pixel_values)


@pytest.mark.parametrize("bad, kind", [(3, "int"), ("cat.png", "str"), (np.zeros((8, 8, 3), np.float32), "float32"),
                                       (np.zeros((8, 8, 5), np.uint8), r"\[8, 8, 5\]"),
                                       (np.zeros((0, 8, 3), np.uint8), "empty"),
                                       (torch.zeros(8, 8, 3, dtype=torch.uint8), "torch.Tensor"),
                                       (b"\x89PNG not really", "cannot decode")])
def test_bad_images_name_the_argument(qwen, bad, kind):
    _, mine = qwen
    with pytest.raises(ValueError, match=rf"images\[1\]: .*{kind}"):
        mine([random_image(56, 56, 0), bad])


def test_bad_image_lists(qwen):
    _, mine = qwen
    with pytest.raises(ValueError, match="images must be a non-empty list.*an empty list"):
        mine([])
    with pytest.raises(ValueError, match="images must be a non-empty list.*Image"):
        mine(random_image(56, 56, 0))
    with pytest.raises(ValueError, match="aspect ratio"):
        mine([np.zeros((2, 500, 3), np.uint8)])
    clip = CLIPImageProcessor({"do_convert_rgb": False})
    with pytest.raises(ValueError, match=r"images\[0\]: do_convert_rgb is off .* mode 'L'"):
        clip([random_image(30, 30, 0, "L")])
    with pytest.raises(ValueError, match="frames: CLIPImageProcessor .* does not take videos"):
        clip.process_video([random_image(30, 30, 0)])


# ---- video ----------------------------------------------------------------------------------------------


LEVELS = [20 * i for i in range(12)]  # frame i is grey 20 * i


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(str(path), LEVELS)  # 12 frames of 64x48 at 6 fps: 2 s
    return path


def frame_levels(frames) -> list[int]:
    return [int(round(float(f.mean()) / 20)) for f in frames]


@pytest.mark.parametrize("fps, indices", [(2.0, [0, 3, 6, 9]), (6.0, list(range(12))), (1.0, [0, 6]),
                                          (12.0, [i // 2 for i in range(23)]), (0.4, [0])])
def test_load_video_samples_by_timestamp(clip_file, fps, indices):
    frames = load_video(str(clip_file), fps=fps)
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert frame_levels(frames) == indices
    assert all(abs(float(f.mean()) - LEVELS[i]) < 4 for f, i in zip(frames, indices))


def test_load_video_sources_and_max_frames(clip_file):
    frames = load_video(clip_file, fps=2.0)  # a Path
    data = clip_file.read_bytes()
    for other in (load_video(data, fps=2.0), load_video(io.BytesIO(data), fps=2.0)):
        assert len(other) == len(frames) and all(np.array_equal(a, b) for a, b in zip(frames, other))
    assert frame_levels(load_video(clip_file, fps=2.0, max_frames=3)) == [0, 3, 6]
    assert content_hash(frames) == content_hash(load_video(io.BytesIO(data)))


def test_load_video_h264(tmp_path):
    if "libx264" not in av.codecs_available:
        pytest.skip("no libx264 encoder in this PyAV build")
    path = tmp_path / "h264.mp4"
    write_video(str(path), LEVELS, codec="libx264")
    assert frame_levels(load_video(str(path), fps=2.0)) == [0, 3, 6, 9]


def test_load_video_errors(tmp_path):
    with pytest.raises(ValueError, match="path_or_file: .*missing.mp4' is not a local file"):
        load_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="path_or_file: 'http://localhost/a.mp4' is not a local file"):
        load_video("http://localhost/a.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="path_or_file: cannot open .*junk.mp4"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="path_or_file: cannot open 20 bytes"):
        load_video(b"definitely not video")
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match="has no video stream"):
        load_video(str(audio))
    with pytest.raises(ValueError, match="fps must be a positive number, got 0"):
        load_video(str(audio), fps=0)
    with pytest.raises(ValueError, match="max_frames must be a positive int or None, got 0"):
        load_video(str(audio), max_frames=0)
    with pytest.raises(ValueError, match="path_or_file must be a path.*int"):
        load_video(7)


def _per_frame_patches(hf, frame, temporal: int) -> np.ndarray:
    """transformers' image patches of one frame, ``[num_patches, C, P, P]`` (the first of its T copies)."""
    ref = np.asarray(hf([frame])["pixel_values"])
    return ref.reshape(ref.shape[0], 3, temporal, 14, 14)[:, :, 0]


@pytest.mark.parametrize("count", [4, 5, 1])
def test_process_video_matches_per_frame_transformers(qwen, count):
    hf, mine = qwen
    rng = np.random.default_rng(count)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(count)]
    video = mine.process_video(frames, fps=4.0)
    grid_t = -(-count // 2)
    assert video.grid_thw.dtype == torch.int64 and video.grid_thw.tolist() == [[grid_t, 4, 6]]
    assert video.num_tokens == grid_t * 4 * 6 // 4
    assert video.second_per_grid_t == pytest.approx(0.5)  # temporal_patch_size / fps
    # frame pairs (the last frame repeated when the count is odd) stacked along the temporal axis
    padded = frames + [frames[-1]] * (2 * grid_t - count)
    per_frame = [_per_frame_patches(hf, f, 2) for f in padded]
    want = np.concatenate([np.stack(per_frame[2 * t:2 * t + 2], axis=2).reshape(24, -1) for t in range(grid_t)])
    assert max_diff(video.pixel_values, want) <= TOL
    # a 4-D array of frames and PIL frames give the same result
    assert torch.equal(mine.process_video(np.stack(frames), fps=4.0).pixel_values, video.pixel_values)
    assert torch.equal(mine.process_video([Image.fromarray(f) for f in frames], fps=4.0).pixel_values,
                       video.pixel_values)


def test_still_video_equals_image(qwen):
    _, mine = qwen
    image = random_image(90, 130, 11)
    video = mine.process_video([image, image])
    out = mine([image])
    assert torch.equal(video.pixel_values, out.pixel_values) and torch.equal(video.grid_thw, out.grid_thw)
    assert video.num_tokens == out.num_tokens[0]
    assert video.second_per_grid_t == pytest.approx(1.0)  # 2 / the default 2 fps


def test_decoded_video_end_to_end(qwen, clip_file):
    hf, mine = qwen
    frames = load_video(str(clip_file), fps=2.0)
    video = mine.process_video(frames, fps=2.0)
    assert video.grid_thw.tolist() == [[2, 4, 4]]  # 64x48 -> 56x56 (smart_resize), 4 frames -> 2 groups
    want = np.stack([_per_frame_patches(hf, f, 2) for f in frames], axis=2)  # [16, 3, 4 frames, 14, 14]
    want = np.concatenate([want[:, :, 2 * t:2 * t + 2].reshape(16, -1) for t in range(2)])
    assert max_diff(video.pixel_values, want) <= TOL


def test_video_settings_files(tmp_path):
    image_cfg = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 224 * 224}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    frames = [np.full((200, 200, 3), 100, np.uint8)] * 2
    assert ImageProcessor.from_pretrained(tmp_path).process_video(frames).grid_thw.tolist() == [[1, 14, 14]]
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        "temporal_patch_size": 2}))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.process_video(frames).grid_thw.tolist() == [[1, 8, 8]]
    assert processor([frames[0]]).grid_thw.tolist() == [[1, 14, 14]]  # images keep the image settings
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"min_pixels": 28 * 28,
                                                                                    "max_pixels": 60 * 60}}))
    assert ImageProcessor.from_pretrained(tmp_path).process_video(frames).grid_thw.tolist() == [[1, 4, 4]]
    # a video config without size takes Qwen2-VL's video defaults (128 * 28 * 28 pixels at least)
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"temporal_patch_size": 2}))
    assert ImageProcessor.from_pretrained(tmp_path).process_video(frames).grid_thw.tolist() == [[1, 24, 24]]


def test_cap_pixels_per_frame():
    settings = {"min_pixels": 28 * 28, "max_pixels": 280 * 280}
    frames = [np.full((280, 280, 3), 50, np.uint8)] * 8
    free = Qwen2VLImageProcessor(settings, video_config=dict(settings, cap_pixels_per_frame=False))
    assert free.process_video(frames).grid_thw.tolist() == [[4, 20, 20]]
    # 0.9 * 20 tokens * 28**2 * 2 / 8 frames = 3528 pixels a frame: 56x56 (above 1.05 * min_pixels)
    capped = Qwen2VLImageProcessor(settings, video_config=dict(settings, cap_pixels_per_frame=True, max_video_tokens=20))
    assert capped.process_video(frames).grid_thw.tolist() == [[4, 4, 4]]


def test_bad_videos_name_the_argument(qwen):
    _, mine = qwen
    with pytest.raises(ValueError, match="frames must be a non-empty list.*an empty list"):
        mine.process_video([])
    with pytest.raises(ValueError, match=r"frames\[1\]: 50x40, but frames\[0\] is 56x56"):
        mine.process_video([np.zeros((56, 56, 3), np.uint8), np.zeros((40, 50, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"frames\[0\]: .*got builtins.str"):
        mine.process_video(["clip.mp4"])
    with pytest.raises(ValueError, match="fps must be a positive number, got -1"):
        mine.process_video([np.zeros((56, 56, 3), np.uint8)], fps=-1)


# ---- content hashes ----------------------------------------------------------------------------------------


def test_content_hash():
    image = random_image(33, 21, 12)
    key = content_hash(image)
    assert isinstance(key, int) and 0 < key < 2 ** 64
    assert content_hash(image.copy()) == key == content_hash(np.asarray(image)) == content_hash(png_bytes(image))
    flipped = np.asarray(image).copy()
    flipped[0, 0, 0] ^= 1
    assert content_hash(flipped) != key
    assert content_hash(image.convert("RGBA")) != key  # mode is part of the key
    assert content_hash(np.asarray(image).reshape(33, 21, 3)) != key  # so is the size
    assert content_hash([image]) != key  # a one-frame video is not the image
    a, b = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)
    assert content_hash([a, b]) != content_hash([b, a])
    assert content_hash([a, b]) == content_hash(np.stack([a, b])) == content_hash((Image.fromarray(a), b))
    # palette images hash their palette: the same indices under two palettes are two images
    p1 = Image.fromarray(np.zeros((4, 4), np.uint8), "P")
    p1.putpalette([255, 0, 0] * 256)
    p2 = p1.copy()
    p2.putpalette([0, 0, 255] * 256)
    assert content_hash(p1) != content_hash(p2)


def test_content_hash_is_stable():
    """The key is a pure function of the pixels (no process salt): a fixed image has a fixed key."""
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    import hashlib
    h = hashlib.blake2b(b"image|RGB|3|2|" + repr((None, None)).encode() + image.tobytes(), digest_size=8)
    assert content_hash(image) == (int.from_bytes(h.digest(), "little") or 1)


def test_content_hash_errors():
    with pytest.raises(ValueError, match="item: expected .*got builtins.int"):
        content_hash(5)
    with pytest.raises(ValueError, match=r"item\[1\]: "):
        content_hash([np.zeros((4, 4, 3), np.uint8), 2.5])
    with pytest.raises(ValueError, match="item: an empty list"):
        content_hash([])


@pytest.mark.parametrize("config", [{}, {"do_normalize": False},
                                    {"do_rescale": False, "image_mean": 0.3, "image_std": 7.0},
                                    {"rescale_factor": 0.0041, "image_mean": [0.1, 0.9, 0.5],
                                     "image_std": [3, 0.25, 1]}])
def test_pixel_lookup_equals_the_arithmetic(config):
    """Rescale and normalise go through a per-channel table of the 256 uint8 values: every output
    bit equals the arithmetic on the whole image (the rounding transformers' processors have)."""
    from tidal.multimodal import processing

    settings = Qwen2VLImageProcessor(config).settings
    rng = np.random.default_rng(0)
    for shape in [(56, 84, 3), (37, 91, 3), (1, 1, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        want, got = processing._rescale_normalize_values(rgb, settings), processing._rescale_normalize(rgb, settings)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (3,) + shape[:2]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("config", [{}, {"temporal_patch_size": 3, "merge_size": 1}, {"patch_size": 7}])
def test_a_still_images_patches_equal_its_stacked_frames(config):
    """An image's patches, cut without stacking its repeated frames, equal those of the stack."""
    from tidal.multimodal import processing

    settings = Qwen2VLImageProcessor(config).settings
    step = settings.patch_size * settings.merge_size
    frame = np.random.default_rng(1).standard_normal((3, 2 * step, 3 * step)).astype(np.float32)
    want = processing._patchify(np.stack([frame] * settings.temporal_patch_size), settings)
    assert np.array_equal(processing._patchify_still(frame, settings), want)
