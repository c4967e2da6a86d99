"""Input preprocessing for vision-language models: images and videos in, the pixel tensors a vision
tower takes, and the placeholder token count each item needs in the prompt, out (video decoding is
in tidal.multimodal.video, content hashes in tidal.multimodal.hashing).

Processors read a checkpoint's ``preprocessor_config.json`` (transformers' format) and reproduce
transformers' Pillow processors (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``,
``Qwen2VLImageProcessorPil``) to float32 rounding: Pillow resampling on uint8 RGB, rescale in
float64 cast to float32, normalise in float32.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIPImageProcessor", "ImageProcessor", "ProcessedImages", "ProcessedVideo", "Qwen2VLImageProcessor",
           "SiglipImageProcessor", "smart_resize"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SIZE_LAYOUTS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
                 {"max_height", "max_width"})


@dataclass
class ProcessedImages:
    """A batch of preprocessed images.

    Attributes
    ----------
    pixel_values : torch.Tensor
        float32. CLIP/SigLIP: ``[num_images, 3, height, width]``. Qwen2-VL: the patches of every image
        concatenated, ``[sum(grid_t * grid_h * grid_w), 3 * temporal_patch_size * patch_size**2]``.
    grid_thw : torch.Tensor or None
        int64 ``[num_images, 3]`` (grid_t, grid_h, grid_w) in patches (Qwen2-VL); None otherwise.
    num_tokens : list[int] or None
        Placeholder tokens each image takes in the prompt; None where the processor cannot know
        (CLIP/SigLIP built without ``tokens_per_image`` and without a model ``config.json``).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor | None
    num_tokens: list[int] | None


@dataclass
class ProcessedVideo:
    """One preprocessed video (Qwen2-VL layout).

    Attributes
    ----------
    pixel_values : torch.Tensor
        float32 ``[grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]``.
    grid_thw : torch.Tensor
        int64 ``[1, 3]``.
    num_tokens : int
        Placeholder tokens the video takes: ``grid_t * grid_h * grid_w // merge_size**2``.
    second_per_grid_t : float
        Seconds one temporal patch spans, ``temporal_patch_size / fps`` (Qwen2.5-VL's time positions).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    num_tokens: int
    second_per_grid_t: float


# ---- settings ---------------------------------------------------------------------------------------


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, ...
        raise ValueError(f"{path}: not a readable JSON file ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _find_settings(path: str, nested_key: str, files: tuple[str, ...]) -> tuple[dict, str] | None:
    """The first of ``processor_config.json[nested_key]`` and ``files`` in ``path`` that exists (the
    order transformers loads them in), with where it came from."""
    combined = _read_json(os.path.join(path, "processor_config.json"))
    if combined is not None and isinstance(combined.get(nested_key), dict):
        return combined[nested_key], f"processor_config.json[{nested_key!r}]"
    for name in files:
        found = _read_json(os.path.join(path, name))
        if found is not None:
            return found, name
    return None


def _size_dict(value: Any, key: str, default_to_square: bool, source: str) -> dict[str, int]:
    """transformers' size layouts: an int (a square, or a shortest edge), (height, width), or a dict."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict) or set(value) not in _SIZE_LAYOUTS:
        raise ValueError(f"{source}: {key} must be an int, [height, width] or a dict with keys "
                         f"{' | '.join(str(sorted(s)) for s in _SIZE_LAYOUTS)}; got {value!r}")
    for k, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{source}: {key}[{k!r}] must be a positive int, got {v!r}")
    return dict(value)


def _triple(value: Any, key: str, source: str) -> np.ndarray:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{source}: {key} must be a number or 3 numbers (one per RGB channel), got {value!r}")
    out = np.asarray(values, dtype=np.float32)
    if key == "image_std" and np.any(out == 0):
        raise ValueError(f"{source}: image_std must not contain 0, got {value!r}")
    return out


