"""GPTQ and AWQ calibration (tidal.quant.calibrate) against round-to-nearest and pure-torch references:
GPTQ's layer-output error on correlated inputs, its agreement with an unblocked column-by-column
reference for any block size, AWQ's scale search on outlier channels, and the exactness of folding
AWQ scales into norm -> linear and linear -> linear pairs."""

import pytest
import torch
from torch import nn

from conftest import DEVICES
from tidal.quant.calibrate import HessianAccumulator, apply_awq_scales, awq_search_scales, gptq_quantize
from tidal.quant.linear import int4_scales_zeros, quantize_int4

N_OUT, K, GROUP = 64, 256, 64


def dequantize(codes, scales, zeros):
    n, k = codes.shape
    g = k // scales.shape[1]
    return ((codes.float().reshape(n, -1, g) - zeros.float()[..., None]) * scales[..., None]).reshape(n, k)


def ref_rtn(w, group_size):
    """(codes, scales, zeros) of plain rounding to nearest."""
    scales, zeros = int4_scales_zeros(w, group_size)
    return quantize_int4(w, scales, zeros), scales, zeros


def ref_gptq(w, hessian, group_size, damp_percent):
    """GPTQ without lazy batching: every column's error goes to all later columns at once."""
    n, k = w.shape
    g = group_size or k
    w, h = w.float().clone(), hessian.float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales, zeros = torch.empty(n, k // g), torch.empty(n, k // g, dtype=torch.uint8)
    for i in range(k):
        if i % g == 0:
            scale, zero = int4_scales_zeros(w[:, i:i + g], None)
            scales[:, i // g], zeros[:, i // g] = scale[:, 0], zero[:, 0]
        codes[:, i] = quantize_int4(w[:, i:i + 1], scale, zero)[:, 0]
        q = (codes[:, i].float() - zero[:, 0].float()) * scale[:, 0]
        w[:, i:] -= ((w[:, i] - q) / u[i, i])[:, None] * u[i, i:][None, :]
    return codes, scales, zeros


def correlated_inputs(num_tokens, k, seed, device="cpu"):
    """x = z @ A with a random mixing matrix A: a Hessian far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + 0.3 * torch.randn(1, k, generator=g)
    return (torch.randn(num_tokens, k, generator=g) @ mix).to(device)


def random_weight(n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(device)


def hessian_of(x):
    acc = HessianAccumulator(x.shape[-1], device=x.device)
    acc.add_batch(x)
    return acc.hessian


def output_error(x, w, w_q):
    return (x @ w_q.t() - x @ w.t()).norm().item()


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_beats_rtn_on_correlated_inputs(device):
    x = correlated_inputs(2048, K, seed=0, device=device)
    w = random_weight(N_OUT, K, seed=1, device=device)
    codes, scales, zeros = gptq_quantize(w, hessian_of(x), group_size=GROUP)
    assert codes.shape == (N_OUT, K) and codes.dtype == torch.uint8 and codes.device == w.device
    assert scales.shape == (N_OUT, K // GROUP) and scales.dtype == torch.float32
    assert zeros.shape == (N_OUT, K // GROUP) and zeros.dtype == torch.uint8
    assert int(codes.max()) <= 15 and int(zeros.max()) <= 15
    gptq = output_error(x, w, dequantize(codes, scales, zeros))
    rtn = output_error(x, w, dequantize(*ref_rtn(w, GROUP)))
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("block_size", [1, 48, 64, 128, 256, 1000])
def test_gptq_block_size_matches_unblocked_reference(block_size):
    x = correlated_inputs(1024, K, seed=2)
    w = random_weight(N_OUT, K, seed=3)
    h = hessian_of(x)
    codes, scales, zeros = gptq_quantize(w, h, group_size=GROUP, block_size=block_size)
    ref_codes, ref_scales, ref_zeros = ref_gptq(w, h, GROUP, 0.01)
    # fp32 summation order differs, so a value on a rounding boundary may land on the other code
    assert (codes == ref_codes).float().mean() > 0.99
    torch.testing.assert_close(dequantize(codes, scales, zeros), dequantize(ref_codes, ref_scales, ref_zeros),
                               atol=0.05, rtol=0)


def test_gptq_diagonal_hessian_is_rtn():
    w = random_weight(N_OUT, K, seed=4)
    h = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5)
    codes, scales, zeros = gptq_quantize(w, h, group_size=GROUP)
    ref_codes, ref_scales, ref_zeros = ref_rtn(w, GROUP)
    assert torch.equal(codes, ref_codes) and torch.equal(zeros, ref_zeros)
    torch.testing.assert_close(scales, ref_scales, atol=0, rtol=0)


def test_gptq_white_noise_is_nearly_rtn():
    x = torch.randn(16384, K, generator=torch.Generator().manual_seed(6))
    w = random_weight(N_OUT, K, seed=7)
    codes, _, _ = gptq_quantize(w, hessian_of(x), group_size=GROUP, damp_percent=1e-4)
    assert (codes == ref_rtn(w, GROUP)[0]).float().mean() > 0.9


def test_gptq_dead_inputs():
    x = correlated_inputs(1024, K, seed=8)
    dead = torch.tensor([0, 5, 63, 64, 200])
    x[:, dead] = 0.0
    w = random_weight(N_OUT, K, seed=9)
    h = hessian_of(x)
    codes, scales, zeros = gptq_quantize(w, h, group_size=GROUP)
    w_q = dequantize(codes, scales, zeros)
    assert torch.isfinite(w_q).all() and (w_q[:, dead] == 0).all()
    ref_codes, _, _ = ref_gptq(w, h, GROUP, 0.01)
    assert (codes == ref_codes).float().mean() > 0.99
    assert output_error(x, w, w_q) < 0.9 * output_error(x, w, dequantize(*ref_rtn(w, GROUP)))


def test_gptq_one_group_per_row():
    x = correlated_inputs(1024, K, seed=10)
    w = random_weight(N_OUT, K, seed=11)
    h = hessian_of(x)
    codes, scales, zeros = gptq_quantize(w, h, group_size=None, block_size=96)
    assert scales.shape == (N_OUT, 1) and zeros.shape == (N_OUT, 1)
    ref_scales, ref_zeros = int4_scales_zeros(w, None)  # the first column starts the only group
    torch.testing.assert_close(scales, ref_scales, atol=0, rtol=0)
    assert torch.equal(zeros, ref_zeros)
    assert (codes == ref_gptq(w, h, None, 0.01)[0]).float().mean() > 0.99


def test_gptq_leaves_inputs_and_takes_half_precision():
    x = correlated_inputs(512, K, seed=12)
    w = random_weight(N_OUT, K, seed=13).to(torch.bfloat16)
    h = hessian_of(x)
    w_before, h_before = w.clone(), h.clone()
    codes, scales, _ = gptq_quantize(w, h, group_size=GROUP)
    assert torch.equal(w, w_before) and torch.equal(h, h_before)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float32


@pytest.mark.parametrize("kwargs, name", [
    (dict(group_size=48), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(damp_percent=-0.1), "damp_percent"),
    (dict(block_size=0), "block_size"),
    (dict(hessian=torch.eye(K + 2)), "hessian"),
    (dict(hessian=-torch.eye(K)), "hessian"),
    (dict(w=torch.zeros(K)), "w"),
])
def test_gptq_bad_arguments(kwargs, name):
    args = dict(w=torch.zeros(N_OUT, K), hessian=torch.eye(K))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        gptq_quantize(**args)


def test_hessian_accumulator_matches_one_shot():
    g = torch.Generator().manual_seed(14)
    batches = [torch.randn(2, 7, 32, generator=g), torch.randn(0, 32), torch.randn(5, 32, generator=g),
               torch.randn(30, 32, generator=g).to(torch.bfloat16)]
    acc = HessianAccumulator(32)
    for b in batches:
        acc.add_batch(b)
    rows = torch.cat([b.reshape(-1, 32).double() for b in batches])
    assert acc.num_samples == rows.shape[0] == 49
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), 2 / rows.shape[0] * rows.t() @ rows, atol=1e-5, rtol=1e-5)


def test_hessian_accumulator_as_forward_hook():
    layer = nn.Linear(32, 8)
    acc = HessianAccumulator(32)
    handle = layer.register_forward_hook(acc)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(15))
    layer(x[0])
    layer(x[1:])
    handle.remove()
    rows = x.reshape(-1, 32)
    torch.testing.assert_close(acc.hessian, 2 / 12 * rows.t() @ rows)
    with pytest.raises(ValueError, match="in_features"):
        acc.add_batch(torch.zeros(4, 31))


def outlier_inputs(num_tokens, k, seed, device="cpu"):
    """Inputs where a few channels are 50x larger than the rest (LLM activations' outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 50.0
    return x.to(device)


def awq_loss(w, x, s, group_size):
    w_q = dequantize(*ref_rtn(w * s, group_size)) / s
    return (x @ w_q.t() - x @ w.t()).pow(2).mean().item()


@pytest.mark.parametrize("device", DEVICES)
def test_awq_scales_beat_rtn_on_outlier_channels(device):
    x = outlier_inputs(512, K, seed=16, device=device)
    w = random_weight(3 * N_OUT, K, seed=17, device=device)  # q, k and v rows
    s = awq_search_scales(w, x, group_size=GROUP)
    assert s.shape == (K,) and s.dtype == torch.float32 and s.device == w.device and (s > 0).all()
    searched, plain = awq_loss(w, x, s, GROUP), awq_loss(w, x, torch.ones_like(s), GROUP)
    assert searched < 0.8 * plain, (searched, plain)
    assert torch.equal(awq_search_scales(w, x, group_size=GROUP, grid=1), torch.ones(K, device=device))


def test_awq_bad_arguments():
    w, x = torch.zeros(N_OUT, K), torch.zeros(8, K)
    with pytest.raises(ValueError, match="x"):
        awq_search_scales(w, torch.zeros(8, K + 1))
    with pytest.raises(ValueError, match="x"):
        awq_search_scales(w, torch.zeros(0, K))
    with pytest.raises(ValueError, match="group_size"):
        awq_search_scales(w, x, group_size=100)
    with pytest.raises(ValueError, match="grid"):
        awq_search_scales(w, x, grid=0)


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("device", DEVICES)
def test_apply_awq_scales_norm_to_linear(device):
    x = outlier_inputs(256, K, seed=18, device=device).double()
    norm_weight = (1 + 0.1 * random_weight(1, K, seed=19, device=device)[0]).double()
    qkv = [random_weight(N_OUT, K, seed=20 + j, device=device).double() for j in range(3)]
    h = rms_norm(x, norm_weight).float()
    w = torch.cat(qkv).float()
    before = [rms_norm(x, norm_weight) @ w_j.t() for w_j in qkv]
    s = awq_search_scales(w, h, group_size=GROUP)
    apply_awq_scales(norm_weight, True, qkv, s)
    for w_j, out in zip(qkv, before):
        torch.testing.assert_close(rms_norm(x, norm_weight) @ w_j.t(), out)
    # what the folding is for: plain rounding of the folded weights now loses what the search measured
    h_folded, w_folded = rms_norm(x, norm_weight).float(), torch.cat(qkv).float()
    folded_err = (h_folded @ dequantize(*ref_rtn(w_folded, GROUP)).t() - h @ w.t()).pow(2).mean().item()
    assert folded_err == pytest.approx(awq_loss(w, h, s, GROUP), rel=1e-3)
    assert folded_err < 0.8 * awq_loss(w, h, torch.ones_like(s), GROUP)


def test_apply_awq_scales_linear_to_linear():
    g = torch.Generator().manual_seed(24)
    x = torch.randn(64, 32, generator=g, dtype=torch.float64)
    prev = torch.randn(K, 32, generator=g, dtype=torch.float64)
    prev_bias = torch.randn(K, generator=g, dtype=torch.float64)
    consumer = torch.randn(N_OUT, K, generator=g, dtype=torch.float64)
    before = (x @ prev.t() + prev_bias) @ consumer.t()
    s = torch.rand(K, generator=g) + 0.25
    apply_awq_scales(prev, False, [consumer], s, prev_bias=prev_bias)
    torch.testing.assert_close((x @ prev.t() + prev_bias) @ consumer.t(), before)


def test_apply_awq_scales_up_rows_of_fused_gate_up():
    g = torch.Generator().manual_seed(25)
    inter = K
    mlp = nn.ModuleDict({"gate_up_proj": nn.Linear(32, 2 * inter, bias=False), "down_proj": nn.Linear(inter, 16)})
    mlp.double()

    def forward(x):
        gate, up = mlp["gate_up_proj"](x).chunk(2, dim=-1)
        return mlp["down_proj"](nn.functional.silu(gate) * up)

    x = torch.randn(8, 32, generator=g, dtype=torch.float64)
    before = forward(x).detach()
    s = torch.rand(inter, generator=g) + 0.25
    apply_awq_scales(mlp["gate_up_proj"].weight[inter:], False, [mlp["down_proj"].weight], s)
    torch.testing.assert_close(forward(x).detach(), before)


@pytest.mark.parametrize("args, name", [
    ((torch.ones(K + 1), True, [torch.ones(4, K)], torch.ones(K)), "prev_weight"),
    ((torch.ones(K + 1, 8), False, [torch.ones(4, K)], torch.ones(K)), "prev_weight"),
    ((torch.ones(K), True, [torch.ones(4, K - 1)], torch.ones(K)), r"weights\[0\]"),
    ((torch.ones(K), True, [], -torch.ones(K)), "s must"),
    ((torch.ones(K), True, [], torch.ones(K, 1)), "s must"),
    ((torch.ones(K), True, [], torch.ones(K), torch.ones(3)), "prev_bias"),
])
def test_apply_awq_scales_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        apply_awq_scales(*args)
