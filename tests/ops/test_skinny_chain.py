"""skinny_linear_chain (skinny_linear over several links, each free to read what the links before it
wrote; on sm_90 one kernel whose blocks meet at a grid barrier before each link) against the same
links run one by one through skinny_linear, which must give the same bits, and against a pure-torch
fp32 reference: a Llama layer's o_proj, gate_up, down_proj and the next layer's qkv, on the CPU (the
links one by one) and on CUDA where there is a GPU, there with the chain kernel asserted to run on
sm_90, its outputs poisoned first, replayed from a CUDA graph many times (the barrier resets itself),
and on two streams at once."""

import pytest
import torch

import tidal
from conftest import DEVICES, gpu_only, poison_cuda_allocator
from test_skinny_linear import randn, reference, tolerance
from tidal.ops import SkinnyLink

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layer(hidden, inter, qkv, dtype, seed, bias=False):
    """A Llama layer's weights after attention (o_proj, gate_up, down_proj) and the next qkv."""
    w = dict(o=randn(hidden, hidden, dtype=dtype, seed=seed, scale=hidden ** -0.5),
             gate_up=randn(2 * inter, hidden, dtype=dtype, seed=seed + 1, scale=hidden ** -0.5),
             down=randn(hidden, inter, dtype=dtype, seed=seed + 2, scale=inter ** -0.5),
             qkv=randn(qkv, hidden, dtype=dtype, seed=seed + 3, scale=hidden ** -0.5),
             norm2=1.0 + 0.1 * randn(hidden, dtype=dtype, seed=seed + 4),
             norm1=1.0 + 0.1 * randn(hidden, dtype=dtype, seed=seed + 5))
    if bias:
        w["qkv_bias"] = randn(qkv, dtype=dtype, seed=seed + 6)
    return w


def links_for(w, attn_out, residual, gate_up, qkv_out, with_qkv=True):
    links = [SkinnyLink(attn_out, w["o"], residual=residual),
             SkinnyLink(residual, w["gate_up"], norm_weight=w["norm2"], eps=1e-5, out=gate_up),
             SkinnyLink(gate_up, w["down"], gated=True, residual=residual)]
    if with_qkv:
        links.append(SkinnyLink(residual, w["qkv"], w.get("qkv_bias"), norm_weight=w["norm1"], eps=1e-5, out=qkv_out))
    return links


def one_by_one(links):
    for link in links:
        tidal.ops.skinny_linear(link.x, link.weight, link.bias, norm_weight=link.norm_weight, eps=link.eps,
                                gated=link.gated, residual=link.residual, out=link.out)


def buffers(m, w, dtype, device, seed):
    hidden, qkv = w["o"].shape[0], w["qkv"].shape[0]
    attn_out = randn(m, hidden, dtype=dtype, seed=seed, scale=2.0).to(device)
    residual = randn(m, hidden, dtype=dtype, seed=seed + 1, scale=4.0).to(device)
    gate_up = torch.full((m, w["gate_up"].shape[0]), float("nan"), dtype=dtype, device=device)
    qkv_out = torch.full((m, qkv), float("nan"), dtype=dtype, device=device)
    return attn_out, residual, gate_up, qkv_out


def chain_ran(links) -> bool:
    """Whether the chain kernel takes these links (it writes them when it does)."""
    return tidal.ops.linear._chain_fused(list(links))


