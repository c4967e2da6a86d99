"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 and Qwen3 from one definition, chosen by config,
and their mixture-of-experts variants Mixtral, Qwen2-MoE and Qwen3-MoE (tidal.models.moe).

One set of weights, two forward modes:

- serving: a flat batch of new tokens (``input_ids [num_tokens]``) with positions, an
  :class:`AttentionMetadata` and a paged KV cache per layer; tidal's fused ops throughout
  (``rms_norm`` / ``fused_add_rms_norm_`` carrying the residual stream, ``rotary_embedding_and_cache_``
  on views of the fused qkv output (q/k norm, rotary and the cache write in one kernel),
  ``paged_attention``, ``silu_and_mul``).
  Returns the final hidden states; :meth:`LlamaForCausalLM.compute_logits` turns the rows the
  sampler needs into fp32 logits.
- training: ``input_ids [batch, seq]`` without metadata; differentiable ops (tidal's kernels with
  their backward kernels, torch's ``scaled_dot_product_attention``) and logits ``[batch, seq, vocab]``,
  or the loss through the fused LM head. Each norm runs with the projection after it, and
  silu_and_mul with ``down_proj``, as one autograd function (tidal.models.fused) that recomputes the
  elementwise result in the backward pass instead of keeping it; rotary embedding rotates q and k in
  place in the qkv output, which attention reads through views.

Parameters are fused where the kernels want them fused: ``qkv_proj`` holds the q, k and v rows (in
that order) of Hugging Face's three projections, ``gate_up_proj`` the gate then up rows.
:meth:`LlamaForCausalLM.load_weights` and :meth:`LlamaForCausalLM.hf_state_dict` translate to and from
Hugging Face's tensor names.
"""

import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import tidal.ops as ops
from tidal import checkpointing
from tidal.models import rope
from tidal.models.attention import AttentionMetadata
from tidal.models.config import ModelConfig
from tidal.models.fused import gated_linear, inverse_rotary_table, norm_linear, rotary_qkv_
from tidal.models.losses import fused_linear_cross_entropy
from tidal.models.moe import SparseMoeBlock

ACTIVATION_CHECKPOINTING_POLICIES = (None, "full", "attention", "mlp")
# Serving steps of up to this many tokens run dense layers through ops.skinny_linear on a GPU (at most
# ops.linear.MAX_ROWS; 0 turns it off; None: skinny_max_tokens() decides by the card).
# NOTE(tidal): on sm_90 the op streams the weight through shared memory by bulk copies (one block per
# SM, 128 KB in flight each); on an H100 (bench/RESULTS.md, 2026-12-07) a Llama-3-8B layer's four
# projections at batch 1 take 167.9 us that way against 176.6 us as cuBLAS plus the separate norm
# and activation kernels, and S2 6.17 ms against 6.38; at m = 2 gate_up is even (99.2 against 100.5
# us), at m = 4 slower (104.1 against 99.9). Before sm_90 the op's register-streamed kernel lost to
# cuBLAS (S2 5.07 against 5.01 ms on an H200), so it is off there.
SKINNY_MAX_TOKENS: int | None = None
_SKINNY_SM90_TOKENS = 2
# Whether each projection of the skinny path has L2 prefetch the next one's weight (ops.skinny_linear's
# prefetch: qkv -> o_proj -> gate_up -> down -> the next layer's qkv or lm_head).
# NOTE(tidal): off: measured slower on an H100 (bench/RESULTS.md, 2026-12-07, late: S2 6.22 ms per token
# with it against 6.10 and 6.10 without, one call, `bench/serve.py --workloads S2 --skinny-prefetch`);
# programmatic launch already overlaps each projection's first reads with the kernel before. Not yet
# measured on an H200.
SKINNY_PREFETCH = False


# Whether the kernel before a projection that quantizes its input to FP8 per token (W8A8 with dynamic
# scales: a model served with quantization="fp8", at more rows than the weight-only kernel takes)
# writes the codes itself: the norms before qkv and gate_up (ops.quant.fused_add_rms_norm_quant_fp8_)
# and the activation before down_proj (ops.quant.silu_and_mul_quant_fp8_), one kernel each on the GPU
# instead of that kernel and the quantizer. The same codes either way; off until measured on a GPU
# (`bench/serve.py --fused-fp8-quant`).
FUSED_FP8_QUANT = False


class _Fp8Rows(NamedTuple):
    """A norm's or the activation's output as FP8 codes with per-row scales, for a W8A8 projection
    (FUSED_FP8_QUANT)."""
    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def _takes_fp8_rows(linear: nn.Module | None, x: torch.Tensor) -> bool:
    if not FUSED_FP8_QUANT:  # checked first: the attribute lookup below raises inside nn.Module for a float layer
        return False
    quantizes = getattr(linear, "quantizes_activations", None)
    return quantizes is not None and x.dim() == 2 and quantizes(x)


def _add_norm(hidden: torch.Tensor, residual: torch.Tensor, norm: "RMSNorm", linear: nn.Module | None):
    """``residual += hidden``, then ``norm(residual)`` for ``linear``: in ``hidden`` (in place), or as
    _Fp8Rows where the projection quantizes its input to FP8 and FUSED_FP8_QUANT holds."""
    if _takes_fp8_rows(linear, hidden):
        return _Fp8Rows(*ops.quant.fused_add_rms_norm_quant_fp8_(hidden, residual, norm.weight, norm.eps), hidden.dtype)
    ops.fused_add_rms_norm_(hidden, residual, norm.weight, norm.eps)
    return hidden


def _project(linear: nn.Module, x: "torch.Tensor | _Fp8Rows") -> torch.Tensor:
    if isinstance(x, _Fp8Rows):
        return linear.forward_fp8(x.codes, x.scale, x.dtype)
    return linear(x)


def _prefetch(linear: nn.Module) -> torch.Tensor | None:
    return _stored_weight(linear) if SKINNY_PREFETCH else None


def _stored_weight(linear: nn.Module) -> torch.Tensor | None:
    """The tensor a projection's weight is read from: its weight, or a quantized one's codes."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = getattr(linear, "qweight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _skinny_weight(linear: nn.Module) -> dict:
    """ops.skinny_linear's weight arguments for a projection: its weight and bias, or a quantized
    one's (tidal.quant.QuantLinear) codes, format, scales and zero points."""
    if getattr(linear, "qweight", None) is None:
        return dict(weight=linear.weight, bias=linear.bias)
    return dict(weight=linear.qweight, bias=linear.bias, weight_format=linear.format, scales=linear.scales,
                zeros=linear.zeros)


@functools.lru_cache(maxsize=None)
def _skinny_tokens_for(device: torch.device) -> int:
    return _SKINNY_SM90_TOKENS if torch.cuda.get_device_capability(device)[0] >= 9 else 0


def skinny_max_tokens(device: torch.device) -> int:
    """The most tokens a serving step may have to run its dense layers through ops.skinny_linear on
    ``device``: SKINNY_MAX_TOKENS where set, else 2 on a GPU of sm_90 or later and 0 elsewhere."""
    if device.type != "cuda":
        return 0
    limit = SKINNY_MAX_TOKENS if SKINNY_MAX_TOKENS is not None else _skinny_tokens_for(device)
    return min(limit, ops.linear.MAX_ROWS)


_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def _linear(in_features: int, out_features: int, bias: bool, dtype, device) -> nn.Linear:
    # Uninitialised: the weights come from a checkpoint or initialize_weights().
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=dtype, device=device)


