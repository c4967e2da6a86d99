"""tidal.models.fused: each autograd function against the unfused ops it replaces (output and every
gradient bit for bit, fp32 and bf16, on the CPU and on CUDA), the tensors it keeps for the backward
pass (not the normalised input, not the activation, no copy of q and k), and a Llama model trained
with and without fusion: the same loss and gradients bit for bit, fewer bytes kept."""

import pytest
import torch
import torch.nn.functional as F

import tidal
from conftest import DEVICES
from tidal.models import load_model
from tidal.models.fused import gated_linear, inverse_rotary_table, norm_linear, rotary_qkv_
from tiny_models import build_model


def _randn(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device).requires_grad_()


def _grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


def _assert_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _SavedBytes:
    """Bytes of distinct storages autograd keeps for the backward pass of what runs inside (of
    ``dtype`` only, when given)."""

    def __init__(self, dtype=None):
        self.storages, self.dtype = {}, dtype

    def __enter__(self):
        def pack(t):
            if self.dtype is None or t.dtype == self.dtype:
                self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_equals_unfused(device, dtype, bias):
    x = _randn(2, 5, 48, dtype=dtype, device=device, seed=0, scale=2.0)
    norm_w = _randn(48, dtype=dtype, device=device, seed=1)
    w = _randn(40, 48, dtype=dtype, device=device, seed=2)
    b = _randn(40, dtype=dtype, device=device, seed=3) if bias else None
    inputs = (x, norm_w, w, b)
    with _SavedBytes() as fused_saved:
        got = norm_linear(x, norm_w, 1e-5, w, b)
    with _SavedBytes() as plain_saved:
        want = F.linear(tidal.ops.rms_norm(x, norm_w, 1e-5), w, b)
    _assert_equal([got], [want])
    _assert_equal(_grads(got, inputs, 4), _grads(want, inputs, 4))
    # x, the norm weight and the weight: not the normalised input the linear would keep
    assert fused_saved.nbytes == plain_saved.nbytes - x.numel() * x.element_size()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_linear_equals_unfused(device, dtype, bias):
    gate_up = _randn(3, 4, 2 * 40, dtype=dtype, device=device, seed=5, scale=3.0)
    w = _randn(24, 40, dtype=dtype, device=device, seed=6)
    b = _randn(24, dtype=dtype, device=device, seed=7) if bias else None
    inputs = (gate_up, w, b)
    with _SavedBytes() as fused_saved:
        got = gated_linear(gate_up, w, b)
    with _SavedBytes() as plain_saved:
        want = F.linear(tidal.ops.silu_and_mul(gate_up), w, b)
    _assert_equal([got], [want])
    _assert_equal(_grads(got, inputs, 8), _grads(want, inputs, 8))
    activation_bytes = gate_up.numel() // 2 * gate_up.element_size()
    assert fused_saved.nbytes == plain_saved.nbytes - activation_bytes
    # only some inputs needing gradients
    w_only = _grads(gated_linear(gate_up.detach(), w, b), (w,), 9)
    _assert_equal(w_only, _grads(F.linear(tidal.ops.silu_and_mul(gate_up.detach()), w, b), (w,), 9))
    x_only = _grads(gated_linear(gate_up, w.detach(), None), (gate_up,), 10)
    _assert_equal(x_only, _grads(F.linear(tidal.ops.silu_and_mul(gate_up), w.detach()), (gate_up,), 10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qkv_equals_out_of_place_rotary(device, dtype):
    heads, kv_heads, head_dim, batch, seq = 4, 2, 16, 2, 7
    qkv_in = _randn(batch, seq, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, seed=11)
    from tidal.models import rope

    table = rope.build_cos_sin_cache(head_dim, 32, 10000.0, None, device=torch.device(device)).float()
    positions = torch.arange(seq, device=device).repeat(batch)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def fused():
        qkv = rotary_qkv_(qkv_in * 1, positions, table, inverse_rotary_table(table), heads, kv_heads, head_dim)
        return qkv

    def plain():
        q, k, v = (qkv_in * 1).split([q_size, kv_size, kv_size], dim=-1)
        q, k = tidal.ops.rotary_embedding(positions, q.reshape(-1, heads, head_dim),
                                          k.reshape(-1, kv_heads, head_dim), table)
        return torch.cat((q.view(batch, seq, -1), k.view(batch, seq, -1), v), dim=-1)

    got, want = fused(), plain()
    _assert_equal([got], [want])
    _assert_equal(_grads(got, (qkv_in,), 12), _grads(want, (qkv_in,), 12))
    # attention reading q, k, v as views of the rotated buffer (the model's use): the same gradient
    got = fused()
    q, k, v = got.split([q_size, kv_size, kv_size], dim=-1)
    loss = (q.float().square().sum() + (k.float() * 3).sum() + v.float().sum())
    (g_views,) = torch.autograd.grad(loss, qkv_in)
    want = plain()
    q, k, v = want.split([q_size, kv_size, kv_size], dim=-1)
    (g_plain,) = torch.autograd.grad(q.float().square().sum() + (k.float() * 3).sum() + v.float().sum(), qkv_in)
    _assert_equal([g_views], [g_plain])


def test_rotary_qkv_bad_input_is_named():
    table = torch.zeros(8, 16)
    positions = torch.arange(4)
    with pytest.raises(ValueError, match="qkv must be contiguous"):
        rotary_qkv_(torch.zeros(4, 128).t(), positions, table, table, 2, 1, 16)
    with pytest.raises(ValueError, match=r"qkv.shape\[-1\]=60 must be \(num_heads \+ 2 \* num_kv_heads\) \* "
                                         r"head_dim = 64"):
        rotary_qkv_(torch.zeros(4, 60), positions, table, table, 2, 1, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", [None, "mlp"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biased qkv, rotated in place
def test_llama_with_and_without_fusion(family, device, dtype, policy, tmp_path):
    """The loss and every parameter gradient bit for bit with fuse_across_modules on and off, and
    fewer bytes kept for the backward pass with it on, by the per-layer accounting of the fusions
    (counted over the model-dtype tensors kept: the fp32 rotary tables and the int64 positions are
    kept either way)."""
    build_model(str(tmp_path), family=family, tie=True, num_layers=2)
    model, _ = load_model(str(tmp_path), dtype=dtype, device=device)
    model.set_activation_checkpointing(policy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g).to(device)

    def run(fused: bool):
        model.fuse_across_modules = fused
        model.zero_grad(set_to_none=True)
        with _SavedBytes(dtype) as saved:
            loss = model(ids, labels=ids)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()], saved.nbytes

    got, fused_bytes = run(True)
    want, plain_bytes = run(False)
    _assert_equal(got, want)
    cfg, tokens = model.config, ids.numel()
    item = torch.empty((), dtype=dtype).element_size()
    per_layer = cfg.hidden_size  # the attention's normalised input
    per_layer += (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim  # the rotated copies of q, k
    if policy is None:  # under "mlp" the MLP half keeps only its input either way
        per_layer += cfg.hidden_size + cfg.intermediate_size  # its normalised input, the activation
    if dtype == torch.bfloat16:
        assert plain_bytes - fused_bytes == cfg.num_hidden_layers * tokens * per_layer * item
