"""Qwen2.5-VL's vision tower and the 3-D (temporal, height, width) rotary position index of its prompts.

- :class:`Qwen2_5_VisionTransformer`: the native-resolution ViT. Images and videos arrive as flat
  patch rows (``pixel_values [num_patches, C*T*P*P]``, each item's patches in 2x2 merge-block order,
  frame by frame) with their patch grids ``grid_thw``; each block attends within windows of
  ``window_size`` pixels (``fullatt_block_indexes`` within whole frames), with 2-D rotary positions
  (row, column) on the attention, and the patch merger turns each ``merge x merge`` cell into one
  language-model embedding row.
- :func:`mrope_positions`: the position ids Qwen2.5-VL's language model rotates by, for one prompt,
  and the offset that decode tokens add to their index.

Plain torch and numpy (the tower runs once per new item, its output cached by the engine).
Parameter names equal the checkpoint's below ``visual.`` (``blocks.0.attn.qkv.weight``,
``merger.mlp.0.weight``, ...), so a loader maps ``visual.<name>`` to ``named_parameters()`` directly.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
_NORM_EPS = 1e-6


def _linear(in_features: int, out_features: int, dtype, device) -> nn.Linear:
    # Uninitialised: the weights come from a checkpoint (load_weights checks that all of them do).
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=True, dtype=dtype, device=device)


class _RMSNorm(nn.Module):
    def __init__(self, size: int, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, rounded to the input dtype before the scale (as the checkpoint was trained).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + _NORM_EPS)
        return self.weight * x32.to(x.dtype)


class _PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel: one linear map of each flattened patch."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, dim: int, dtype, device):
        super().__init__()
        self.proj = nn.utils.skip_init(nn.Conv3d, in_channels, dim, (temporal_patch_size, patch_size, patch_size),
                                       stride=(temporal_patch_size, patch_size, patch_size), bias=False,
                                       dtype=dtype, device=device)
        self.dim = dim
        self.patch_numel = in_channels * temporal_patch_size * patch_size * patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # NOTE(tidal): a matmul over the flattened patch rather than conv3d: the same C*T*P*P products
        # (1176) per output; within fp32 rounding of transformers' Conv3d (bitwise equal in bf16 on CPU).
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(self.dim, self.patch_numel))


# Attention segments (windows or frames) of the window-ordered patch sequence, grouped by length so
# that each group is one batched attention call without a mask: per group (first row, number of
# segments, length) when its segments lie back to back, else (rows [num_segments, length] int64, ...).
_Segments = list[tuple[int | torch.Tensor, int, int]]


def _segments(lengths: list[int], device) -> _Segments:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    lengths_np = np.asarray(lengths, dtype=np.int64)
    groups = []
    for length in np.unique(lengths_np).tolist():
        first = starts[lengths_np == length]
        if np.array_equal(first, first[0] + length * np.arange(len(first))):
            groups.append((int(first[0]), len(first), length))
        else:
            rows = torch.from_numpy(first[:, None] + np.arange(length)).to(device)
            groups.append((rows, len(first), length))
    return groups


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: _Segments) -> torch.Tensor:
    """Non-causal attention of ``q, k, v [num_patches, num_heads, head_dim]`` within each segment."""
    num_heads, head_dim = q.shape[1:]
    scale = head_dim ** -0.5
    if len(segments) == 1 and not isinstance(segments[0][0], torch.Tensor):
        _, count, length = segments[0]
        qs, ks, vs = (t.view(count, length, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for rows, count, length in segments:
        if isinstance(rows, torch.Tensor):
            qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))
        else:
            qs, ks, vs = (t[rows:rows + count * length].view(count, length, num_heads, head_dim).transpose(1, 2)
                          for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(-1, num_heads, head_dim)
        if isinstance(rows, torch.Tensor):
            out[rows.reshape(-1)] = o
        else:
            out[rows:rows + count * length] = o
    return out


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dtype, device):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = _linear(dim, 3 * dim, dtype, device)
        self.proj = _linear(dim, dim, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: _Segments) -> torch.Tensor:
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(num_patches, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = _segment_attention(q, k, v, segments)
        return self.proj(out.reshape(num_patches, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the whole head (halves paired), in fp32, rounded back to x's dtype.
    ``x [num_patches, num_heads, head_dim]``, ``cos``/``sin [num_patches, 1, head_dim // 2]`` fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class _MLP(nn.Module):
    def __init__(self, dim: int, inner: int, act, dtype, device):
        super().__init__()
        self.gate_proj = _linear(dim, inner, dtype, device)
        self.up_proj = _linear(dim, inner, dtype, device)
        self.down_proj = _linear(inner, dim, dtype, device)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, dim: int, inner: int, num_heads: int, act, dtype, device):
        super().__init__()
        self.norm1 = _RMSNorm(dim, dtype, device)
        self.attn = _Attention(dim, num_heads, dtype, device)
        self.norm2 = _RMSNorm(dim, dtype, device)
        self.mlp = _MLP(dim, inner, act, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: _Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class _PatchMerger(nn.Module):
    """RMSNorm per patch, then a 2-layer GELU MLP over each cell's ``merge**2`` patches concatenated."""

    def __init__(self, dim: int, out_dim: int, merge: int, dtype, device):
        super().__init__()
        self.cell_dim = dim * merge * merge
        self.ln_q = _RMSNorm(dim, dtype, device)
        self.mlp = nn.Sequential(_linear(self.cell_dim, self.cell_dim, dtype, device), nn.GELU(),
                                 _linear(self.cell_dim, out_dim, dtype, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.cell_dim))