class LMHead(nn.Linear):
    """The language-model head: ``head(x)`` gives logits; ``head(x, labels)`` the mean cross-entropy
    through fused_linear_cross_entropy (the logits never materialised). Going through the module
    call either way lets ZeRO stage 3 gather the (possibly tied) weight around its use."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return fused_linear_cross_entropy(x, self.weight, labels, bias=self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, device):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = config.layer_sliding_window(layer)
        self.qkv_proj = _linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias,
                                dtype, device)
        self.o_proj = _linear(self.q_size, config.hidden_size, config.o_proj_bias, dtype, device)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                attn: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Serving. ``hidden`` [num_tokens, hidden_size] (or those rows as FP8 codes for a W8A8 qkv_proj)
        -> [num_tokens, hidden_size]."""
        out = self._attend(_project(self.qkv_proj, hidden), positions, cos_sin_cache, attn, kv_cache)
        return self.o_proj(out)

    def forward_skinny(self, residual: torch.Tensor, norm: "RMSNorm", positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, attn: AttentionMetadata,
                       kv_cache: tuple[torch.Tensor, torch.Tensor], next_weight: torch.Tensor | None = None) -> None:
        """Serving at a few tokens on the GPU: ``residual += o_proj(attention(qkv_proj(norm(residual))))``,
        the norm fused into the qkv projection and the add into o_proj (ops.skinny_linear). Under
        SKINNY_PREFETCH qkv prefetches o_proj's weight into L2; o_proj prefetches ``next_weight``
        (None: nothing)."""
        qkv = ops.skinny_linear(residual, **_skinny_weight(self.qkv_proj), norm_weight=norm.weight, eps=norm.eps,
                                prefetch=_prefetch(self.o_proj))
        out = self._attend(qkv, positions, cos_sin_cache, attn, kv_cache)
        ops.skinny_linear(out, **_skinny_weight(self.o_proj), residual=residual, prefetch=next_weight)

    def _attend(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                attn: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q/k norm, rotary, the cache write and paged attention from ``qkv``
        [num_tokens, q_size + 2 * kv_size]; returns [num_tokens, q_size]."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # strided views of qkv, no copies
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        # NOTE(tidal): one kernel for Qwen3's q/k norm, rotary on q and k, and the K/V cache write.
        ops.rotary_embedding_and_cache_(positions, q, k, v, key_cache, value_cache, attn.slot_mapping, cos_sin_cache,
                                        True, self.q_norm.weight if self.qk_norm else None,
                                        self.k_norm.weight if self.qk_norm else None,
                                        self.q_norm.eps if self.qk_norm else 1e-6)
        out = ops.paged_attention(q, key_cache, value_cache, attn.block_tables, attn.seq_lens,
                                  attn.cu_seqlens_q, self.scale,
                                  -1 if self.sliding_window is None else self.sliding_window,
                                  attn.max_seqlen_q, attn.max_seqlen_k, attn.split_counters, attn.seq_order)
        return out.reshape(num_tokens, self.q_size)

    def forward_train(self, qkv: torch.Tensor, positions: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                      in_place: bool = True) -> torch.Tensor:
        """Training, from the qkv projection's output ``qkv`` [batch, seq, q_size + 2 * kv_size];
        ``positions`` [batch * seq] rows of the rotary tables for each token; ``tables`` the rotary
        table (cos then sin halves, fp32) and its inverse (tidal.models.fused.inverse_rotary_table).
        ``in_place``: rotate q and k inside ``qkv`` (not when module backward hooks hand ``qkv`` over
        as a view, as ZeRO stage 3's do)."""
        batch, seq = qkv.shape[:2]
        if self.qk_norm or not in_place:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(batch * seq, self.num_heads, self.head_dim)
            k = k.reshape(batch * seq, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = ops.rotary_embedding(positions, q, k, tables[0])  # the fused kernel, differentiable
        else:  # rotated in place: attention reads q, k and v as views of one buffer
            qkv = rotary_qkv_(qkv, positions, *tables, self.num_heads, self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]
        k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        kwargs = {}
        if self.num_kv_heads != self.num_heads:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                groups = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.sliding_window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kwargs)
        else:
            i = torch.arange(seq, device=qkv.device)
            distance = i[:, None] - i[None, :]  # query - key
            mask = (distance >= 0) & (distance < self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, **kwargs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = _linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias,
                                    dtype, device)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, config.mlp_bias, dtype, device)

    def forward(self, x: "torch.Tensor | _Fp8Rows") -> torch.Tensor:
        gate_up = _project(self.gate_up_proj, x)
        if _takes_fp8_rows(self.down_proj, gate_up):  # the activation writes down_proj's FP8 input itself
            return _project(self.down_proj, _Fp8Rows(*ops.quant.silu_and_mul_quant_fp8_(gate_up), gate_up.dtype))
        return self.down_proj(ops.silu_and_mul(gate_up))

    def forward_train(self, gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
        """Training, from the gate_up projection's output; ``fused``: silu_and_mul and down_proj as
        one autograd function that does not keep the activation (tidal.models.fused.gated_linear)."""
        if fused:
            return gated_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(ops.silu_and_mul(gate_up))  # the fused op, differentiable


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = SparseMoeBlock(config, dtype, device) if config.is_moe_layer(layer) else LlamaMLP(config, dtype, device)
        # NOTE(tidal): dense layers run decode steps of up to skinny_max_tokens() tokens on the GPU
        # through ops.skinny_linear (Llama-3-8B at batch 1: 6 instead of 10 kernels a layer).
        self.skinny_ok = isinstance(self.mlp, LlamaMLP)

    def forward(self, hidden, residual, positions, cos_sin_cache, attn, kv_cache, next_weight=None):
        """Serving. Returns (hidden, residual): the residual stream stays un-normalised in
        ``residual`` and each norm adds the previous block's output into it in place; hidden None
        means nothing is pending (the skinny path below added it already). ``next_weight``: the
        weight the model reads after this layer, for the skinny path to prefetch into L2 (None:
        nothing; the model passes it under SKINNY_PREFETCH)."""
        num_tokens = (hidden if hidden is not None else residual).shape[0]
        if self.skinny_ok and num_tokens <= skinny_max_tokens(positions.device):
            return self._forward_skinny(hidden, residual, positions, cos_sin_cache, attn, kv_cache, next_weight)
        norm = self.input_layernorm
        if residual is None:
            residual, hidden = hidden, norm(hidden)
        elif hidden is None:
            hidden = norm(residual)
        else:
            hidden = _add_norm(hidden, residual, norm, self.self_attn.qkv_proj)
        hidden = self.self_attn(hidden, positions, cos_sin_cache, attn, kv_cache)
        hidden = _add_norm(hidden, residual, self.post_attention_layernorm, getattr(self.mlp, "gate_up_proj", None))
        return self.mlp(hidden), residual

    def _forward_skinny(self, hidden, residual, positions, cos_sin_cache, attn, kv_cache, next_weight):
        """The serving layer for a few tokens on the GPU: four ops.skinny_linear calls (norm into
        qkv, o_proj adding into the residual, norm into gate_up, silu_and_mul into down_proj adding
        into the residual) around rotary and attention. Returns (None, residual)."""
        if residual is None:
            residual = hidden  # the embeddings: a fresh tensor, accumulated into in place
        elif hidden is not None:
            residual.add_(hidden)
        mlp, norm = self.mlp, self.post_attention_layernorm
        self.self_attn.forward_skinny(residual, self.input_layernorm, positions, cos_sin_cache, attn, kv_cache,
                                      _prefetch(mlp.gate_up_proj))
        gate_up = ops.skinny_linear(residual, **_skinny_weight(mlp.gate_up_proj), norm_weight=norm.weight,
                                    eps=norm.eps, prefetch=_prefetch(mlp.down_proj))
        ops.skinny_linear(gate_up, **_skinny_weight(mlp.down_proj), gated=True, residual=residual,
                          prefetch=next_weight)
        return None, residual

    def forward_train(self, x: torch.Tensor, positions: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                      recompute: str | None = None, fused: bool = True) -> torch.Tensor:
        """Training. ``recompute`` (see LlamaForCausalLM.set_activation_checkpointing): "attention" or
        "mlp" recomputes that half of the layer in the backward pass instead of keeping its
        activations; a MoE block is never recomputed (its auxiliary losses keep their graph).
        ``fused`` (LlamaForCausalLM.fuse_across_modules): each norm and the projection after it as
        one autograd function (tidal.models.fused), and silu_and_mul with down_proj likewise."""
        if recompute == "attention":
            x = x + checkpointing.checkpoint(self._attention_half, x, positions, tables, fused)
        else:
            x = x + self._attention_half(x, positions, tables, fused)
        if recompute == "mlp" and not isinstance(self.mlp, SparseMoeBlock):
            return x + checkpointing.checkpoint(self._mlp_half, x, fused)
        return x + self._mlp_half(x, fused)

    def _attention_half(self, x: torch.Tensor, positions: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                        fused: bool) -> torch.Tensor:
        return self.self_attn.forward_train(_norm_linear(self.input_layernorm, self.self_attn.qkv_proj, x, fused),
                                            positions, tables, in_place=fused)

    def _mlp_half(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        if isinstance(self.mlp, SparseMoeBlock):
            return self.mlp(self.post_attention_layernorm(x), train=True)
        gate_up = _norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, x, fused)
        return self.mlp.forward_train(gate_up, fused)


def _tensor_names(linear: nn.Module) -> tuple[str, ...]:
    """The checkpoint tensors of a (possibly quantized, tidal.quant.QuantLinear) linear layer."""
    names = getattr(linear, "tensor_names", None)
    if names is not None:
        return names
    return ("weight", "bias") if linear.bias is not None else ("weight",)


def _norm_linear(norm: RMSNorm, linear: nn.Linear, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """``linear(norm(x))``; as one autograd function keeping ``x`` only when ``fused``, else through
    the two module calls (ZeRO stage 3 gathers each module's parameters around its own call)."""
    if fused:
        return norm_linear(x, norm.weight, norm.eps, linear.weight, linear.bias)
    return linear(norm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device):
        super().__init__()
        self.embed_tokens = nn.utils.skip_init(nn.Embedding, config.vocab_size, config.hidden_size,
                                               dtype=dtype, device=device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM (Llama 2/3, Mistral, Qwen2, Qwen3), parameters fused for tidal's ops.

    Parameters
    ----------
    config : ModelConfig
        The parsed config.json.
    dtype : torch.dtype
        Parameter and activation dtype (the rotary table is always fp32).
    device : torch.device or str
        Where parameters live. They are left uninitialised: call :meth:`load_weights` or
        :meth:`initialize_weights`. Under ``tidal.zero.Init`` they go to the meta device whatever
        ``device`` says (``tidal.initialize`` then builds them a module at a time into the shards).

    Attributes
    ----------
    num_layers, num_kv_heads, head_dim : int
        What the engine needs to allocate KV caches: one ``(key_cache, value_cache)`` pair per layer,
        each ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the model's dtype.
    cos_sin_cache : torch.Tensor
        ``[num_positions, head_dim]`` fp32 rotary table (buffer, not saved): ``max_position_embeddings``
        rows, more after :meth:`ensure_rope_positions`.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        from tidal import zero

        if zero.is_active():
            device = "meta"
        self.config = config
        self.activation_checkpointing: str | None = None  # see set_activation_checkpointing
        # NOTE(tidal): the training forward fuses ops across sibling modules (a norm and the linear
        # after it): ZeRO stage 3, which gathers each module's parameters only around that module's
        # own call, sets this to False.
        self.fuse_across_modules = True
        # tidal.models.tensor_parallel.shard_ sets this rank's group: the logits are then gathered
        self.tp = None
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.model = LlamaModel(config, dtype, device)
        self.lm_head = nn.utils.skip_init(LMHead, config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                          device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._dynamic_rope = config.rope_scaling is not None and config.rope_scaling["rope_type"] == "dynamic"
        # NOTE(tidal): a model built on the meta device (tidal.zero.Init) still needs its rotary table:
        # it is computed on the CPU and moves with the model.
        rope_device = torch.device("cpu") if torch.device(device).type == "meta" else torch.device(device)
        with rope_device:  # also overrides a meta default device for the table's intermediates
            cache = rope.build_cos_sin_cache(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                             config.rope_scaling, device=rope_device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's key (and value) cache."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Bytes one block takes over all layers, keys and values: what to divide free memory by."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * itemsize

    def ensure_rope_positions(self, num_positions: int) -> None:
        """Grow ``cos_sin_cache`` to cover positions ``0 .. num_positions - 1`` (no-op when it does).

        The table starts at ``max_position_embeddings`` rows and the serving forward grows it on
        demand (max_model_len past that, e.g. with llama3 or linear RoPE scaling); an engine that
        captures CUDA graphs calls this with its max_model_len first, so the table's address is fixed.
        Dynamic NTK needs no rows past ``max_position_embeddings``: longer sequences get their own.
        """
        rows = self.cos_sin_cache.shape[0]
        if num_positions <= rows or self._dynamic_rope:
            return
        cfg = self.config
        self.cos_sin_cache = rope.build_cos_sin_cache(cfg.head_dim, max(num_positions, 2 * rows), cfg.rope_theta,
                                                      cfg.rope_scaling, device=self.cos_sin_cache.device)

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionMetadata | None = None,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Serving (``attn`` given) or training (``attn`` None) forward.

        Serving: ``input_ids`` and ``positions`` ``[num_tokens]`` int64 (sequence after sequence, as
        ``attn.cu_seqlens_q`` says), ``kv_caches`` one ``(key_cache, value_cache)`` per layer, each
        ``[num_blocks, block_size, num_kv_heads, head_dim]``; the new tokens' keys and values are
        written at ``attn.slot_mapping``. Returns the final-normed hidden states
        ``[num_tokens, hidden_size]`` (feed the rows to sample to :meth:`compute_logits`). Runs
        without autograd. ``inputs_embeds`` ``[num_tokens, hidden_size]`` replaces the token
        embeddings (a vision-language model's, with image features at the placeholder rows; it is
        written to in place). With multimodal rotary positions (``config.mrope_section``),
        ``positions`` may be ``[3, num_tokens]``: temporal, height and width position per token.

        Training: ``input_ids`` ``[batch, seq]``, every sequence starting at position 0 (right
        padding is harmless under the causal mask). Returns logits ``[batch, seq, vocab_size]`` in
        the model's dtype, differentiable; or, with ``labels`` (``[batch, seq]``, as transformers'
        ``labels``: position t's label is predicted from positions < t, -100 ignored), the mean
        next-token cross-entropy, computed by :func:`tidal.models.losses.fused_linear_cross_entropy`
        without materialising the logits.
        """
        if attn is None:
            if self.tp is not None:
                raise ValueError("a tensor-parallel model (tidal.models.tensor_parallel) has a serving forward only")
            if labels is not None:
                if labels.shape != input_ids.shape:
                    raise ValueError(f"labels.shape={tuple(labels.shape)} must equal input_ids.shape="
                                     f"{tuple(input_ids.shape)}")
                hidden = self._forward_train(input_ids, head=False)[:, :-1]
                return self.lm_head(hidden, labels[:, 1:])
            return self._forward_train(input_ids)
        if positions is None or kv_caches is None:
            raise ValueError("serving forward needs positions and kv_caches along with attn")
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"len(kv_caches)={len(kv_caches)} must equal num_layers={self.num_layers}")
        with torch.no_grad():
            rope_positions, cos_sin_cache = self._rope_inputs(positions, attn)
            hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
            for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
                hidden, residual = layer(hidden, residual, rope_positions, cos_sin_cache, attn, kv_cache,
                                         self._weight_after(i) if SKINNY_PREFETCH else None)
            norm = self.model.norm
            if hidden is None:
                return ops.rms_norm(residual, norm.weight, norm.eps)
            ops.fused_add_rms_norm_(hidden, residual, norm.weight, norm.eps)
            return hidden

    def _weight_after(self, layer: int) -> torch.Tensor | None:
        """The weight the serving forward reads after ``layer``'s (the next layer's qkv projection, or
        the LM head after the last, a quantized projection's codes): what the skinny path prefetches."""
        layers = self.model.layers
        return _stored_weight(layers[layer + 1].self_attn.qkv_proj if layer + 1 < len(layers) else self.lm_head)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [num_rows, hidden_size] -> logits [num_rows, vocab_size] fp32; or, with ``out``
        ([num_rows, vocab_size] in the model's dtype), the logits written there unwidened."""
        with torch.no_grad():
            if self.tp is not None:  # this rank's range of the vocabulary, then every rank's
                if self.tp.driver is not None:  # the engine's rank: the others compute these rows too
                    self.tp.driver.announce_logits(hidden)
                local = torch.nn.functional.linear(hidden, self.lm_head.weight, self.lm_head.bias)
                logits = self.tp.all_gather(local, dim=1)[:, :self.config.vocab_size]
                return logits.float() if out is None else out.copy_(logits)
            if out is not None and hidden.shape[0] <= skinny_max_tokens(hidden.device):
                return ops.skinny_linear(hidden, self.lm_head.weight, self.lm_head.bias, out=out)
            if out is not None:
                bias = self.lm_head.bias
                return torch.matmul(hidden, self.lm_head.weight.t(), out=out) if bias is None else \
                    torch.addmm(bias, hidden, self.lm_head.weight.t(), out=out)
            return self.lm_head(hidden).float()

    def _rope_inputs(self, positions: torch.Tensor, attn: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, table) for rotary_embedding_: the model's table, unless a sequence is past
        max_position_embeddings under dynamic NTK (see tidal.models.rope): then a per-token table
        ``[num_tokens, head_dim]`` indexed by row number, with those sequences' rows computed for
        their own length. The check reads only ``attn.max_seqlen_k`` (a host int): no sync otherwise.
        Multimodal positions ``[3, num_tokens]`` likewise get a per-token table, each rotary
        frequency taking the component ``config.mrope_section`` assigns it."""
        if positions.dim() == 2:
            return self._mrope_inputs(positions)
        max_pos = self.config.max_position_embeddings
        if not self._dynamic_rope or attn.max_seqlen_k <= max_pos:
            self.ensure_rope_positions(attn.max_seqlen_k)
            return positions, self.cos_sin_cache
        cfg = self.config
        # [num_tokens, head_dim]; rows of the sequences past max_pos are overwritten below
        table = self.cos_sin_cache[positions.clamp(max=self.cos_sin_cache.shape[0] - 1)]
        cu, seq_lens = attn.cu_seqlens_q.tolist(), attn.seq_lens.tolist()
        for s, seq_len in enumerate(seq_lens):
            if seq_len > max_pos and cu[s + 1] > cu[s]:
                freqs = rope.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len, max_pos)
                table[cu[s]:cu[s + 1]] = rope.cos_sin(positions[cu[s]:cu[s + 1]], freqs)
        return torch.arange(positions.shape[0], dtype=positions.dtype, device=positions.device), table

    def _mrope_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row numbers, per-token table) for positions ``[3, num_tokens]``: the table's columns of
        frequency ``i`` (cos and sin halves) come from the row of the component section ``i`` is in.
        The caller makes sure the table covers the largest position (ensure_rope_positions)."""
        section = self.config.mrope_section
        if section is None or positions.shape[0] != len(section):
            raise ValueError(f"positions of shape {tuple(positions.shape)} need a model with multimodal rotary "
                             f"positions of {positions.shape[0]} components; mrope_section={section}")
        rows = [self.cos_sin_cache[p] for p in positions]  # each [num_tokens, head_dim]
        table = rows[0].clone()
        half, start = self.cos_sin_cache.shape[1] // 2, 0
        for component, width in enumerate(section):
            if component:
                for offset in (0, half):  # the cos half, then the sin half
                    table[:, offset + start:offset + start + width] = rows[component][:, offset + start:offset + start + width]
            start += width
        return torch.arange(positions.shape[1], dtype=positions.dtype, device=positions.device), table

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The training forward's final-normed hidden states ``[batch, seq, hidden_size]``,
        differentiable: what a head other than the LM head reads (a reward model's score)."""
        return self._forward_train(input_ids, head=False)

    def _forward_train(self, input_ids: torch.Tensor, head: bool = True) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq] without attn metadata, got shape {tuple(input_ids.shape)}")
        cfg, seq = self.config, input_ids.shape[1]
        if seq <= self.cos_sin_cache.shape[0]:
            table = self.cos_sin_cache[:seq]
        else:  # past max_position_embeddings: dynamic NTK rescales (transformers: seq_len = seq)
            freqs = rope.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq, cfg.max_position_embeddings)
            table = rope.cos_sin(torch.arange(seq, device=input_ids.device), freqs)
        table = table.float().contiguous()
        tables = (table, inverse_rotary_table(table))
        positions = torch.arange(seq, device=input_ids.device).repeat(input_ids.shape[0])  # [batch * seq]
        x = self.model.embed_tokens(input_ids)
        policy, fused = self.activation_checkpointing, self.fuse_across_modules
        for layer in self.model.layers:
            if policy == "full" and not isinstance(layer.mlp, SparseMoeBlock):
                x = checkpointing.checkpoint(layer.forward_train, x, positions, tables, None, fused)
            else:  # a MoE layer under "full" recomputes its attention half only
                x = layer.forward_train(x, positions, tables, "attention" if policy == "full" else policy, fused)
        x = self.model.norm(x)
        return self.lm_head(x) if head else x

    def set_activation_checkpointing(self, policy: str | None) -> None:
        """Per-layer activation checkpointing of the training forward (tidal.checkpointing):
        ``"full"`` keeps only each layer's input and recomputes the layer in the backward pass;
        ``"attention"`` or ``"mlp"`` recompute only that half of every layer and keep the other's
        activations (selective); None keeps everything. MoE blocks are never recomputed."""
        if policy not in ACTIVATION_CHECKPOINTING_POLICIES:
            raise ValueError(f"policy={policy!r} must be one of {ACTIVATION_CHECKPOINTING_POLICIES}")
        self.activation_checkpointing = policy

    # ---- weights -----------------------------------------------------------------------------------

    def _hf_targets(self) -> dict[str, tuple[torch.Tensor, int | None, int | None]]:
        """Hugging Face tensor name -> (parameter, first row, end row) it occupies (rows None = all)."""
        cfg = self.config
        targets = {"model.embed_tokens.weight": (self.model.embed_tokens.weight, None, None)}
        for i, layer in enumerate(self.model.layers):
            p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            q, kv = attn.q_size, attn.kv_size
            for suffix in _tensor_names(attn.qkv_proj):
                fused = getattr(attn.qkv_proj, suffix)
                # one static input scale and one input order (act-order) for the fused layer
                rows = (None, None) if suffix in ("input_scale", "g_idx") else None
                targets[f"{p}self_attn.q_proj.{suffix}"] = (fused, *(rows or (0, q)))
                targets[f"{p}self_attn.k_proj.{suffix}"] = (fused, *(rows or (q, q + kv)))
                targets[f"{p}self_attn.v_proj.{suffix}"] = (fused, *(rows or (q + kv, q + 2 * kv)))
            for suffix in _tensor_names(attn.o_proj):
                targets[f"{p}self_attn.o_proj.{suffix}"] = (getattr(attn.o_proj, suffix), None, None)
            if cfg.qk_norm:
                targets[f"{p}self_attn.q_norm.weight"] = (attn.q_norm.weight, None, None)
                targets[f"{p}self_attn.k_norm.weight"] = (attn.k_norm.weight, None, None)
            if isinstance(mlp, SparseMoeBlock):
                targets.update(mlp.hf_targets(p, "mixtral" if cfg.architecture == "MixtralForCausalLM" else "qwen"))
            inter = cfg.intermediate_size
            for suffix in () if isinstance(mlp, SparseMoeBlock) else _tensor_names(mlp.gate_up_proj):
                fused = getattr(mlp.gate_up_proj, suffix)
                rows = (None, None) if suffix in ("input_scale", "g_idx") else None
                targets[f"{p}mlp.gate_proj.{suffix}"] = (fused, *(rows or (0, inter)))
                targets[f"{p}mlp.up_proj.{suffix}"] = (fused, *(rows or (inter, 2 * inter)))
            for suffix in () if isinstance(mlp, SparseMoeBlock) else _tensor_names(mlp.down_proj):
                targets[f"{p}mlp.down_proj.{suffix}"] = (getattr(mlp.down_proj, suffix), None, None)
            targets[f"{p}input_layernorm.weight"] = (layer.input_layernorm.weight, None, None)
            targets[f"{p}post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, None, None)
        targets["model.norm.weight"] = (self.model.norm.weight, None, None)
        if not cfg.tie_word_embeddings:
            targets["lm_head.weight"] = (self.lm_head.weight, None, None)
        return targets

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters, converting dtype and device.

        ``rotary_emb.inv_freq`` buffers are skipped, and so is ``lm_head.weight`` when the
        embeddings are tied. Raises ValueError naming the tensor for an unexpected name or a shape
        mismatch, and naming the missing ones once ``weights`` is exhausted.
        """
        targets, loaded = self._hf_targets(), set()
        with torch.no_grad():
            for name, tensor in weights:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                if name not in targets:
                    raise ValueError(f"unexpected tensor {name!r} for {self.config.architecture}")
                param, lo, hi = targets[name]
                dst = param if lo is None else param[lo:hi]
                if name.endswith(".scales") and tensor.numel() == 1:  # one scale for the whole layer
                    tensor = tensor.reshape(1, 1).expand(dst.shape)
                if tuple(tensor.shape) != tuple(dst.shape):
                    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
                if name.endswith(".input_scale"):  # fused layers take the largest of their parts' scales
                    tensor = torch.maximum(dst, tensor.to(dst.device))  # starts at 0
                if name.endswith(".g_idx") and bool((dst >= 0).all()) and not torch.equal(dst, tensor.to(dst.device)):
                    raise ValueError(f"tensor {name!r} orders its inputs (act-order g_idx) unlike the other layers "
                                     f"fused with it; tidal needs one order per fused layer")
                dst.copy_(tensor)
                loaded.add(name)
        missing = [name for name in targets if name not in loaded]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint: {shown}")

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` in Hugging Face's unfused layout (no ``lm_head.weight`` when tied).

        The tensors are detached views of the parameters (row slices of the fused ones); clone them
        before handing them to ``safetensors`` (which refuses tensors sharing storage).
        """
        for name, (param, lo, hi) in self._hf_targets().items():
            yield name, (param.detach() if lo is None else param.detach()[lo:hi])

    def initialize_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Fresh weights for training from scratch, as transformers initialises them: linear and
        embedding weights ~ N(0, std) (std defaults to the config's ``initializer_range``, else
        0.02), biases 0, norm weights 1."""
        for module in self.modules():
            self.initialize_module(module, std, generator)

    def initialize_module(self, module: nn.Module, std: float | None = None,
                          generator: torch.Generator | None = None) -> None:
        """initialize_weights for the parameters ``module`` owns directly (tidal.zero.Init builds a
        model's weights one module at a time through it)."""
        std = self.config.hf_config.get("initializer_range", 0.02) if std is None else std
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, SparseMoeBlock):
                module.w13.normal_(0.0, std, generator=generator)
                module.w2.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
