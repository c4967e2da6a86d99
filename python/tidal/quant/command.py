"""``tidal quantize``: a float checkpoint in, a quantized one out, in the layout the method publishes
(GPTQ and AWQ int4, compressed-tensors int8 and FP8), which tidal and transformers both load.

int8 and FP8 round each weight to nearest (per output channel; FP8 activations are scaled per token at
run time, so they need no calibration). GPTQ and AWQ run a calibration set through the model one
decoder layer at a time: each layer's inputs come from the layers before it, already quantized (GPTQ
rounds with error correction from its inputs' Hessian; AWQ searches per-channel scales that shield
the channels with large activations, folds them into the layer before, then rounds).
"""

import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from tidal.models.fused import inverse_rotary_table
from tidal.quant.calibrate import HessianAccumulator, apply_awq_scales, awq_search_scales, gptq_quantize
from tidal.quant.config import DEFAULT_INT4_GROUP_SIZE, QuantConfig
from tidal.quant.formats import save_quantized_model
from tidal.quant.linear import QuantLinear, pack_int4, quantize_model_

METHODS = ("awq", "gptq", "int8", "fp8")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def calibration_ids(tokenizer, text: str | None, num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] token ids: consecutive windows of ``text`` (the demo corpus, the standard
    library's Python source, when None), spread evenly over it."""
    if text is None:
        from tidal.demo import load_corpus

        text = bytes(load_corpus(4 << 20).clamp(max=255).to(torch.uint8).tolist()).decode("utf-8", "replace")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; --seq-len={seq_len} needs more")
    starts = torch.linspace(0, ids.numel() - seq_len, num_samples).long()
    return torch.stack([ids[s:s + seq_len] for s in starts])


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)


class _LayerRunner:
    """Runs decoder layers one at a time on the calibration batch (the training forward, module by
    module, so forward hooks see each projection's input)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch: int):
        self.model, self.batch = model, batch
        seq = ids.shape[1]
        table = model.cos_sin_cache[:seq].float().contiguous()
        self.tables = (table, inverse_rotary_table(table))
        self.positions = torch.arange(seq, device=ids.device).repeat(batch)
        with torch.no_grad():
            self.hidden = model.model.embed_tokens(ids)  # [num_samples, seq, hidden]

    def run(self, layer: nn.Module, advance: bool) -> None:
        """The layer over every sample (hooks fire); with ``advance``, its outputs become the next
        layer's inputs."""
        outs = []
        with torch.no_grad():
            for i in range(0, self.hidden.shape[0], self.batch):
                x = self.hidden[i:i + self.batch]
                positions = self.positions[:x.shape[0] * x.shape[1]]
                out = layer.forward_train(x, positions, self.tables, None, False)
                if advance:
                    outs.append(out)
        if advance:
            self.hidden = torch.cat(outs)


def _dense(parent: nn.Module, name: str) -> nn.Linear | None:
    module = getattr(parent, name, None)
    return module if isinstance(module, nn.Linear) else None


def _replace(parent: nn.Module, name: str, codes, scales, zeros, config: QuantConfig, g_idx=None) -> None:
    """``codes`` [n, k] in input order (``g_idx``: act-order groups of the inputs)."""
    linear = getattr(parent, name)
    layer = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, config,
                        linear.weight.dtype, linear.weight.device)
    if g_idx is not None:  # the loaded layout: codes in group order, x gathered to match
        layer.g_idx.copy_(g_idx)
        layer.input_perm = torch.argsort(g_idx, stable=True)
        codes = codes[:, layer.input_perm]
    layer.qweight.copy_(pack_int4(codes))
    layer.scales.copy_(scales)
    layer.zeros.copy_(zeros)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach())
    setattr(parent, name, layer)


def _round_scales(scales: torch.Tensor) -> torch.Tensor:
    """The layouts store fp16 scales: the codes are chosen for those."""
    return scales.half().float().clamp(min=2 ** -24)