class _Layout(NamedTuple):
    cell_order: torch.Tensor  # [num_cells] int64: window-ordered position -> cell in input order
    cell_restore: torch.Tensor  # [num_cells] int64: the inverse permutation
    positions: torch.Tensor  # [num_patches, 2] int64 (row, column) of each patch, window order
    windows: _Segments
    frames: _Segments


def _config_int(cfg: dict, *keys: str, default: int | None = None) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    if default is None:
        raise ValueError(f"vision_config has no {keys[0]!r}")
    return default


class Qwen2_5_VisionTransformer(nn.Module):
    """Qwen2.5-VL's vision tower (the checkpoint's ``visual.*``).

    Parameters
    ----------
    vision_config : dict
        The checkpoint's ``vision_config``: ``depth``, ``hidden_size``, ``intermediate_size``,
        ``num_heads``, ``out_hidden_size``, ``patch_size``, ``spatial_merge_size``,
        ``temporal_patch_size``, ``window_size`` (pixels), ``fullatt_block_indexes``,
        ``in_channels`` (or ``in_chans``), ``hidden_act``; rotary theta from
        ``rope_parameters["rope_theta"]`` or ``rope_theta``, else 10000.
    dtype, device
        Of the parameters; the forward pass computes in this dtype (rotary and norms in fp32).

    Notes
    -----
    ``forward(pixel_values, grid_thw)``: patch rows ``x W^T`` (the Conv3d as a matmul); cells
    reordered window by window (windows of ``window_size // patch_size // merge`` cells a side,
    row-major, clipped at the grid's edge; per frame); each block ``x += attn(norm1(x))``,
    ``x += down(act(gate(norm2(x))) * up(norm2(x)))``, attention confined to a window, or to a frame
    in ``fullatt_block_indexes``, q and k rotated by ``[row * f, col * f]`` with
    ``f = theta ** (-4 i / head_dim)``, ``i < head_dim / 4``; then the merger, and the cells put
    back in input order.
    """

    def __init__(self, vision_config: dict, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        cfg = vision_config
        dim = _config_int(cfg, "hidden_size")
        self.depth = _config_int(cfg, "depth", "num_hidden_layers")
        self.num_heads = _config_int(cfg, "num_heads", "num_attention_heads")
        if dim % self.num_heads or (dim // self.num_heads) % 4:
            raise ValueError(f"vision_config hidden_size={dim} must be num_heads={self.num_heads} times a "
                             f"multiple of 4")
        self.head_dim = dim // self.num_heads
        self.patch_size = _config_int(cfg, "patch_size", "spatial_patch_size", default=14)
        self.temporal_patch_size = _config_int(cfg, "temporal_patch_size", default=2)
        self.merge_size = _config_int(cfg, "spatial_merge_size", default=2)
        self.window_size = _config_int(cfg, "window_size", default=112)
        self.in_channels = _config_int(cfg, "in_channels", "in_chans", default=3)
        self.cells_per_window = self.window_size // self.patch_size // self.merge_size
        if self.cells_per_window < 1:
            raise ValueError(f"vision_config window_size={self.window_size} is smaller than one merged cell "
                             f"(patch_size * spatial_merge_size = {self.patch_size * self.merge_size})")
        self.fullatt_block_indexes = frozenset(int(i) for i in cfg.get("fullatt_block_indexes") or ())
        rope = cfg.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        act_name = cfg.get("hidden_act", "silu")
        if act_name not in _ACTIVATIONS:
            raise ValueError(f"vision_config hidden_act={act_name!r} is not supported; supported: "
                             f"{', '.join(_ACTIVATIONS)}")
        act = _ACTIVATIONS[act_name]
        self.hidden_size = dim
        self.out_hidden_size = _config_int(cfg, "out_hidden_size")

        self.patch_embed = _PatchEmbed(self.in_channels, self.temporal_patch_size, self.patch_size, dim, dtype, device)
        self.blocks = nn.ModuleList(_Block(dim, _config_int(cfg, "intermediate_size"), self.num_heads, act, dtype,
                                           device) for _ in range(self.depth))
        self.merger = _PatchMerger(dim, self.out_hidden_size, self.merge_size, dtype, device)

    def num_output_tokens(self, grid_thw: Sequence[int]) -> int:
        """Embedding rows one item of patch grid ``(t, h, w)`` gives: ``t * h * w // merge**2``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size ** 2

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of images and videos, in the items' order.

        Parameters
        ----------
        pixel_values : Tensor
            ``[num_patches, in_channels * temporal_patch_size * patch_size**2]``, the items' patch
            rows back to back, as Qwen2.5-VL's image processor writes them.
        grid_thw : Tensor
            ``[num_items, 3]`` int64, each item's (frames / temporal_patch_size, rows, columns) of patches.

        Returns
        -------
        Tensor
            ``[num_patches // spatial_merge_size**2, out_hidden_size]`` in the parameters' dtype.
        """
        grid = self._check_grid(grid_thw)
        patch_numel = self.patch_embed.patch_numel
        num_patches = int(sum(t * h * w for t, h, w in grid))
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (num_patches, patch_numel):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw={grid} needs "
                             f"({num_patches}, {patch_numel})")
        device = self.patch_embed.proj.weight.device
        layout = self._layout(grid, device)
        unit = self.merge_size ** 2

        x = self.patch_embed(pixel_values.to(device))
        x = x.view(-1, unit, self.hidden_size)[layout.cell_order].view(num_patches, self.hidden_size)
        cos, sin = self._rotary(layout.positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout.frames if i in self.fullatt_block_indexes else layout.windows)
        return self.merger(x)[layout.cell_restore]

    def _check_grid(self, grid_thw) -> list[tuple[int, int, int]]:
        grid = torch.as_tensor(grid_thw)
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or grid.shape[0] == 0:
            raise ValueError(f"grid_thw must be a non-empty integer [num_items, 3] tensor, got {grid_thw!r}")
        rows = [tuple(int(v) for v in row) for row in grid.tolist()]
        for t, h, w in rows:
            if t < 1 or h < 1 or w < 1 or h % self.merge_size or w % self.merge_size:
                raise ValueError(f"grid_thw row {(t, h, w)} must be positive with rows and columns multiples "
                                 f"of spatial_merge_size={self.merge_size}")
        return rows

    def _layout(self, grid: list[tuple[int, int, int]], device) -> _Layout:
        """Window order of the merged cells, each patch's (row, column), and the attention segments."""
        m, side = self.merge_size, self.cells_per_window
        orders, positions, window_cells, frame_patches = [], [], [], []
        first_cell = 0
        for t, h, w in grid:
            rows, cols = h // m, w // m
            num_windows_h, num_windows_w = -(-rows // side), -(-cols // side)
            cells = np.full((t, num_windows_h * side, num_windows_w * side), -1, dtype=np.int64)
            cells[:, :rows, :cols] = first_cell + np.arange(t * rows * cols).reshape(t, rows, cols)
            # [t, window row, window column, row in window, column in window]
            cells = cells.reshape(t, num_windows_h, side, num_windows_w, side).transpose(0, 1, 3, 2, 4)
            cells = cells.reshape(-1, side * side)
            counts = (cells >= 0).sum(axis=1)
            orders.append(cells[cells >= 0])
            window_cells.append(counts[counts > 0])
            frame_patches += [h * w] * t
            first_cell += t * rows * cols
            # Patch (row, column) in merge-block order: [cell row, cell column, row in cell, column in cell].
            r = np.arange(rows)[:, None, None, None] * m + np.arange(m)[None, None, :, None]
            c = np.arange(cols)[None, :, None, None] * m + np.arange(m)[None, None, None, :]
            r, c = np.broadcast_arrays(r, c)
            positions.append(np.tile(np.stack([r.reshape(-1), c.reshape(-1)], axis=1), (t, 1)))
        order = np.concatenate(orders)
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        unit = m * m
        patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        patch_positions = np.concatenate(positions)[patch_order]
        return _Layout(cell_order=torch.from_numpy(order).to(device), cell_restore=torch.from_numpy(restore).to(device),
                       positions=torch.from_numpy(patch_positions).to(device),
                       windows=_segments((np.concatenate(window_cells) * unit).tolist(), device),
                       frames=_segments(frame_patches, device))

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin [num_patches, 1, head_dim // 2]`` of the angles ``[row * f, col * f]``."""
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32,
                                                           device=positions.device) / half))
        angles = (positions.float()[:, :, None] * inv_freq).reshape(positions.shape[0], 1, half)
        return angles.cos(), angles.sin()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies ``(name, tensor)`` pairs named as in the checkpoint below ``visual.``; returns the
        names loaded. ValueError naming an unexpected tensor, a shape mismatch, or a missing tensor."""
        params, loaded = dict(self.named_parameters()), set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise ValueError(f"unexpected tensor {name!r} for the Qwen2.5-VL vision tower")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"tensor {name!r} of the Qwen2.5-VL vision tower has shape "
                                     f"{tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)
                loaded.add(name)
        missing = [name for name in params if name not in loaded]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"{len(missing)} tensor(s) of the Qwen2.5-VL vision tower missing: {shown}")
        return loaded


# ---- multimodal rotary positions -----------------------------------------------------------------------


def _grids(value, name: str, merge: int) -> np.ndarray:
    if value is None:
        return np.zeros((0, 3), dtype=np.int64)
    grid = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if grid.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"{name} must be an integer [num_items, 3] array, got {value!r}")
    if (grid < 1).any() or (grid[:, 1:] % merge).any():
        raise ValueError(f"{name}={grid.tolist()} must be positive with rows and columns multiples of "
                         f"spatial_merge_size={merge}")
    return grid.astype(np.int64)


def mrope_positions(input_ids: list[int] | np.ndarray, image_grid_thw, video_grid_thw, second_per_grid_ts, *,
                    image_token_id: int, video_token_id: int, vision_start_token_id: int, spatial_merge_size: int,
                    tokens_per_second: float) -> tuple[np.ndarray, int]:
    """Qwen2.5-VL's 3-D rotary positions (temporal, height, width) of one prompt.

    Parameters
    ----------
    input_ids : list of int or ndarray
        ``[num_tokens]``, each image (video) as ``vision_start`` followed by ``t * h * w // merge**2``
        ``image_token_id`` (``video_token_id``) tokens.
    image_grid_thw, video_grid_thw : array-like or None
        ``[num_images, 3]`` / ``[num_videos, 3]`` patch grids, in prompt order.
    second_per_grid_ts : sequence of float or None
        Seconds per temporal grid step of each video (None: 1.0 each).
    image_token_id, video_token_id, vision_start_token_id : int
    spatial_merge_size : int
    tokens_per_second : float
        The vision config's ``tokens_per_second``.

    Returns
    -------
    positions : ndarray
        ``[3, num_tokens]`` int64. A text run continues from ``p`` (one past the largest position
        before it; 0 at the start) with ``p, p+1, ...`` on all three axes; an item of merged grid
        ``(t, h', w')`` gets ``(p + floor(i * s * tokens_per_second), p + row, p + col)`` in row-major
        ``(i, row, col)`` order (``s`` = 1 for images, its ``second_per_grid_t`` for a video;
        computed in fp32 as transformers does).
    delta : int
        ``positions.max() + 1 - num_tokens``: token ``i >= num_tokens`` (decode) is at ``i + delta``
        on all three axes.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one prompt ([num_tokens]), got shape {ids.shape}")
    if image_token_id == video_token_id:
        raise ValueError(f"image_token_id and video_token_id must differ, both are {image_token_id}")
    merge = int(spatial_merge_size)
    if merge < 1:
        raise ValueError(f"spatial_merge_size={spatial_merge_size} must be positive")
    grids = {image_token_id: _grids(image_grid_thw, "image_grid_thw", merge),
             video_token_id: _grids(video_grid_thw, "video_grid_thw", merge)}
    num_videos = len(grids[video_token_id])
    if second_per_grid_ts is None:
        seconds = np.ones(num_videos, dtype=np.float32)
    else:
        seconds = np.asarray(second_per_grid_ts.cpu() if isinstance(second_per_grid_ts, torch.Tensor)
                             else second_per_grid_ts, dtype=np.float32).reshape(-1)
        if len(seconds) != num_videos:
            raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {num_videos} video(s)")
    # NOTE(tidal): fp32 like transformers (the processor's second_per_grid_ts is a float32 tensor), so
    # the truncated temporal positions agree where the product lands near an integer.
    intervals = {image_token_id: np.ones(len(grids[image_token_id]), dtype=np.float32),
                 video_token_id: np.float32(tokens_per_second) * seconds}
    used = {image_token_id: 0, video_token_id: 0}

    chunks, start, cursor = [], 0, 0
    placeholders = np.flatnonzero((ids == image_token_id) | (ids == video_token_id))
    p = 0
    while p < len(placeholders):
        first = int(placeholders[p])
        if first > cursor:
            chunks.append(np.broadcast_to(np.arange(start, start + first - cursor), (3, first - cursor)))
            start += first - cursor
        token = int(ids[first])
        kind = "image" if token == image_token_id else "video"
        if first == 0 or ids[first - 1] != vision_start_token_id:
            raise ValueError(f"{kind} token {token} at input_ids[{first}] is not preceded by vision_start_token_id="
                             f"{vision_start_token_id} (or a run of {kind} tokens is longer than its grid)")
        n = used[token]
        if n == len(grids[token]):
            raise ValueError(f"input_ids hold more {kind}s than the {len(grids[token])} {kind}_grid_thw row(s)")
        t, h, w = (int(v) for v in grids[token][n])
        rows, cols = h // merge, w // merge
        count = t * rows * cols
        if not (ids[first:first + count] == token).all():
            raise ValueError(f"{kind} {n} at input_ids[{first}] has fewer than the {count} {kind} tokens its "
                             f"grid {(t, h, w)} needs")
        temporal = (np.arange(t, dtype=np.float32) * intervals[token][n]).astype(np.int64)
        block = np.stack(np.meshgrid(temporal, np.arange(rows), np.arange(cols), indexing="ij")).reshape(3, -1)
        chunks.append(block + start)
        start += int(block.max()) + 1
        used[token] = n + 1
        cursor = first + count
        p = int(np.searchsorted(placeholders, cursor))
    if cursor < len(ids):
        chunks.append(np.broadcast_to(np.arange(start, start + len(ids) - cursor), (3, len(ids) - cursor)))
    for token, kind in ((image_token_id, "image"), (video_token_id, "video")):
        if used[token] != len(grids[token]):
            raise ValueError(f"{kind}_grid_thw has {len(grids[token])} row(s) but input_ids hold {used[token]} "
                             f"{kind}(s)")
    if not chunks:
        return np.zeros((3, 0), dtype=np.int64), 0
    positions = np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.int64)
    return positions, int(positions.max()) + 1 - len(ids)
