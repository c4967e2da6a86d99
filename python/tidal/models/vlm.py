"""Vision-language models: an image encoder in front of a tidal language model.

- :class:`LlavaForConditionalGeneration` (LLaVA-1.5 style): a CLIP or SigLIP vision tower
  (tidal.models.vision), the two-layer multimodal projector, and a Llama-family language model.
- :class:`Qwen2_5_VLForConditionalGeneration`: Qwen2.5-VL's native-resolution vision tower with
  window attention (tidal.models.qwen2_5_vl_vision) and Qwen2 with multimodal rotary positions.

Both are a :class:`~tidal.models.llama.LlamaForCausalLM` (the language model: same serving forward,
KV cache and sampling path) with the encoder added. The serving engine asks the model for each
image's (or video's) embeddings once (:meth:`VisionLanguageModel.encode_multimodal`), keeps them in
its encoder cache, and passes them in as ``inputs_embeds`` rows at the placeholder tokens.

Checkpoints come in two naming layouts (transformers before and after 4.52 moved the language model
under ``model.``); both load, and :meth:`hf_state_dict` writes the one transformers writes today.
"""

import math
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from tidal.models.config import ModelConfig
from tidal.models.llama import LlamaForCausalLM
from tidal.models.vision import VisionTransformer, activation