def is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# (hidden, intermediate, qkv rows): small; rows of 8 KB and 28 KB (segmented tiles); an odd qkv
SHAPES = [(256, 512, 384), (4096, 1024, 1536), (1024, 3584, 1040)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("hidden,inter,qkv", SHAPES)
def test_chain_equals_links_one_by_one(hidden, inter, qkv, m, dtype, device):
    w = {k: v.to(device) for k, v in layer(hidden, inter, qkv, dtype, seed=hidden + m, bias=m == 2).items()}
    attn_out, residual, gate_up, qkv_out = buffers(m, w, dtype, device, seed=m)
    expected = [t.clone() for t in (residual, gate_up, qkv_out)]
    one_by_one(links_for(w, attn_out, expected[0], expected[1], expected[2]))
    if device == "cuda":
        poison_cuda_allocator(m * qkv * attn_out.element_size())
    tidal.ops.skinny_linear_chain(links_for(w, attn_out, residual, gate_up, qkv_out))
    for got, want in zip((residual, gate_up, qkv_out), expected):
        assert torch.equal(got, want)
    # and the whole against fp32 math, each link from the reference's own previous outputs
    r = buffers(m, w, dtype, "cpu", seed=m)[1].float()
    cpu = {k: v.cpu() for k, v in w.items()}
    r = r + reference(attn_out.cpu(), cpu["o"], None, None, "identity")
    h = r.to(dtype)
    g = reference(h, cpu["gate_up"], None, cpu["norm2"], "rms_norm", eps=1e-5).to(dtype)
    r = h.float() + reference(g, cpu["down"], None, None, "silu_and_mul")
    h = r.to(dtype)
    q = reference(h, cpu["qkv"], cpu.get("qkv_bias"), cpu["norm1"], "rms_norm", eps=1e-5)
    atol, rtol = tolerance(dtype, inter)
    torch.testing.assert_close(residual.float().cpu(), h.float(), atol=4 * atol, rtol=rtol)
    torch.testing.assert_close(qkv_out.float().cpu(), q, atol=4 * atol, rtol=4 * rtol)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("with_qkv", [True, False], ids=["four_links", "three_links"])
def test_chain_kernel_runs(with_qkv, m, dtype):
    """On sm_90 the chain kernel takes a Llama layer's links (and writes what the links one by one
    write); elsewhere it declines and writes nothing."""
    w = {k: v.cuda() for k, v in layer(1024, 3584, 1536, dtype, seed=5).items()}
    attn_out, residual, gate_up, qkv_out = buffers(m, w, dtype, "cuda", seed=3)
    expected = [t.clone() for t in (residual, gate_up, qkv_out)]
    one_by_one(links_for(w, attn_out, expected[0], expected[1], expected[2], with_qkv))
    before = residual.clone()
    ran = chain_ran(links_for(w, attn_out, residual, gate_up, qkv_out, with_qkv))
    assert ran == is_sm90()
    if ran:
        written = (residual, gate_up, qkv_out) if with_qkv else (residual, gate_up)
        for got, want in zip(written, expected):
            assert torch.equal(got, want)
    else:
        assert torch.equal(residual, before) and torch.isnan(gate_up).all()


@gpu_only
def test_graph_replays_reset_the_barrier():
    """A captured chain replayed many times (each replay adds into the residual again) and an eager
    chain on the same stream between replays: every result equals the links one by one, so each
    launch's barrier starts from zero, and no launch hangs."""
    dtype = torch.bfloat16
    w = {k: v.cuda() for k, v in layer(2048, 2048, 768, dtype, seed=11).items()}
    attn_out, residual, gate_up, qkv_out = buffers(1, w, dtype, "cuda", seed=4)
    links = links_for(w, attn_out, residual, gate_up, qkv_out)
    tidal.ops.skinny_linear_chain(links)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tidal.ops.skinny_linear_chain(links)
    expected = [t.clone() for t in (residual, gate_up, qkv_out)]
    for step in range(20):
        one_by_one(links_for(w, attn_out, expected[0], expected[1], expected[2]))
        if step % 2:
            graph.replay()
        else:
            tidal.ops.skinny_linear_chain(links)
        torch.cuda.synchronize()
        for got, want in zip((residual, gate_up, qkv_out), expected):
            assert torch.equal(got, want), step


@gpu_only
def test_two_streams_at_once():
    """Chains on two streams at once (two engines of one process) keep their own barriers."""
    dtype = torch.float16
    w = {k: v.cuda() for k, v in layer(1024, 2048, 1536, dtype, seed=21).items()}
    runs = [buffers(2, w, dtype, "cuda", seed=s) for s in (1, 2)]
    expected = []
    for attn_out, residual, gate_up, qkv_out in runs:
        want = [t.clone() for t in (residual, gate_up, qkv_out)]
        for _ in range(10):
            one_by_one(links_for(w, attn_out, *want))
        expected.append(want)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(10):
        for stream, (attn_out, residual, gate_up, qkv_out) in zip(streams, runs):
            with torch.cuda.stream(stream):
                tidal.ops.skinny_linear_chain(links_for(w, attn_out, residual, gate_up, qkv_out))
    torch.cuda.synchronize()
    for (_, residual, gate_up, qkv_out), want in zip(runs, expected):
        for got, t in zip((residual, gate_up, qkv_out), want):
            assert torch.equal(got, t)


@pytest.mark.parametrize("device", DEVICES)
def test_more_rows_than_the_kernel_runs_link_by_link(device):
    dtype = torch.bfloat16
    w = {k: v.to(device) for k, v in layer(256, 512, 384, dtype, seed=2).items()}
    attn_out, residual, gate_up, qkv_out = buffers(6, w, dtype, device, seed=6)
    expected = [t.clone() for t in (residual, gate_up, qkv_out)]
    one_by_one(links_for(w, attn_out, *expected))
    assert not chain_ran(links_for(w, attn_out, residual.clone(), gate_up.clone(), qkv_out.clone()))
    tidal.ops.skinny_linear_chain(links_for(w, attn_out, residual, gate_up, qkv_out))
    for got, want in zip((residual, gate_up, qkv_out), expected):
        assert torch.equal(got, want)


def test_bad_links_name_themselves():
    dtype = torch.float32
    w = layer(64, 96, 80, dtype, seed=1)
    attn_out, residual, gate_up, qkv_out = buffers(1, w, dtype, "cpu", seed=1)
    links = links_for(w, attn_out, residual, gate_up, qkv_out)
    with pytest.raises(ValueError, match="len\\(links\\)=5: expected 1 to 4"):
        tidal.ops.skinny_linear_chain(links + links[:1])
    with pytest.raises(ValueError, match="len\\(links\\)=0"):
        tidal.ops.skinny_linear_chain([])
    with pytest.raises(ValueError, match="links\\[1\\]: pass exactly one of out and residual"):
        tidal.ops.skinny_linear_chain([links[0], links[1]._replace(residual=residual)])
    with pytest.raises(ValueError, match="links\\[0\\] is a tuple"):
        tidal.ops.skinny_linear_chain([tuple(links[0])])
    with pytest.raises(ValueError, match="links\\[1\\].x.shape=\\(2, 64\\)"):
        tidal.ops.skinny_linear_chain([links[0], links[1]._replace(x=torch.zeros(2, 64))])
    with pytest.raises(ValueError, match="links\\[3\\].out.shape=\\(1, 81\\) must be \\[m, n\\] = \\[1, 80\\]"):
        tidal.ops.skinny_linear_chain(links[:3] + [links[3]._replace(out=torch.zeros(1, 81))])
    with pytest.raises(ValueError, match="x.shape=\\(1, 96\\) must be \\[m, 192\\]"):
        tidal.ops.skinny_linear_chain([links[2]._replace(x=torch.zeros(1, 96))])