def _gptq_layer(runner: _LayerRunner, layer: nn.Module, config: QuantConfig) -> None:
    projections = [(parent, name) for parent in (layer.self_attn, layer.mlp)
                   for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") if _dense(parent, name)]
    accumulators, hooks = {}, []
    for parent, name in projections:
        linear = getattr(parent, name)
        acc = accumulators[(id(parent), name)] = HessianAccumulator(linear.in_features, linear.weight.device)
        hooks.append(linear.register_forward_hook(acc))
    try:
        runner.run(layer, advance=False)
    finally:
        for hook in hooks:
            hook.remove()
    for parent, name in projections:
        w = getattr(parent, name).weight.detach()
        hessian = accumulators[(id(parent), name)].hessian
        if not config.act_order:
            codes, scales, zeros = gptq_quantize(w, hessian, config.group_size)
            _replace(parent, name, codes, scales, zeros, config)
            continue
        # act-order: inputs by decreasing Hessian diagonal (the most salient rounded first, with the
        # most columns left to absorb their error); groups are runs of that order
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        codes, scales, zeros = gptq_quantize(w[:, order], hessian[order][:, order], config.group_size)
        g_idx = torch.empty_like(order)
        g_idx[order] = torch.arange(order.numel(), device=order.device) // config.group_size
        _replace(parent, name, codes[:, torch.argsort(order)], scales, zeros, config, g_idx)


def _awq_layer(runner: _LayerRunner, layer: nn.Module, config: QuantConfig, max_tokens: int = 4096) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    names = [(attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")]
    names = [(p, n) for p, n in names if _dense(p, n)]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for _, n in names}
    hooks = []
    for parent, name in names:
        def keep(module, args, output, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            if sum(t.shape[0] for t in inputs[name]) < max_tokens:
                inputs[name].append(x[:max_tokens].float())
        hooks.append(getattr(parent, name).register_forward_hook(keep))
    try:
        runner.run(layer, advance=False)
    finally:
        for hook in hooks:
            hook.remove()
    x = {name: torch.cat(parts)[:max_tokens] for name, parts in inputs.items()}
    g = config.group_size
    with torch.no_grad():
        if "qkv_proj" in x:
            qkv = attn.qkv_proj
            s = awq_search_scales(qkv.weight, x["qkv_proj"], g)
            apply_awq_scales(layer.input_layernorm.weight, True, [qkv.weight], s)
            if attn.num_heads == attn.num_kv_heads:  # v rows map one to one onto o_proj's inputs
                v = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
                s = awq_search_scales(attn.o_proj.weight, x["o_proj"], g)
                apply_awq_scales(qkv.weight[v], False, [attn.o_proj.weight], s,
                                 None if qkv.bias is None else qkv.bias[v])
        if "gate_up_proj" in x:
            s = awq_search_scales(mlp.gate_up_proj.weight, x["gate_up_proj"], g)
            apply_awq_scales(layer.post_attention_layernorm.weight, True, [mlp.gate_up_proj.weight], s)
            inter = mlp.down_proj.in_features
            s = awq_search_scales(mlp.down_proj.weight, x["down_proj"], g)
            bias = mlp.gate_up_proj.bias
            apply_awq_scales(mlp.gate_up_proj.weight[inter:], False, [mlp.down_proj.weight], s,
                             None if bias is None else bias[inter:])
    quantize_model_layer(layer, config)


def quantize_model_layer(layer: nn.Module, config: QuantConfig) -> None:
    """Round one decoder layer's projections to nearest (fp16-representable scales, as stored)."""
    from tidal.quant.linear import int4_scales_zeros, quantize_int4

    for parent in (layer.self_attn, layer.mlp):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            linear = _dense(parent, name)
            if linear is None:
                continue
            w = linear.weight.detach()
            scales, zeros = int4_scales_zeros(w, config.group_size)
            scales = _round_scales(scales)
            _replace(parent, name, quantize_int4(w, scales, zeros), scales, zeros, config)


def quantize(model_dir: str, method: str, out: str, calib: str | None = None, group_size: int = 128,
             num_samples: int = 128, seq_len: int = 512, device: str = "auto", batch: int = 8,
             progress: bool = True, act_order: bool = False) -> QuantConfig:
    """Quantize the checkpoint in ``model_dir`` with ``method`` and write it to ``out`` (config.json with
    its ``quantization_config``, model.safetensors, the tokenizer's files). ``calib``: a UTF-8 text file
    for GPTQ and AWQ (the demo corpus when None), cut into ``num_samples`` windows of ``seq_len``
    tokens. ``act_order`` (GPTQ's desc_act): GPTQ rounds each layer's inputs by decreasing Hessian
    diagonal, groups following that order. Returns the QuantConfig written."""
    from tidal.models.config import ModelConfig
    from tidal.models.loader import load_model
    from tidal.serve.config import resolve_device
    from tidal.tokenizer import Tokenizer

    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if ModelConfig.from_pretrained(model_dir).hf_config.get("quantization_config") is not None:
        raise ValueError(f"{model_dir!r} is quantized already; quantize its float checkpoint")
    device = resolve_device(device)
    model, _ = load_model(model_dir, dtype="auto", device=device)
    if method in ("int8", "fp8"):
        config = QuantConfig(method, None, "compressed-tensors")
        quantize_model_(model, config)
    else:
        if act_order and method != "gptq":
            raise ValueError(f"act_order applies to method='gptq', not {method!r}")
        config = QuantConfig("int4", group_size, method, gptq_zero_offset=1 if method == "gptq" else 0,
                             act_order=act_order)
        tokenizer = Tokenizer(model_dir)
        text = None if calib is None else Path(calib).read_text(encoding="utf-8")
        ids = calibration_ids(tokenizer, text, num_samples, min(seq_len, model.cos_sin_cache.shape[0])).to(device)
        model.fuse_across_modules = False
        runner = _LayerRunner(model, ids, batch)
        layers = list(model.model.layers)
        bar = _progress(len(layers), f"{method} calibration") if progress else None
        for layer in layers:
            (_gptq_layer if method == "gptq" else _awq_layer)(runner, layer, config)
            runner.run(layer, advance=True)  # the next layer sees this one quantized
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    save_quantized_model(model, out, config)
    for name in _TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, Path(out) / name)
    return config
