"""Video decoding for vision-language models: PyAV (FFmpeg) decodes, frames are sampled at a rate."""

from __future__ import annotations

import io
import math
import os

import numpy as np

# NOTE(tidal): a frame whose timestamp is at most this far past a sampling instant counts as shown at
# it, so time-base rounding (1/90000 s ticks, 29.97 fps) cannot shift a sample by one frame.
_TIMESTAMP_SLACK_S = 1e-3


def load_video(path_or_file, fps: float = 2.0, max_frames: int | None = None) -> list[np.ndarray]:
    """Decodes a video's first video stream with PyAV and samples it at ``fps`` frames per second.

    Sample ``k`` is the frame shown at ``t0 + k / fps`` (the last frame whose timestamp is at or
    before it; ``t0`` the first frame's timestamp), for every such instant up to the last frame's
    timestamp. A rate above the video's own repeats frames (as one shared array), so the samples
    stay ``1 / fps`` apart.

    Parameters
    ----------
    path_or_file : str, os.PathLike, bytes or binary file object
        The video (any container and codec FFmpeg decodes).
    fps : float
        Samples per second.
    max_frames : int, optional
        Keep only the first ``max_frames`` samples (the spacing, and so the model's time positions,
        stay exact; the rest of the video is dropped).

    Returns
    -------
    list[numpy.ndarray]
        uint8 RGB frames ``[H, W, 3]``, in time order.
    """
    import av

    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        what, source = f"{len(path_or_file)} bytes", io.BytesIO(bytes(path_or_file))
    elif isinstance(path_or_file, (str, os.PathLike)):
        what, source = repr(os.fspath(path_or_file)), os.fspath(path_or_file)
        if not os.path.isfile(source):  # also keeps URLs and FFmpeg protocol strings away from av.open
            raise ValueError(f"path_or_file: {what} is not a local file")
    elif hasattr(path_or_file, "read"):
        what, source = f"file object {type(path_or_file).__name__}", path_or_file
    else:
        raise ValueError(f"path_or_file must be a path, bytes or a binary file object, got {type(path_or_file).__name__}")
    try:
        # NOTE(tidal): no network protocols, so a playlist inside a request's video cannot fetch URLs.
        container = av.open(source, mode="r", options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"path_or_file: cannot open {what} as a video ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"path_or_file: {what} has no video stream")
        stream = container.streams.video[0]
        try:
            frames = _sample_frames(container.decode(stream), stream, fps, max_frames)
        except (av.error.FFmpegError, OSError) as e:
            raise ValueError(f"path_or_file: cannot decode {what} ({e})") from None
    if not frames:
        raise ValueError(f"path_or_file: {what} has a video stream but no frame decodes")
    return frames


def _sample_frames(decoded, stream, fps: float, max_frames: int | None) -> list[np.ndarray]:
    rate = float(stream.average_rate or stream.guessed_rate or 1)
    out: list[np.ndarray] = []
    held = held_rgb = t0 = None  # the newest frame at or before the next sampling instant
    for index, frame in enumerate(decoded):
        t = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else index / rate
        t0 = t if t0 is None else t0
        while held is not None and t - t0 > len(out) / fps + _TIMESTAMP_SLACK_S:
            held_rgb = held.to_ndarray(format="rgb24") if held_rgb is None else held_rgb
            out.append(held_rgb)
            if max_frames is not None and len(out) >= max_frames:
                return out
        held, held_t, held_rgb = frame, t, None
    while held is not None and len(out) / fps <= held_t - t0 + _TIMESTAMP_SLACK_S:
        held_rgb = held.to_ndarray(format="rgb24") if held_rgb is None else held_rgb
        out.append(held_rgb)
        if max_frames is not None and len(out) >= max_frames:
            break
    return out