class VisionLanguageModel(LlamaForCausalLM):
    """A language model whose prompts may hold images (and videos): what the engine relies on.

    Attributes
    ----------
    modalities : tuple of str
        What ``multi_modal_data`` may hold ("image", "video").
    placeholder_token_ids : dict
        Modality -> the token id that stands for one embedding row of an item in the prompt.
    uses_mrope : bool
        Positions are 3-D (temporal, height, width): see :meth:`mrope_positions`.
    """

    modalities: tuple[str, ...] = ("image",)
    uses_mrope = False
    # (pattern, replacement) pairs taking a checkpoint name to (part, name within that part)
    _NAME_RULES: tuple[tuple[str, str], ...] = ()

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(config, dtype=dtype, device=device)
        self.placeholder_token_ids: dict[str, int] = {}

    # ---- encoder -------------------------------------------------------------------------------

    def encode_multimodal(self, modality: str, pixel_values: torch.Tensor,
                          grid_thw: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The embeddings of a batch of items of one modality: one ``[num_tokens, hidden_size]``
        tensor per item, in the model's dtype, on its device."""
        raise NotImplementedError

    def num_placeholder_tokens(self, modality: str, grid_thw: tuple[int, int, int] | None) -> int:
        """How many placeholder tokens (embedding rows) one item takes in the prompt."""
        raise NotImplementedError

    def dummy_multimodal_input(self, num_tokens: int) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """``(modality, pixel_values, grid_thw)`` of zero images the encoder turns into at most
        ``num_tokens`` embedding rows and no fewer than one item's worth below it: what the GPU
        runner's memory profile encodes, as the engine encodes a step's new items together."""
        raise NotImplementedError

    def prompt_placeholder(self, modality: str) -> list[int]:
        """The token ids that mark where one item goes in a prompt before expansion (what a chat
        template writes for an image part)."""
        return [self.placeholder_token_ids[modality]]

    def mrope_positions(self, token_ids: list[int], items: list) -> tuple[np.ndarray, int]:
        """3-D positions ``[3, len(token_ids)]`` of a prompt and the decode offset (only when
        ``uses_mrope``); ``items`` the prompt's multimodal items in order (``grid_thw``,
        ``modality``, ``second_per_grid_t``)."""
        raise NotImplementedError

    # ---- weights -------------------------------------------------------------------------------

    def _parts(self) -> dict[str, nn.Module]:
        """Part name -> module whose ``named_parameters()`` are named as in the checkpoint."""
        raise NotImplementedError

    def _route(self, name: str) -> tuple[str, str]:
        """(part, name within it) for a checkpoint tensor name; part "text" holds the language
        model's names as LlamaForCausalLM.load_weights knows them."""
        for pattern, replacement in self._NAME_RULES:
            routed, n = re.subn(pattern, replacement, name)
            if n:
                part, _, local = routed.partition(":")
                return part, local
        return "?", name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies a checkpoint's tensors (either naming layout) into the language model and the
        encoder parts. ValueError naming an unexpected, misshapen or missing tensor."""
        parts = {part: dict(module.named_parameters()) for part, module in self._parts().items()}
        loaded: set[tuple[str, str]] = set()

        def text() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                part, local = self._route(name)
                if part == "text":
                    yield local, tensor
                    continue
                if part == "skip":
                    continue
                params = parts.get(part)
                if params is None or local not in params:
                    raise ValueError(f"unexpected tensor {name!r} for {self.config.multimodal_architecture}")
                if tuple(tensor.shape) != tuple(params[local].shape):
                    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[local].shape)}")
                with torch.no_grad():
                    params[local].copy_(tensor)
                loaded.add((part, local))

        super().load_weights(text())
        missing = [f"{part}.{local}" for part, params in parts.items() for local in params
                   if (part, local) not in loaded]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint: {shown}")

    def _save_name(self, part: str, local: str) -> str:
        raise NotImplementedError

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().hf_state_dict():
            yield self._save_name("text", name), tensor
        for part, module in self._parts().items():
            for local, param in module.named_parameters():
                yield self._save_name(part, local), param.detach()


class _Projector(nn.Module):
    """LLaVA's multimodal projector: linear, activation, linear."""

    def __init__(self, in_features: int, out_features: int, act: str, bias: bool, dtype, device):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.act = activation(act, "projector_hidden_act")
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    """LLaVA-1.5: each image's vision-tower hidden states (``vision_feature_layer``, without the
    class token under the "default" select strategy) through the projector, one embedding row per
    ``<image>`` placeholder token."""

    _NAME_RULES = (
        # SigLIP's attention-pooling head and old position-id buffers: nothing in LLaVA reads them
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(?:head\..*|embeddings\.position_ids)$", "skip:"),
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.*)$", r"vision_tower:\1"),
        (r"^(?:model\.)?multi_modal_projector\.(.*)$", r"multi_modal_projector:\1"),
        (r"^language_model\.lm_head\.(.*)$", r"text:lm_head.\1"),
        (r"^language_model\.model\.(.*)$", r"text:model.\1"),
        (r"^model\.language_model\.(.*)$", r"text:model.\1"),
        (r"^(lm_head\..*)$", r"text:\1"),
    )

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(config, dtype=dtype, device=device)
        raw = config.hf_config
        if raw.get("vision_feature_select_strategy", "default") not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={raw['vision_feature_select_strategy']!r} must be "
                             f"'default' or 'full'")
        if raw.get("image_grid_pinpoints") is not None or raw.get("model_type") not in (None, "llava"):
            raise ValueError(f"model_type={raw.get('model_type')!r}: only LLaVA-1.5 style checkpoints "
                             f"(one fixed-size image view) are supported")
        device = self.model.embed_tokens.weight.device
        self.vision_tower = VisionTransformer(raw["vision_config"], dtype, device)
        layer = raw.get("vision_feature_layer", -2)
        self.feature_layers = [int(layer)] if isinstance(layer, int) else [int(i) for i in layer]
        self.drop_class_token = raw.get("vision_feature_select_strategy", "default") == "default"
        self.multi_modal_projector = _Projector(
            self.vision_tower.hidden_size * len(self.feature_layers), config.hidden_size,
            raw.get("projector_hidden_act", "gelu"), bool(raw.get("multimodal_projector_bias", True)), dtype, device)
        token = raw.get("image_token_id", raw.get("image_token_index", 32000))
        self.placeholder_token_ids = {"image": int(token)}

    @property
    def image_size(self) -> int:
        return self.vision_tower.embeddings.image_size

    def num_placeholder_tokens(self, modality: str, grid_thw=None) -> int:
        return self.vision_tower.num_positions - int(self.drop_class_token)

    def dummy_multimodal_input(self, num_tokens: int) -> tuple[str, torch.Tensor, None]:
        count = max(1, num_tokens // self.num_placeholder_tokens("image"))
        channels = self.vision_tower.embeddings.patch_embedding.in_channels
        return "image", torch.zeros(count, channels, self.image_size, self.image_size), None

    def encode_multimodal(self, modality: str, pixel_values: torch.Tensor,
                          grid_thw: torch.Tensor | None = None) -> list[torch.Tensor]:
        if modality != "image":
            raise ValueError(f"modality={modality!r}: LLaVA takes images only")
        with torch.no_grad():
            pixel_values = pixel_values.to(self.device, self.dtype)
            features = self.vision_tower(pixel_values, self.feature_layers)
            if self.drop_class_token:
                features = [f[:, 1:] for f in features]
            return list(self.multi_modal_projector(torch.cat(features, dim=-1)))

    def _parts(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.vision_tower, "multi_modal_projector": self.multi_modal_projector}

    def _save_name(self, part: str, local: str) -> str:
        return f"language_model.{local}" if part == "text" else f"{part}.{local}"


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    """Qwen2.5-VL: images and videos through the native-resolution vision tower, whose output rows
    (one per 2x2 merged patch cell) replace the ``<|image_pad|>`` / ``<|video_pad|>`` tokens; the
    language model is Qwen2 with 3-D rotary positions."""

    modalities = ("image", "video")
    uses_mrope = True
    _NAME_RULES = (
        (r"^(?:model\.)?visual\.(.*)$", r"visual:\1"),
        (r"^model\.language_model\.(.*)$", r"text:model.\1"),
        (r"^(model\..*)$", r"text:\1"),
        (r"^(lm_head\..*)$", r"text:\1"),
    )

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(config, dtype=dtype, device=device)
        from tidal.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer

        raw = config.hf_config
        vision = raw["vision_config"]
        self.visual = Qwen2_5_VisionTransformer(vision, dtype, self.model.embed_tokens.weight.device)
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        self.tokens_per_second = float(vision.get("tokens_per_second", 2))
        ids = {key: raw.get(key, (raw.get("text_config") or {}).get(key)) for key in
               ("image_token_id", "video_token_id", "vision_start_token_id")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"a Qwen2.5-VL config needs {', '.join(missing)}")
        self.placeholder_token_ids = {"image": int(ids["image_token_id"]), "video": int(ids["video_token_id"])}
        self.vision_start_token_id = int(ids["vision_start_token_id"])
        self.vision_end_token_id = int(raw.get("vision_end_token_id", self.vision_start_token_id + 1))

    def prompt_placeholder(self, modality: str) -> list[int]:
        return [self.vision_start_token_id, self.placeholder_token_ids[modality], self.vision_end_token_id]

    def num_placeholder_tokens(self, modality: str, grid_thw) -> int:
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size ** 2

    def dummy_multimodal_input(self, num_tokens: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        # one image of about num_tokens merged cells, close to square: its full-attention layers
        # attend over all of it, the most any batch of that many rows asks of them
        rows = max(1, math.isqrt(num_tokens))
        cols = max(1, num_tokens // rows)
        grid = torch.tensor([[1, rows * self.merge_size, cols * self.merge_size]])
        patches = int(grid.prod())
        return "image", torch.zeros(patches, self.visual.patch_embed.patch_numel), grid

    def encode_multimodal(self, modality: str, pixel_values: torch.Tensor,
                          grid_thw: torch.Tensor | None = None) -> list[torch.Tensor]:
        if modality not in self.modalities:
            raise ValueError(f"modality={modality!r} must be one of {self.modalities}")
        if grid_thw is None:
            raise ValueError("Qwen2.5-VL needs grid_thw with pixel_values")
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.int64).reshape(-1, 3)
        with torch.no_grad():
            out = self.visual(pixel_values.to(self.device, self.dtype), grid_thw)
        sizes = [self.num_placeholder_tokens(modality, g) for g in grid_thw.tolist()]
        return list(out.split(sizes))

    def mrope_positions(self, token_ids: list[int], items: list) -> tuple[np.ndarray, int]:
        from tidal.models.qwen2_5_vl_vision import mrope_positions

        images = [i.grid_thw for i in items if i.modality == "image"]
        videos = [i for i in items if i.modality == "video"]
        return mrope_positions(
            np.asarray(token_ids, dtype=np.int64),
            np.asarray(images, dtype=np.int64).reshape(-1, 3) if images else None,
            np.asarray([v.grid_thw for v in videos], dtype=np.int64).reshape(-1, 3) if videos else None,
            [v.second_per_grid_t for v in videos] if videos else None,
            image_token_id=self.placeholder_token_ids["image"], video_token_id=self.placeholder_token_ids["video"],
            vision_start_token_id=self.vision_start_token_id, spatial_merge_size=self.merge_size,
            tokens_per_second=self.tokens_per_second)

    def _parts(self) -> dict[str, nn.Module]:
        return {"visual": self.visual}

    def _save_name(self, part: str, local: str) -> str:
        return local if part == "text" else f"{part}.{local}"
