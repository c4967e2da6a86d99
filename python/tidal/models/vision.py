"""ViT image encoders of vision-language models: CLIP's and SigLIP's vision towers, as LLaVA uses them.

The encoder runs once per new image (the serving engine caches its output by the image's content
hash), so it is written with plain torch ops rather than tidal's paged-attention kernels: every
image is a full, non-causal sequence of ``num_patches`` (+1 class token for CLIP) positions.

Parameter names equal the Hugging Face checkpoint's below the tower's prefix
(``embeddings.patch_embedding.weight``, ``encoder.layers.0.self_attn.q_proj.weight``, ...), so a
loader maps ``vision_tower.<name>`` to ``named_parameters()`` directly. SigLIP's attention-pooling
head is not built: no vision-language model reads it (a loader skips its tensors).
"""

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def activation(name: str, source: str = "config"):
    """The elementwise function transformers' ACT2FN names ``name``; ValueError for one tidal lacks."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"{source}: activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dtype, device):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vision hidden_size={dim} must be a multiple of num_attention_heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.k_proj = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.v_proj = nn.Linear(dim, dim, dtype=dtype, device=device)
        self.out_proj = nn.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape

        def heads(t):
            return t.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, dim))


class _MLP(nn.Module):
    def __init__(self, dim: int, inner: int, act, dtype, device):
        super().__init__()
        self.fc1 = nn.Linear(dim, inner, dtype=dtype, device=device)
        self.fc2 = nn.Linear(inner, dim, dtype=dtype, device=device)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, inner: int, heads: int, eps: float, act, dtype, device):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)
        self.self_attn = _Attention(dim, heads, dtype, device)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)
        self.mlp = _MLP(dim, inner, act, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, layers: list[_EncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _Embeddings(nn.Module):
    """Patches (a strided convolution) plus learned positions; CLIP prepends a class token."""

    def __init__(self, cfg: dict, class_token: bool, dtype, device):
        super().__init__()
        dim, patch, size = int(cfg["hidden_size"]), int(cfg["patch_size"]), int(cfg["image_size"])
        self.image_size, self.patch_size = size, patch
        self.num_patches = (size // patch) ** 2
        self.patch_embedding = nn.Conv2d(int(cfg.get("num_channels", 3)), dim, patch, stride=patch,
                                         bias=not class_token, dtype=dtype, device=device)
        self.class_embedding = nn.Parameter(torch.empty(dim, dtype=dtype, device=device)) if class_token else None
        self.position_embedding = nn.Embedding(self.num_patches + int(class_token), dim, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"pixel_values are {height}x{width}; the vision tower takes "
                             f"{self.image_size}x{self.image_size} images")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(batch, 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """CLIP's (``clip_vision_model``) or SigLIP's (``siglip_vision_model``) vision tower.

    ``forward(pixel_values [batch, 3, H, W], layers)`` returns the hidden states after each encoder
    layer index in ``layers`` (transformers' ``hidden_states`` numbering: 0 is the embeddings, after
    CLIP's pre-layernorm; ``i`` the output of layer ``i``; negative indices count from the end), each
    ``[batch, seq, hidden_size]``. Layers past the deepest one asked for are not run.
    """

    def __init__(self, cfg: dict, dtype, device):
        super().__init__()
        kind = cfg.get("model_type", "clip_vision_model")
        if kind not in VISION_TOWERS:
            raise ValueError(f"vision_config model_type={kind!r} is not supported; supported: "
                             f"{', '.join(VISION_TOWERS)}")
        self.kind = kind
        is_clip = kind == "clip_vision_model"
        dim = int(cfg["hidden_size"])
        eps = float(cfg.get("layer_norm_eps", 1e-5 if is_clip else 1e-6))
        act = activation(cfg.get("hidden_act", "quick_gelu" if is_clip else "gelu_pytorch_tanh"), "vision_config")
        self.hidden_size = dim
        self.num_layers = int(cfg["num_hidden_layers"])
        self.embeddings = _Embeddings(cfg, is_clip, dtype, device)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device) if is_clip else None
        self.encoder = _Encoder([_EncoderLayer(dim, int(cfg["intermediate_size"]), int(cfg["num_attention_heads"]),
                                               eps, act, dtype, device) for _ in range(self.num_layers)])
        # Only the pooled output reads post_layernorm (CLIP) or the last hidden state (SigLIP); kept
        # so checkpoints round-trip.
        self.post_layernorm = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)

    @property
    def num_positions(self) -> int:
        """Tokens per image: patches, plus CLIP's class token."""
        return self.embeddings.num_patches + int(self.embeddings.class_embedding is not None)

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        wanted = [self._layer_index(i) for i in layers]
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        return [states[i] for i in wanted]

    def _layer_index(self, index: int) -> int:
        i = index + self.num_layers + 1 if index < 0 else index
        if not 0 <= i <= self.num_layers:
            raise ValueError(f"vision_feature_layer={index} is outside the tower's {self.num_layers + 1} hidden states")
        return i