def _positive_int(settings: dict, key: str, source: str) -> int:
    value = settings[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive int, got {value!r}")
    return value


class _Settings:
    """One processor's settings: ``defaults`` overlaid with ``config`` (a null value keeps the
    default, as in transformers), validated; keys a processor does not use are ignored."""

    def __init__(self, defaults: dict, config: dict | None, source: str, default_to_square: bool = False):
        merged = dict(defaults)
        merged.update({k: v for k, v in (config or {}).items() if v is not None})
        self.source = source
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            setattr(self, flag, bool(merged.get(flag, False)))
        resample = merged["resample"]
        if not isinstance(resample, int) or isinstance(resample, bool) or resample not in range(6):
            raise ValueError(f"{source}: resample must be a Pillow filter number 0-5 (3 = bicubic), got {resample!r}")
        self.resample = Image.Resampling(resample)
        factor = merged["rescale_factor"]
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
            raise ValueError(f"{source}: rescale_factor must be a finite number, got {factor!r}")
        self.rescale_factor = float(factor)
        self.image_mean = _triple(merged["image_mean"], "image_mean", source)
        self.image_std = _triple(merged["image_std"], "image_std", source)
        self.size = _size_dict(merged["size"], "size", default_to_square, source)
        crop = merged.get("crop_size")
        self.crop_size = None if crop is None else _size_dict(crop, "crop_size", True, source)
        if self.do_center_crop and (self.crop_size is None or set(self.crop_size) != {"height", "width"}):
            raise ValueError(f"{source}: do_center_crop needs crop_size with height and width, got {crop!r}")
        self.raw = merged


# ---- images in ----------------------------------------------------------------------------------------


def decode_image(image: Any, where: str = "image") -> Image.Image | np.ndarray:
    """A PIL image or a validated uint8 array ``[H, W]`` / ``[H, W, 1|3|4]`` from any accepted input
    (encoded bytes are decoded; an image or array is returned as it is). ValueError naming ``where``."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ValueError(f"{where}: a numpy image must be uint8 [height, width] or [height, width, 1|3|4], "
                             f"got {image.dtype} {list(image.shape)}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{where}: the image is empty, shape {list(image.shape)}")
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            decoded = Image.open(io.BytesIO(bytes(image)))
            decoded.load()
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ValueError(f"{where}: {len(image)} bytes that Pillow cannot decode as an image ({e})") from None
        return decoded
    raise ValueError(f"{where}: expected a PIL.Image.Image, a numpy uint8 array [height, width, channels] or "
                     f"encoded image bytes (PNG, JPEG, ...), got {type(image).__module__}.{type(image).__qualname__}")


def _to_rgb(image: Image.Image | np.ndarray, convert: bool, where: str) -> np.ndarray:
    """uint8 ``[H, W, 3]``. Transparency is composited onto white, grey is repeated (as transformers)."""
    if isinstance(image, Image.Image):
        if not convert:
            if image.mode != "RGB":
                raise ValueError(f"{where}: do_convert_rgb is off in the preprocessor config and the image has "
                                 f"mode {image.mode!r}; give RGB images")
            return np.asarray(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 3:
        return image
    if not convert:
        raise ValueError(f"{where}: do_convert_rgb is off in the preprocessor config and the image has {channels} "
                         f"channels; give RGB images")
    if channels == 1:
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    alpha = image[..., 3:4] / 255.0
    # NOTE(tidal): float64 blend, rounded half to even, to equal transformers' numpy RGBA path exactly.
    return np.round(alpha * image[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)


def _pil_resize(rgb: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


def _rescale_normalize_values(rgb: np.ndarray, s: _Settings) -> np.ndarray:
    """float32 ``[3, H, W]`` from uint8 ``[H, W, 3]``: ``(x * rescale_factor - mean) / std``, the
    product in float64 cast to float32, the rest in float32 (transformers' rounding)."""
    x = (rgb.astype(np.float64) * s.rescale_factor).astype(np.float32) if s.do_rescale else rgb.astype(np.float32)
    if s.do_normalize:
        x = (x - s.image_mean) / s.image_std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _rescale_normalize(rgb: np.ndarray, s: _Settings) -> np.ndarray:
    """:func:`_rescale_normalize_values` of every pixel, looked up: a uint8 channel has 256 values, so
    each channel's results are computed once per settings (by that same function, so every value is
    the same bits) and an image is three table lookups, written straight in ``[3, H, W]`` order."""
    table = s.__dict__.get("_pixel_table")
    if table is None:  # [3, 256]: channel c's result for each uint8 value
        ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256, 1, 3]
        table = s._pixel_table = np.ascontiguousarray(_rescale_normalize_values(ramp, s)[:, :, 0])
    out = np.empty((3,) + rgb.shape[:2], dtype=table.dtype)
    for c in range(3):
        np.take(table[c], rgb[..., c], out=out[c])
    return out


# ---- CLIP / SigLIP -----------------------------------------------------------------------------------


def _shortest_edge_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """Output (height, width) scaling the short side to ``shortest`` (the long side truncated), or
    less where the long side would pass ``longest`` (then the short side is rounded)."""
    short, long = min(height, width), max(height, width)
    if longest is None:
        new_long = int(shortest * long / short)
        return (new_long, shortest) if width <= height else (shortest, new_long)
    exact = float(shortest)
    if long / short * shortest > longest:
        exact = longest * short / long
        shortest = int(round(exact))
    if short == shortest:
        return height, width
    if width < height:
        return int(exact * height / width), shortest
    return shortest, int(exact * width / height)


def _resize_target(height: int, width: int, size: dict[str, int], source: str) -> tuple[int, int]:
    if "shortest_edge" in size:
        return _shortest_edge_size(height, width, size["shortest_edge"], size.get("longest_edge"))
    if "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if "height" in size:
        return size["height"], size["width"]
    raise ValueError(f"{source}: size {size!r} has no shortest_edge, max_height/max_width or height/width to resize to")


def _center_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred ``height x width`` window, the image first padded with black where it is smaller."""
    h, w = rgb.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), 3), dtype=rgb.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top:top + h, left:left + w] = rgb
        rgb, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return rgb[top:top + height, left:left + width]


class ImageProcessor:
    """Base of tidal's image processors; build one with :meth:`ImageProcessor.from_pretrained`."""

    default_settings: dict = {}
    default_to_square = False

    def __init__(self, config: dict | None = None, source: str = "config"):
        if not self.default_settings:
            raise TypeError("ImageProcessor is abstract: use ImageProcessor.from_pretrained or a subclass")
        self.settings = _Settings(self.default_settings, config, source, self.default_to_square)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokens_per_image: int | None = None) -> ImageProcessor:
        """The processor a checkpoint directory's ``preprocessor_config.json`` names.

        Parameters
        ----------
        path : str or os.PathLike
            Checkpoint directory. Settings come from ``processor_config.json["image_processor"]`` if
            present, else ``preprocessor_config.json`` (transformers' order); its
            ``image_processor_type`` (``CLIPImageProcessor``, ``SiglipImageProcessor``,
            ``Qwen2VLImageProcessor``, each also with a ``Fast`` or ``Pil`` suffix) picks the class.
        tokens_per_image : int, optional
            CLIP/SigLIP only: placeholder tokens per image. If None they are derived from the model's
            ``config.json`` where it is a LLaVA layout (see :meth:`CLIPImageProcessor.num_tokens_for`).

        Returns
        -------
        ImageProcessor
            A :class:`CLIPImageProcessor`, :class:`SiglipImageProcessor` or :class:`Qwen2VLImageProcessor`.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"path: {path!r} is not a directory")
        found = _find_settings(path, "image_processor", ("preprocessor_config.json",))
        if found is None:
            raise ValueError(f"path: {path!r} has no preprocessor_config.json (nor processor_config.json with an "
                             f"'image_processor' entry)")
        config, source = found
        name = config.get("image_processor_type") or str(config.get("feature_extractor_type") or "").replace(
            "FeatureExtractor", "ImageProcessor")
        base = name.removesuffix("Fast").removesuffix("Pil") if isinstance(name, str) else None
        if base not in _PROCESSORS:
            raise ValueError(f"{source}: image_processor_type {name!r} is not supported; supported: "
                             f"{', '.join(sorted(_PROCESSORS))} (plain, Fast or Pil)")
        return _PROCESSORS[base]._from_directory(path, config, source, tokens_per_image)

    @classmethod
    def _from_directory(cls, path: str, config: dict, source: str, tokens_per_image: int | None) -> ImageProcessor:
        raise NotImplementedError

    def __call__(self, images: list) -> ProcessedImages:
        """Preprocesses ``images`` (PIL images, numpy uint8 ``[H, W, C]`` arrays or encoded bytes)."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError(f"images must be a non-empty list of images, got "
                             f"{type(images).__name__ if not isinstance(images, (list, tuple)) else 'an empty list'}")
        rgbs = [_to_rgb(decode_image(im, f"images[{i}]"), self.settings.do_convert_rgb, f"images[{i}]")
                for i, im in enumerate(images)]
        return self._process(rgbs)

    def _process(self, rgbs: list[np.ndarray]) -> ProcessedImages:
        raise NotImplementedError

    def process_video(self, frames, fps: float = 2.0) -> ProcessedVideo:
        """Preprocesses one video's frames; only processors of video models take videos."""
        raise ValueError(f"frames: {type(self).__name__} (from {self.settings.source}) does not take videos")


