"""rotary_embedding_and_cache_ against the composition of pure-torch references (per-head RMSNorm in
fp32, the rotary rotation of test_rotary, the cache write of test_kv_cache; one rounding per output),
on CPU here and on CUDA where there is a GPU (there also against the CPU kernel): fp32 / fp16 / bf16,
with and without q/k norm weights, neox and GPT-J, partial rotary, strided q/k/v views of one fused
qkv tensor, padding slots; caches poisoned with NaN where nothing may be written, key and value
untouched; errors, opcheck, side streams and CUDA graph replay."""

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close, gpu_only, to_device
from test_kv_cache import ref_reshape_and_cache, unique_slots
from test_rotary import make_cache, ref_rotary


def ref_rms_norm_heads(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] -> fp32, normalised per head when a weight is given."""
    xf = x.float()
    if weight is None:
        return xf
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def ref_rotary_and_cache(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache, is_neox,
                         q_norm_weight, k_norm_weight, eps):
    """Returns (new query, new key_cache, new value_cache); the inputs are not modified."""
    head_dim = query.shape[2]
    q = ref_rotary(positions, ref_rms_norm_heads(query, q_norm_weight, eps), head_dim, cos_sin_cache, is_neox)
    k = ref_rotary(positions, ref_rms_norm_heads(key, k_norm_weight, eps), head_dim, cos_sin_cache, is_neox)
    k_cache, v_cache = ref_reshape_and_cache(k.to(key.dtype), value, key_cache, value_cache, slot_mapping)
    return q.to(query.dtype), k_cache, v_cache


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POSITION = 4096


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


class Case:
    """One step's inputs, built on the CPU. layout: "contiguous" tensors, "fused_qkv" (q, k, v strided
    views of one [num_tokens, (nh + 2 nkv) hd + spare] buffer whose spare columns are NaN),
    "partial_rotary" (rotary_dim = head_dim / 2). The caches are NaN except the blocks of even id.
    ``spare``: the fused buffer's spare columns (7 leaves the heads unaligned for vector accesses, 8
    keeps every head 16-byte aligned as a serving step's qkv projection does)."""

    def __init__(self, layout, dtype, norm="qk", num_tokens=11, num_heads=4, num_kv_heads=2, head_dim=64,
                 num_blocks=6, block_size=16, num_padding=2, seed=0, scale=1.0, spare=7):
        self.layout, self.dtype = layout, dtype
        self.shape = (num_tokens, num_heads, num_kv_heads, head_dim)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        if layout == "fused_qkv":
            self.qkv = randn(num_tokens, q_size + 2 * kv_size + spare, dtype=dtype, seed=seed, scale=scale)
            self.qkv[:, q_size + 2 * kv_size:] = float("nan")
        else:
            self.qkv = None
            self.query = randn(num_tokens, num_heads, head_dim, dtype=dtype, seed=seed, scale=scale)
            self.key = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 1, scale=scale)
            self.value = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2, scale=scale)
        if self.qkv is not None:
            self.query, self.key, self.value = self.views(self.qkv)
        rotary_dim = head_dim // 2 if layout == "partial_rotary" else head_dim
        self.cos_sin_cache = make_cache(MAX_POSITION, rotary_dim)
        g = torch.Generator().manual_seed(seed + 3)
        self.positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=g, dtype=torch.int64)
        self.slot_mapping = unique_slots(num_tokens, num_blocks * block_size, seed=seed + 4, num_padding=num_padding)
        cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        self.value_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
        self.key_cache[::2] = randn(*cache_shape, dtype=dtype, seed=seed + 5)[::2]
        self.value_cache[::2] = randn(*cache_shape, dtype=dtype, seed=seed + 6)[::2]
        self.q_norm_weight = (1 + 0.5 * randn(head_dim, dtype=torch.float32, seed=seed + 7)).to(dtype) \
            if norm in ("qk", "q_only") else None
        self.k_norm_weight = (1 + 0.5 * randn(head_dim, dtype=torch.float32, seed=seed + 8)).to(dtype) \
            if norm in ("qk", "k_only") else None

    def views(self, qkv):
        num_tokens, num_heads, num_kv_heads, head_dim = self.shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v, _ = qkv.split([q_size, kv_size, kv_size, qkv.shape[1] - q_size - 2 * kv_size], -1)
        return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
                v.view(num_tokens, num_kv_heads, head_dim))

    def args(self, device, is_neox=True, eps=1e-6):
        """Fresh copies on `device` (the CPU too): query and caches are written by the op."""
        if self.qkv is not None:
            qkv = self.qkv.to(device, copy=True)
            query, key, value = self.views(qkv)
        else:
            qkv, (query, key, value) = None, (to_device(t, device) for t in (self.query, self.key, self.value))
        opt = lambda w: None if w is None else w.to(device)  # noqa: E731
        args = (self.positions.to(device), query, key, value, self.key_cache.to(device, copy=True),
                self.value_cache.to(device, copy=True), self.slot_mapping.to(device), self.cos_sin_cache.to(device),
                is_neox, opt(self.q_norm_weight), opt(self.k_norm_weight), eps)
        return args, qkv

    def reference(self, is_neox=True, eps=1e-6):
        return ref_rotary_and_cache(self.positions, self.query, self.key, self.value, self.key_cache,
                                    self.value_cache, self.slot_mapping, self.cos_sin_cache, is_neox,
                                    self.q_norm_weight, self.k_norm_weight, eps)


