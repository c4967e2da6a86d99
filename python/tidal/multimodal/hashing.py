"""Content hashes of images and videos: the encoder cache's keys and the prefix cache's extra keys."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from tidal.multimodal.processing import decode_image


def _hash_image(h, image: Image.Image | np.ndarray) -> None:
    if isinstance(image, Image.Image):
        mode, (width, height), data = image.mode, image.size, image.tobytes()
        palette = image.getpalette() if image.mode in ("P", "PA") else None
        extra = repr((palette, image.info.get("transparency"))).encode()
    else:
        channels = 1 if image.ndim == 2 else image.shape[2]
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        (height, width), data, extra = image.shape[:2], np.ascontiguousarray(image), repr((None, None)).encode()
    h.update(f"{mode}|{width}|{height}|".encode())
    h.update(extra)
    h.update(data)


def content_hash(item) -> int:
    """A stable 64-bit key of an image's or a video's decoded pixels (the encoder-cache key and the
    prefix-cache extra key): ``blake2b(digest_size=8)`` over a kind tag, then per image its mode,
    width, height (palette and transparency for palette images) and raw pixel bytes.

    An array and a PIL image of the same RGB pixels, and a PNG and its decoded image, hash equal; an
    image and a one-frame video do not.

    Parameters
    ----------
    item
        An image (PIL image, numpy uint8 ``[H, W, C]``, encoded bytes), or a video as a list/tuple of
        such frames or a uint8 array ``[num_frames, H, W, C]``.

    Returns
    -------
    int
        In ``[1, 2**64)``; never 0.
    """
    h = hashlib.blake2b(digest_size=8)
    if isinstance(item, np.ndarray) and item.ndim == 4:
        item = list(item)
    if isinstance(item, (list, tuple)):
        if not item:
            raise ValueError("item: an empty list of frames has no content to hash")
        h.update(f"video|{len(item)}|".encode())
        for i, frame in enumerate(item):
            _hash_image(h, decode_image(frame, f"item[{i}]"))
    else:
        h.update(b"image|")
        _hash_image(h, decode_image(item, "item"))
    return int.from_bytes(h.digest(), "little") or 1