class CLIPImageProcessor(ImageProcessor):
    """CLIP-style processing (LLaVA-1.5): resize the shortest edge to ``size["shortest_edge"]``
    (``resample``, bicubic by default), centre-crop to ``crop_size``, then
    ``pixel = (uint8 * rescale_factor - image_mean) / image_std`` per RGB channel.

    Parameters
    ----------
    config : dict, optional
        ``preprocessor_config.json`` settings; missing keys take CLIPImageProcessor's defaults.
    source : str
        Where ``config`` came from, for error messages.
    tokens_per_image : int, optional
        Fixed placeholder tokens per image; wins over ``vision_patch_size``.
    vision_patch_size : int, optional
        The vision tower's patch size: tokens are ``(H // p) * (W // p) + num_extra_tokens`` of the
        processed ``H x W``.
    num_extra_tokens : int
        Tokens beyond the patches: +1 for a class token kept, -1 for the first token dropped.
    """

    default_settings = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                            crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                            do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True)

    def __init__(self, config: dict | None = None, source: str = "config", tokens_per_image: int | None = None,
                 vision_patch_size: int | None = None, num_extra_tokens: int = 0):
        super().__init__(config, source)
        for name, value in (("tokens_per_image", tokens_per_image), ("vision_patch_size", vision_patch_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.tokens_per_image = tokens_per_image
        self.vision_patch_size = vision_patch_size
        self.num_extra_tokens = int(num_extra_tokens)

    @classmethod
    def _from_directory(cls, path, config, source, tokens_per_image):
        patch, extra = _llava_token_layout(path)
        return cls(config, source, tokens_per_image, patch, extra)

    def num_tokens_for(self, height: int, width: int) -> int | None:
        """Placeholder tokens for one processed ``height x width`` image, or None if unknown."""
        if self.tokens_per_image is not None:
            return self.tokens_per_image
        if self.vision_patch_size is None:
            return None
        p = self.vision_patch_size
        return (height // p) * (width // p) + self.num_extra_tokens

    def _process(self, rgbs):
        s, out = self.settings, []
        for i, rgb in enumerate(rgbs):
            if s.do_resize:
                h, w = _resize_target(rgb.shape[0], rgb.shape[1], s.size, s.source)
                if h <= 0 or w <= 0:
                    raise ValueError(f"images[{i}]: {rgb.shape[1]}x{rgb.shape[0]} resizes to {w}x{h} under "
                                     f"size={s.size}; the image is too narrow")
                rgb = _pil_resize(rgb, h, w, s.resample)
            if s.do_center_crop:
                rgb = _center_crop(rgb, s.crop_size["height"], s.crop_size["width"])
            out.append(_rescale_normalize(rgb, s))
        shapes = {x.shape for x in out}
        if len(shapes) > 1:
            raise ValueError(f"images: processed to different sizes {sorted(shapes)}; enable do_center_crop or "
                             f"give one image per call")
        num_tokens = [self.num_tokens_for(x.shape[1], x.shape[2]) for x in out]
        return ProcessedImages(torch.from_numpy(np.stack(out)), None, None if None in num_tokens else num_tokens)


class SiglipImageProcessor(CLIPImageProcessor):
    """SigLIP-style processing: resize straight to ``size["height"] x size["width"]``, no crop,
    ``pixel = (uint8 * rescale_factor - 0.5) / 0.5`` by default. Same parameters as
    :class:`CLIPImageProcessor`."""

    default_settings = dict(CLIPImageProcessor.default_settings, size={"height": 224, "width": 224},
                            do_center_crop=False, crop_size=None, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def _llava_token_layout(path: str) -> tuple[int | None, int]:
    """(vision patch size, extra tokens) from a LLaVA ``config.json``: a CLIP tower adds a class
    token, the "default" feature strategy drops the first token. (None, 0) where there is none."""
    config = _read_json(os.path.join(path, "config.json")) or {}
    vision = config.get("vision_config")
    if not isinstance(vision, dict) or not isinstance(vision.get("patch_size"), int):
        return None, 0
    has_class_token = vision.get("model_type", "clip_vision_model") == "clip_vision_model"
    drops_first = config.get("vision_feature_select_strategy", "default") == "default"
    return vision["patch_size"], int(has_class_token) - int(drops_first)


# ---- Qwen2-VL ----------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: each side a multiple of ``factor`` (``patch_size * merge_size``),
    ``min_pixels <= h * w <= max_pixels``, the aspect ratio kept as well as those allow.

    Each side is first rounded (half to even) to a multiple of ``factor``; if the area then passes
    ``max_pixels`` both sides shrink by ``sqrt(h * w / max_pixels)`` and round down (at least
    ``factor``), if it is under ``min_pixels`` both grow by ``sqrt(min_pixels / (h * w))`` and round up.

    Returns
    -------
    tuple[int, int]
        (height, width).
    """
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"an image of {width}x{height} has an aspect ratio over 200, which Qwen2-VL cannot take")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _qwen_settings(defaults: dict, config: dict | None, source: str) -> _Settings:
    config = dict(config or {})
    config.pop("do_center_crop", None)  # Qwen2-VL never crops
    size = config.get("size")
    size = dict(defaults["size"]) if size is None else (dict(size) if isinstance(size, dict) else size)
    if isinstance(size, dict):
        for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if config.get(legacy) is not None:  # top-level min_pixels / max_pixels win over size, as in transformers
                size[key] = config[legacy]
            size.pop(legacy, None)
    config["size"] = size
    s = _Settings(defaults, config, source)
    if set(s.size) != {"shortest_edge", "longest_edge"}:
        raise ValueError(f"{source}: size must hold shortest_edge (min pixels) and longest_edge (max pixels), "
                         f"got {s.size!r}")
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        setattr(s, key, _positive_int(s.raw, key, source))
    s.cap_pixels_per_frame = bool(s.raw.get("cap_pixels_per_frame") or False)
    s.max_video_tokens = _positive_int(s.raw, "max_video_tokens", source) if "max_video_tokens" in s.raw else 0
    return s


def _patchify(frames: np.ndarray, s: _Settings) -> np.ndarray:
    """``[grid_t * grid_h * grid_w, C * T * P * P]`` from float32 ``[F, C, H, W]`` (F a multiple of T).

    Rows run over temporal groups, then ``merge_size x merge_size`` blocks of patches in raster order,
    then the patches of a block in raster order; a row holds channel, frame-in-group, patch row and
    patch column, slowest first (the order Qwen2-VL's patch embedding and merger expect)."""
    f, c, h, w = frames.shape
    t, p, m = s.temporal_patch_size, s.patch_size, s.merge_size
    gt, gh, gw = f // t, h // p, w // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, c, t, p, p]
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * t * p * p)


def _patchify_still(frame: np.ndarray, s: _Settings) -> np.ndarray:
    """:func:`_patchify` of one float32 ``[C, H, W]`` image repeated to ``temporal_patch_size``
    frames (how an image enters Qwen2-VL), without stacking the copies first."""
    c, h, w = frame.shape
    t, p, m = s.temporal_patch_size, s.patch_size, s.merge_size
    gh, gw = h // p, w // p
    x = frame.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, c, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)


class Qwen2VLImageProcessor(ImageProcessor):
    """Qwen2-VL / Qwen2.5-VL processing: each image resized by :func:`smart_resize` (factor
    ``patch_size * merge_size``, area within ``min_pixels`` / ``max_pixels``), normalised like CLIP,
    repeated to ``temporal_patch_size`` frames and cut into patches (:class:`ProcessedImages`);
    placeholder tokens ``grid_t * grid_h * grid_w // merge_size**2``.

    Parameters
    ----------
    config : dict, optional
        Image settings (``preprocessor_config.json``); ``size`` as ``{"shortest_edge": min_pixels,
        "longest_edge": max_pixels}`` or top-level ``min_pixels`` / ``max_pixels``.
    source : str
        Where ``config`` came from, for error messages.
    video_config : dict, optional
        Video settings; None uses ``config``. Missing keys take Qwen2-VL's video defaults.
    video_source : str, optional
        Where ``video_config`` came from.
    """

    default_settings = dict(CLIPImageProcessor.default_settings, size={"shortest_edge": 56 * 56,
                            "longest_edge": 28 * 28 * 1280}, do_center_crop=False, crop_size=None, patch_size=14,
                            temporal_patch_size=2, merge_size=2)
    default_video_settings = dict(default_settings, size={"shortest_edge": 128 * 28 * 28,
                                  "longest_edge": 28 * 28 * 768}, max_video_tokens=128000)

    def __init__(self, config: dict | None = None, source: str = "config", video_config: dict | None = None,
                 video_source: str | None = None):
        self.settings = _qwen_settings(self.default_settings, config, source)
        self.video_settings = _qwen_settings(self.default_video_settings, config if video_config is None
                                             else video_config, video_source or source)

    @classmethod
    def _from_directory(cls, path, config, source, tokens_per_image):
        if tokens_per_image is not None:
            raise ValueError(f"tokens_per_image={tokens_per_image!r}: {cls.__name__} counts each image's tokens "
                             f"from its grid; leave it None")
        video = _find_settings(path, "video_processor", ("video_preprocessor_config.json",))
        video_config, video_source = video if video is not None else (config, source)
        return cls(config, source, video_config, video_source)

    def _resized(self, rgb: np.ndarray, s: _Settings, max_pixels: int, where: str) -> np.ndarray:
        factor = s.patch_size * s.merge_size
        if s.do_resize:
            h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor, s.size["shortest_edge"], max_pixels)
            return _pil_resize(rgb, h, w, s.resample)
        if rgb.shape[0] % factor or rgb.shape[1] % factor:
            raise ValueError(f"{where}: do_resize is off and {rgb.shape[1]}x{rgb.shape[0]} is not a multiple of "
                             f"patch_size * merge_size = {factor} on each side")
        return rgb

    def _result(self, frames: list[np.ndarray], s: _Settings) -> tuple[np.ndarray, list[int]]:
        stacked = np.stack(frames)
        grid = [stacked.shape[0] // s.temporal_patch_size, stacked.shape[2] // s.patch_size,
                stacked.shape[3] // s.patch_size]
        return _patchify(stacked, s), grid

    def _process(self, rgbs):
        s = self.settings
        patches, grids = [], []
        for i, rgb in enumerate(rgbs):
            x = _rescale_normalize(self._resized(rgb, s, s.size["longest_edge"], f"images[{i}]"), s)
            patches.append(_patchify_still(x, s))
            grids.append([1, x.shape[1] // s.patch_size, x.shape[2] // s.patch_size])
        m2 = s.merge_size ** 2
        return ProcessedImages(torch.from_numpy(np.concatenate(patches)), torch.tensor(grids, dtype=torch.int64),
                               [t * h * w // m2 for t, h, w in grids])

    def process_video(self, frames, fps: float = 2.0) -> ProcessedVideo:
        """Preprocesses one video's frames, sampled at ``fps`` frames per second.

        Every frame is resized to one :func:`smart_resize` size (the video settings' ``min_pixels`` /
        ``max_pixels``; with ``cap_pixels_per_frame`` the per-frame maximum is also at most
        ``0.9 * max_video_tokens * factor**2 * temporal_patch_size / num_frames`` and at least
        ``1.05 * min_pixels``), normalised, the last frame repeated up to a multiple of
        ``temporal_patch_size``, and cut into patches.

        Parameters
        ----------
        frames : list or numpy.ndarray
            PIL images, numpy uint8 ``[H, W, C]`` arrays or encoded image bytes, all one size; or a
            uint8 array ``[num_frames, H, W, C]`` (e.g. from :func:`load_video`).
        fps : float
            The rate the frames were sampled at; gives ``second_per_grid_t = temporal_patch_size / fps``.

        Returns
        -------
        ProcessedVideo
        """
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, (list, tuple)) or not frames:
            raise ValueError(f"frames must be a non-empty list of frames, got "
                             f"{type(frames).__name__ if not isinstance(frames, (list, tuple)) else 'an empty list'}")
        s = self.video_settings
        rgbs = [_to_rgb(decode_image(f, f"frames[{i}]"), s.do_convert_rgb, f"frames[{i}]") for i, f in enumerate(frames)]
        for i, rgb in enumerate(rgbs):
            if rgb.shape != rgbs[0].shape:
                raise ValueError(f"frames[{i}]: {rgb.shape[1]}x{rgb.shape[0]}, but frames[0] is "
                                 f"{rgbs[0].shape[1]}x{rgbs[0].shape[0]}; all frames of a video must be one size")
        max_pixels = s.size["longest_edge"]
        if s.cap_pixels_per_frame:
            factor = s.patch_size * s.merge_size
            budget = int(s.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, budget * s.temporal_patch_size // len(rgbs)),
                             int(s.size["shortest_edge"] * 1.05))
        processed = [_rescale_normalize(self._resized(rgb, s, max_pixels, f"frames[{i}]"), s)
                     for i, rgb in enumerate(rgbs)]
        processed += [processed[-1]] * (-len(processed) % s.temporal_patch_size)
        flat, grid = self._result(processed, s)
        return ProcessedVideo(torch.from_numpy(flat), torch.tensor([grid], dtype=torch.int64),
                              grid[0] * grid[1] * grid[2] // s.merge_size ** 2, s.temporal_patch_size / float(fps))


_PROCESSORS: dict[str, type[ImageProcessor]] = {"CLIPImageProcessor": CLIPImageProcessor,
                                                 "SiglipImageProcessor": SiglipImageProcessor,
                                                 "Qwen2VLImageProcessor": Qwen2VLImageProcessor}