def assert_caches_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within tolerance where expected is a number; NaN (never written) where expected is NaN."""
    actual = actual.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "a slot that must not be written was, or one was not written"
    assert_close(actual[~nan], expected[~nan])


def run_and_check(case: Case, device: str, is_neox=True, eps=1e-6):
    ref_q, ref_kc, ref_vc = case.reference(is_neox, eps)
    args, qkv = case.args(device, is_neox, eps)
    qkv_before = None if qkv is None else qkv.cpu()
    key_before, value_before = args[2].cpu(), args[3].cpu()
    assert tidal.ops.rotary_embedding_and_cache_(*args) is None
    query, key, value, key_cache, value_cache = args[1:6]
    assert_close(query, ref_q)
    assert_caches_close(key_cache, ref_kc)
    torch.testing.assert_close(value_cache.cpu(), ref_vc, atol=0, rtol=0, equal_nan=True)  # a copy: bit for bit
    torch.testing.assert_close(key.cpu(), key_before, atol=0, rtol=0)  # key is read, not written
    torch.testing.assert_close(value.cpu(), value_before, atol=0, rtol=0)
    if qkv is not None:  # only the query columns of the fused buffer change; the spare ones stay NaN
        q_size = query.shape[1] * query.shape[2]
        torch.testing.assert_close(qkv[:, q_size:].cpu(), qkv_before[:, q_size:], atol=0, rtol=0, equal_nan=True)
    if device == "cuda":  # cross-backend: the GPU kernel equals the CPU kernel
        cpu_args, _ = case.args("cpu", is_neox, eps)
        tidal.ops.rotary_embedding_and_cache_(*cpu_args)
        assert_close(query, cpu_args[1])
        assert_caches_close(key_cache, cpu_args[4])
        torch.testing.assert_close(value_cache.cpu(), cpu_args[5], atol=0, rtol=0, equal_nan=True)
    return args


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["none", "qk", "k_only"])
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "partial_rotary"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache(dtype, is_neox, layout, norm, device):
    case = Case(layout, dtype, norm, head_dim=128 if layout == "partial_rotary" else 64,
                num_kv_heads=1 if layout == "partial_rotary" else 2, seed=len(norm) + is_neox)
    run_and_check(case, device, is_neox)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_tokens", [1, 6, 13])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_fused_heads(dtype, is_neox, num_tokens, head_dim, device):
    """The serving step's layout: full rotary over 16-byte aligned q/k/v views of one qkv buffer, which
    the GPU runs with a head's elements in registers and a warp per head for up to four tokens; token
    counts that leave a warp's last tokens empty, Qwen3's q/k norm, padding slots."""
    case = Case("fused_qkv", dtype, "qk", num_tokens=num_tokens, num_heads=6, num_kv_heads=2, head_dim=head_dim,
                num_padding=min(2, num_tokens - 1), seed=head_dim + num_tokens + is_neox, spare=8)
    run_and_check(case, device, is_neox)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_tokens_rotate_the_query_and_write_nothing(device):
    case = Case("fused_qkv", torch.bfloat16, "qk", num_tokens=6, num_padding=6, seed=20)
    args = run_and_check(case, device)
    torch.testing.assert_close(args[4].cpu(), case.key_cache, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(args[5].cpu(), case.value_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_eps_is_used(device):
    """Small activations: mean(x^2) ~ 1e-6, so eps=1e-4 changes the result far beyond tolerance."""
    case = Case("contiguous", torch.float32, "qk", scale=1e-3, seed=21)
    run_and_check(case, device, eps=1e-4)
    assert not torch.allclose(case.reference(eps=1e-4)[0], case.reference(eps=1e-6)[0], atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_norms_equals_rotary_then_cache_write(dtype, device):
    case = Case("fused_qkv", dtype, "none", seed=22)
    fused, _ = case.args(device)
    tidal.ops.rotary_embedding_and_cache_(*fused)
    positions, query, key, value, key_cache, value_cache, slots, cos_sin = case.args(device)[0][:8]
    key = key.clone()  # rotary_embedding_ rotates key in place; the fused op leaves it alone
    tidal.ops.rotary_embedding_(positions, query, key, query.shape[2], cos_sin)
    tidal.ops.reshape_and_cache_(key, value, key_cache, value_cache, slots)
    assert_close(fused[1], query)
    assert_caches_close(fused[4], key_cache.cpu())
    torch.testing.assert_close(fused[5], value_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    case = Case("contiguous", torch.float32, "qk", num_tokens=0, num_padding=0)
    args, _ = case.args(device)
    tidal.ops.rotary_embedding_and_cache_(*args)
    torch.testing.assert_close(args[4].cpu(), case.key_cache, atol=0, rtol=0, equal_nan=True)


# ---- errors ------------------------------------------------------------------------------------

def small_args(**changes):
    """Keyword arguments of a valid small call on the CPU, with `changes` applied."""
    g = torch.Generator().manual_seed(30)
    kwargs = dict(positions=torch.arange(3), query=torch.randn(3, 2, 8, generator=g),
                  key=torch.randn(3, 1, 8, generator=g), value=torch.randn(3, 1, 8, generator=g),
                  key_cache=torch.zeros(4, 4, 1, 8), value_cache=torch.zeros(4, 4, 1, 8),
                  slot_mapping=torch.tensor([0, 5, -1]), cos_sin_cache=make_cache(64, 8), is_neox=True,
                  q_norm_weight=torch.ones(8), k_norm_weight=torch.ones(8), eps=1e-6)
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize("changes, message", [
    (dict(query=torch.randn(3, 16)), r"query and key must be 3-D .* got shapes \(3, 16\) and \(3, 1, 8\)"),
    (dict(key=torch.randn(3, 1, 16)), r"key.shape\[2\]=16 must equal head_dim=8"),
    (dict(query=torch.randn(3, 2, 8).half()), "key.dtype=torch.float32 must equal query.dtype=torch.float16"),
    (dict(value=torch.randn(3, 1, 4)), r"value.shape=\(3, 1, 4\) must equal key.shape=\(3, 1, 8\)"),
    (dict(positions=torch.arange(3).int()), "positions.dtype=torch.int32 must be torch.int64"),
    (dict(slot_mapping=torch.tensor([0, 5, -1]).int()), "slot_mapping.dtype=torch.int32 must be torch.int64"),
    (dict(slot_mapping=torch.tensor([0, 5])), r"slot_mapping.shape=\(2,\) must be \[num_tokens\] = \[3\]"),
    (dict(cos_sin_cache=make_cache(64, 8).half()), "cos_sin_cache.dtype=torch.float16 must be torch.float32"),
    (dict(cos_sin_cache=make_cache(64, 16)), r"rotary_dim=cos_sin_cache.shape\[1\]=16 must be even, positive"),
    (dict(key_cache=torch.zeros(4, 4, 1, 8).half()), "key_cache.dtype=torch.float16 must equal key.dtype"),
    (dict(key_cache=torch.zeros(4, 4, 2, 8)), r"key_cache.shape=\(4, 4, 2, 8\) must be \[num_blocks"),
    (dict(value_cache=torch.zeros(4, 8, 1, 4)), r"value_cache.shape=\(4, 8, 1, 4\) must equal key_cache.shape"),
    (dict(q_norm_weight=torch.ones(4)), r"q_norm_weight must be a \[8\] torch.float32 tensor on cpu, got \(4,\)"),
    (dict(k_norm_weight=torch.ones(8).half()), r"k_norm_weight must be a \[8\] torch.float32 tensor .* torch.float16"),
    (dict(eps=-1.0), "eps=-1.0 must be finite and >= 0"),
    (dict(eps=float("inf")), "eps=inf must be finite and >= 0"),
], ids=lambda x: "-".join(x) if isinstance(x, dict) else "message")
def test_bad_arguments_name_the_argument(changes, message):
    kwargs = small_args(**changes)
    cache_before = kwargs["key_cache"].clone()
    with pytest.raises(ValueError, match=message):
        tidal.ops.rotary_embedding_and_cache_(**kwargs)
    torch.testing.assert_close(kwargs["key_cache"], cache_before, atol=0, rtol=0)


def test_bad_indices_are_index_errors_and_write_nothing():
    kwargs = small_args(positions=torch.tensor([0, 64, 1]))
    query_before = kwargs["query"].clone()
    with pytest.raises(IndexError, match=r"positions\[1\]=64 is out of range \[0, max_position=64\)"):
        tidal.ops.rotary_embedding_and_cache_(**kwargs)
    torch.testing.assert_close(kwargs["query"], query_before, atol=0, rtol=0)
    kwargs = small_args(slot_mapping=torch.tensor([0, 16, 3]))
    with pytest.raises(IndexError, match=r"slot_mapping\[1\]=16 is out of range: .* = 16 slots"):
        tidal.ops.rotary_embedding_and_cache_(**kwargs)
    torch.testing.assert_close(kwargs["query"], query_before, atol=0, rtol=0)
    assert not kwargs["key_cache"].any() and not kwargs["value_cache"].any()


def test_native_errors_name_the_argument():
    kc = torch.zeros(4, 4, 1, 8)
    with pytest.raises(ValueError, match="query overlaps a cache in memory"):  # the Python checks let it through
        tidal.ops.rotary_embedding_and_cache_(**small_args(key_cache=kc, query=kc.view(8, 2, 8)[:3]))
    with pytest.raises(ValueError, match="key or value overlaps a cache in memory"):
        tidal.ops.rotary_embedding_and_cache_(**small_args(key_cache=kc, key=kc.view(16, 1, 8)[:3]))
    big = dict(query=torch.randn(3, 1, 520), key=torch.randn(3, 1, 520), value=torch.randn(3, 1, 520),
               key_cache=torch.zeros(4, 4, 1, 520), value_cache=torch.zeros(4, 4, 1, 520), q_norm_weight=None,
               k_norm_weight=None)
    with pytest.raises(ValueError, match=r"head_dim=query.shape\[2\]=520 must be in \[1, 512\]"):
        tidal.ops.rotary_embedding_and_cache_(**small_args(**big))


# ---- opcheck -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        Case("contiguous", torch.float32, "qk", num_tokens=5, seed=40).args(device)[0],
        Case("fused_qkv", torch.bfloat16, "none", num_tokens=4, seed=41).args(device, is_neox=False)[0],
        Case("partial_rotary", torch.float16, "k_only", num_tokens=3, head_dim=128, seed=42).args(device)[0],
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.tidal.rotary_embedding_and_cache_.default, args)


# ---- CUDA only ---------------------------------------------------------------------------------

@gpu_only
def test_cuda_large_shapes_and_unchecked_slots():
    """Llama-3-8B / Qwen3 heads (more head jobs than the kernel's warps), head_dim 256; and slots past
    the cache, which the GPU does not check (a host sync): those tokens write nothing."""
    for dtype, heads, head_dim in ((torch.bfloat16, (32, 8), 128), (torch.float16, (8, 2), 256)):
        case = Case("fused_qkv", dtype, "qk", num_tokens=40, num_heads=heads[0], num_kv_heads=heads[1],
                    head_dim=head_dim, num_blocks=8, block_size=16, num_padding=5, seed=50)
        run_and_check(case, "cuda", is_neox=head_dim == 128)

    case = Case("contiguous", torch.float32, "qk", num_tokens=4, num_padding=0, seed=51)
    case.slot_mapping = torch.tensor([3, 96, 10**6, 40])  # 96 = num_blocks * block_size
    args, _ = case.args("cuda")
    tidal.ops.rotary_embedding_and_cache_(*args)
    case.slot_mapping = torch.tensor([3, -1, -1, 40])
    ref_q, ref_kc, ref_vc = case.reference()
    assert_close(args[1], ref_q)
    assert_caches_close(args[4], ref_kc)
    torch.testing.assert_close(args[5].cpu(), ref_vc, atol=0, rtol=0, equal_nan=True)

    cuda_kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in small_args().items()}
    with pytest.raises(ValueError, match="q_norm_weight must be a .* on cuda:0, got .* on cpu"):
        tidal.ops.rotary_embedding_and_cache_(**dict(cuda_kwargs, q_norm_weight=torch.ones(8)))
    with pytest.raises(ValueError, match="value_cache is on cpu but key is on cuda"):
        tidal.ops.rotary_embedding_and_cache_(**dict(cuda_kwargs, value_cache=torch.zeros(4, 4, 1, 8)))


@gpu_only
@pytest.mark.parametrize("spare", [7, 8], ids=["unaligned", "aligned"])
def test_cuda_side_stream_and_graph_replay(spare):
    """The serving step captures this op in a CUDA graph: replays use the positions, slots, q/k/v and
    cache contents the static tensors hold at replay time (both kernels: unaligned heads take the
    warp-per-head one, aligned heads the register one)."""
    static, _ = Case("fused_qkv", torch.bfloat16, "qk", num_tokens=8, seed=60, spare=spare).args("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a side stream, and the warm-up before capture
        tidal.ops.rotary_embedding_and_cache_(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tidal.ops.rotary_embedding_and_cache_(*static)
    for seed in (61, 62):
        case = Case("fused_qkv", torch.bfloat16, "qk", num_tokens=8, num_padding=3, seed=seed, spare=spare)
        case.q_norm_weight, case.k_norm_weight = static[9].cpu(), static[10].cpu()  # captured: fixed
        fresh, _ = case.args("cuda")
        for i in (0, 1, 2, 3, 4, 5, 6):  # positions, query, key, value, caches, slots
            static[i].copy_(fresh[i])
        graph.replay()
        torch.cuda.synchronize()
        ref_q, ref_kc, ref_vc = case.reference()
        assert_close(static[1], ref_q)
        assert_caches_close(static[4], ref_kc)
        torch.testing.assert_close(static[5].cpu(), ref_vc, atol=0, rtol=0, equal_nan=True)
