"""Multimodal requests in the serving engine: images and videos turned into prompt placeholders,
prefix-cache keys and, step by step, the embedding rows the model reads at those placeholders.

- :class:`MultiModalPrompt` (per request, built once at ``add_request``): the items (pixels, grid,
  content hash, where their placeholder tokens sit), the prompt with each placeholder expanded to
  the number of embedding rows its item takes, one prefix-cache extra key per prompt block (the
  hashes of the items whose placeholders fall in it: two prompts that differ only in an image share
  no block), and Qwen2.5-VL's 3-D rotary positions.
- :class:`EncoderCache`: item embeddings by content hash, least recently used first out, bounded in
  bytes. The vision encoder runs once per new item (the new items of one step in as few encoder calls
  as their modalities and sizes allow); a request holds its items' embeddings only until its
  prompt's chunks have consumed them.
- :func:`gather_step_inputs`: for one scheduled batch, the flat-batch rows of placeholder tokens
  and their embeddings (a chunk boundary inside an image takes exactly the rows of its part), and
  the positions the model needs (3-D where a multimodal prompt is being prefilled, shifted 1-D for
  its decode tokens).
"""

import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

_MODALITIES = ("image", "video")


@dataclass
class MultiModalItem:
    """One image or video of a prompt, preprocessed."""

    modality: str
    content_hash: int
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int] | None
    num_tokens: int
    offset: int = -1  # index of its first placeholder token in the expanded prompt
    second_per_grid_t: float = 1.0


@dataclass
class MultiModalPrompt:
    """A request's multimodal state (see the module docstring)."""

    items: list[MultiModalItem]
    token_ids: list[int]
    extra_keys: list[int]
    mrope: np.ndarray | None = None  # [3, num_prompt_tokens] int64
    mrope_delta: int = 0
    held: dict[int, torch.Tensor] = field(default_factory=dict)  # item index -> embeddings, until consumed


@dataclass
class MultiModalStep:
    """What one step's forward needs beyond token ids: ``rows`` (int64, flat-batch rows of
    placeholder tokens, ascending) and ``embeds`` (``[len(rows), hidden]``) to write into the token
    embeddings, and ``positions`` ``[3, num_tokens]`` for multimodal rotary positions (or None)."""

    rows: np.ndarray
    embeds: torch.Tensor | None
    positions: np.ndarray | None


class EncoderCache:
    """Item embeddings keyed by content hash, evicted least recently used first once their bytes
    pass ``max_bytes`` (an item larger than the whole bound is not kept)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"encoder_cache_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: int, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _fold_hashes(hashes: list[int]) -> int:
    """One nonzero 64-bit key for a block from the hashes of the items in it (order matters)."""
    h = hashlib.blake2b(np.asarray(hashes, dtype=np.uint64).tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") or 1


class MultiModalProcessor:
    """Turns a request's ``multi_modal_data`` into a :class:`MultiModalPrompt` for one model.

    Parameters
    ----------
    model
        A tidal vision-language model (tidal.models.vlm).
    path : str or None
        The checkpoint directory, holding ``preprocessor_config.json``.
    """

    def __init__(self, model, path: str | None):
        from tidal.multimodal import ImageProcessor

        if path is None:
            raise ValueError("a vision-language model needs its checkpoint directory (for preprocessor_config.json); "
                             "serve it from a path, not a model object")
        self.model = model
        self.processor = ImageProcessor.from_pretrained(path)

    def process(self, token_ids: list[int], data: dict, block_size: int,
                options: dict | None = None) -> MultiModalPrompt:
        """Preprocesses every item, expands the placeholders, and computes the block keys and
        positions. ValueError naming what is wrong (an unknown modality, an image that does not
        decode, placeholders that do not match the items)."""
        if not isinstance(data, dict):
            raise ValueError(f"multi_modal_data must be a dict like {{'image': [...]}}, got {type(data).__name__}")
        options = dict(options or {})
        unknown = set(options) - {"fps", "max_frames"}
        if unknown:
            raise ValueError(f"mm_processor_kwargs has unknown keys {sorted(unknown)}; known: fps, max_frames")
        items: dict[str, list[MultiModalItem]] = {}
        for modality, value in data.items():
            if modality not in self.model.modalities:
                raise ValueError(f"multi_modal_data[{modality!r}]: this model takes "
                                 f"{', '.join(self.model.modalities)}")
            values = value if isinstance(value, (list, tuple)) and not _is_frame_list(modality, value) else [value]
            items[modality] = [self._item(modality, v, i, options) for i, v in enumerate(values)]
        expanded, ordered = self._expand(token_ids, items)
        keys = self._block_keys(len(expanded), ordered, block_size)
        prompt = MultiModalPrompt(ordered, expanded, keys)
        if self.model.uses_mrope:
            prompt.mrope, prompt.mrope_delta = self.model.mrope_positions(expanded, ordered)
        return prompt

    def _item(self, modality: str, value, index: int, options: dict) -> MultiModalItem:
        where = f"multi_modal_data[{modality!r}][{index}]"
        try:
            return self._process_item(modality, value, options)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def _process_item(self, modality: str, value, options: dict) -> MultiModalItem:
        from tidal.multimodal import content_hash, decode_image, load_video

        # encoded bytes are decoded once here, for both the processor and the hash
        if modality == "image":
            value = decode_image(value)
            processed = self.processor([value])
            grid = None if processed.grid_thw is None else tuple(int(v) for v in processed.grid_thw[0])
            return MultiModalItem("image", content_hash(value), processed.pixel_values, grid,
                                  self.model.num_placeholder_tokens("image", grid))
        fps = float(options.get("fps", 2.0))
        if isinstance(value, bytes):
            value = io.BytesIO(value)
        if isinstance(value, str) or hasattr(value, "read"):
            frames = load_video(value, fps=fps, max_frames=options.get("max_frames"))
        else:
            frames = [decode_image(f, f"frames[{i}]") for i, f in enumerate(value)]
        processed = self.processor.process_video(frames, fps=fps)
        grid = tuple(int(v) for v in processed.grid_thw[0])
        return MultiModalItem("video", content_hash(frames), processed.pixel_values, grid,
                              self.model.num_placeholder_tokens("video", grid),
                              second_per_grid_t=float(processed.second_per_grid_t))

    def _expand(self, token_ids: list[int], items: dict[str, list[MultiModalItem]]):
        """The prompt with each placeholder run expanded to its item's token count (a run already of
        that length is kept), and every item with its offset, in prompt order."""
        placeholders = {self.model.placeholder_token_ids[m]: m for m in self.model.modalities}
        taken = {m: 0 for m in items}
        out: list[int] = []
        ordered: list[MultiModalItem] = []
        i, n = 0, len(token_ids)
        while i < n:
            token = token_ids[i]
            modality = placeholders.get(token)
            if modality is None:
                out.append(token)
                i += 1
                continue
            j = i
            while j < n and token_ids[j] == token:
                j += 1
            run, queue = j - i, items.get(modality, [])
            nxt = taken.get(modality, 0)
            if nxt < len(queue) and run == queue[nxt].num_tokens and run > 1:
                counts = [run]  # already expanded
            else:
                counts = [1] * run
            for _ in counts:
                if taken.get(modality, 0) >= len(queue):
                    raise ValueError(f"the prompt has more {modality} placeholders than multi_modal_data holds "
                                     f"{modality}s ({len(queue)})")
                item = queue[taken[modality]]
                taken[modality] += 1
                item.offset = len(out)
                out.extend([token] * item.num_tokens)
                ordered.append(item)
            i = j
        for modality, queue in items.items():
            if taken.get(modality, 0) != len(queue):
                raise ValueError(f"multi_modal_data holds {len(queue)} {modality}(s) but the prompt has "
                                 f"{taken.get(modality, 0)} {modality} placeholder(s) (token id "
                                 f"{self.model.placeholder_token_ids[modality]}): put one where each goes")
        return out, ordered

    @staticmethod
    def _block_keys(num_tokens: int, items: list[MultiModalItem], block_size: int) -> list[int]:
        num_blocks = -(-num_tokens // block_size)
        per_block: list[list[int]] = [[] for _ in range(num_blocks)]
        for item in items:
            first, last = item.offset // block_size, (item.offset + item.num_tokens - 1) // block_size
            for b in range(first, last + 1):
                per_block[b].append(item.content_hash)
        return [_fold_hashes(h) if h else 0 for h in per_block]


def _is_frame_list(modality: str, value) -> bool:
    """A video given as one list of frames (rather than a list of videos)."""
    if modality != "video" or not value:
        return False
    first = value[0]
    return not isinstance(first, (list, tuple, str, bytes)) and not (isinstance(first, np.ndarray) and first.ndim == 4)


def gather_step_inputs(batch, prompts: dict[int, MultiModalPrompt], encode, uses_mrope: bool) -> MultiModalStep | None:
    """The multimodal inputs of one scheduled batch, or None when it needs none.

    ``prompts`` maps the sequence id of every unfinished multimodal request's sample to its state;
    ``encode([(prompt, index, item), ...]) -> [embeddings, ...]`` returns the embeddings of every
    item the step reads (from the request's hold, the encoder cache, or the encoder), all at once so
    the new ones can be encoded together. Under M-RoPE, decode tokens of multimodal prompts get
    their 1-D position shifted in ``batch.positions`` (in place, vectorised); only sequences whose
    chunk touches their prompt are looked at one by one.
    """
    if not prompts:
        return None
    ids = batch.request_ids
    seqs = np.flatnonzero(np.isin(ids, np.fromiter(prompts, dtype=np.int64, count=len(prompts))))
    if seqs.size == 0:
        return None
    cu, positions = batch.cu_seqlens_q, batch.positions
    states = [prompts[int(ids[s])] for s in seqs]
    lo, hi = cu[seqs].astype(np.int64), cu[seqs + 1].astype(np.int64)
    n_prompt = np.fromiter((len(p.token_ids) for p in states), dtype=np.int64, count=len(states))
    prefilling = positions[lo] < n_prompt  # the chunk starts inside the prompt
    if uses_mrope and not prefilling.all():  # decode rows: idx + delta in all three components
        dec = ~prefilling
        deltas = np.fromiter((p.mrope_delta for p in states), dtype=np.int64, count=len(states))[dec]
        counts = (hi - lo)[dec]
        rows = np.repeat(lo[dec], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        positions[rows] += np.repeat(deltas, counts)
    rows_out: list[np.ndarray] = []
    uses: list[tuple[MultiModalPrompt, int, MultiModalItem, int, int]] = []  # (prompt, item index, item, a, b)
    mrope_rows: list[tuple[int, int, np.ndarray]] = []
    for k in np.flatnonzero(prefilling):
        prompt, a_lo, a_hi = states[k], int(lo[k]), int(hi[k])
        start, end = int(positions[a_lo]), int(positions[a_hi - 1]) + 1  # token indices of this chunk
        for index, item in enumerate(prompt.items):
            a, b = max(start, item.offset), min(end, item.offset + item.num_tokens)
            if a >= b:
                continue
            rows_out.append(np.arange(a_lo + a - start, a_lo + b - start, dtype=np.int64))
            uses.append((prompt, index, item, a, b))
        if uses_mrope:
            idx = positions[a_lo:a_hi].copy()
            decode = idx >= n_prompt[k]
            p3 = np.broadcast_to(idx + prompt.mrope_delta, (3, a_hi - a_lo)).copy()
            p3[:, ~decode] = prompt.mrope[:, idx[~decode]]
            mrope_rows.append((a_lo, a_hi, p3))
            positions[a_lo:a_hi] = np.where(decode, idx + prompt.mrope_delta, idx)
    pos3 = None
    if mrope_rows:  # other rows: their (shifted) 1-D position in all three components
        pos3 = np.broadcast_to(positions, (3, len(positions))).copy()
        for a_lo, a_hi, p3 in mrope_rows:
            pos3[:, a_lo:a_hi] = p3
    if not rows_out and pos3 is None:
        return None
    embeds = []
    if uses:
        for (prompt, index, item, a, b), emb in zip(uses, encode([u[:3] for u in uses])):
            embeds.append(emb[a - item.offset:b - item.offset])
            if b == item.offset + item.num_tokens:
                prompt.held.pop(index, None)  # consumed: later needs (a preemption) go to the cache
    return MultiModalStep(np.concatenate(rows_out) if rows_out else np.zeros(0, dtype=np.int64),
                          torch.cat(embeds) if embeds else None, pos3)
