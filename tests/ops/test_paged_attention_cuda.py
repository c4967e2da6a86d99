"""paged_attention's GPU paths (CUDA only; skipped without a GPU), each against the fp32 reference and
the CPU kernel of test_paged_attention, with every cache slot no query may read set to NaN and the
output allocation poisoned: the split-K ("flash-decoding") SIMT kernel for small batches and its
one-split form for many sequences (which one ran is checked through the workspace size), the
tensor-core kernel (fp16 / bf16, head_dim 64 / 128 / 256, max_seqlen_q > 1) and the SIMT kernel for
other head sizes and fp32, block sizes 1 / 16 / 32 with contexts ending mid-block, GQA ratios 1 to 8
and MQA, sliding windows, chunked prefill beside decodes, max_seqlen_q / max_seqlen_k exact, -1 and
over-estimated, misaligned inputs (the fallbacks), CUDA graphs replayed on new batches, side
streams."""

import pytest
import torch

import tidal
from conftest import GPU_MARKS, assert_close
from test_paged_attention import Batch, batch_kinds, check, longest_first

pytestmark = GPU_MARKS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def splits_keys(batch: Batch, max_seqlen_q=None, max_seqlen_k=None) -> bool:
    """Whether the GPU plan for this batch splits the keys (its workspace is the split-K scratch)."""
    from tidal import _core

    exact = batch.max_seqlens()
    num_tokens, num_heads, head_dim = batch.query.shape
    size = _core.ops.paged_attention_workspace_size(
        1, torch.cuda.current_device(), _DTYPE_NAMES[batch.query.dtype], num_tokens, batch.seq_lens.shape[0],
        num_heads, batch.key_cache.shape[2], head_dim, max_seqlen_q or exact["max_seqlen_q"],
        max_seqlen_k or exact["max_seqlen_k"])
    return size > 0


def decode_seqs(contexts):
    return [(1, n) for n in contexts]


# ---- the SIMT decode kernel: split-K for small batches, one split for many sequences -----------

@pytest.mark.parametrize("block_size", [16, 1, 32])
@pytest.mark.parametrize("num_seqs", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_small_batches_long_contexts(dtype, num_seqs, block_size):
    contexts = [5000, 257, 1003, 4999][:num_seqs]  # every one ends mid-block
    batch = Batch(decode_seqs(contexts), 8, 2, 128, block_size, dtype, seed=num_seqs + block_size)
    assert splits_keys(batch)
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("heads", [(4, 4), (8, 4), (8, 2), (16, 2), (8, 1), (32, 1)], ids=lambda h: f"h{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("contexts", [(3000, 700), (1, 2, 17, 120)], ids=["split", "short"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_gqa_ratios(dtype, contexts, heads):
    """Decode rows per block follow the group (2, 4 or 8 query heads of one KV head, and more than one
    row block for groups above 8)."""
    batch = Batch(decode_seqs(contexts), *heads, 64, 16, dtype, seed=heads[0] + heads[1])
    assert splits_keys(batch) == (max(contexts) > 128)  # a split keeps >= 128 keys
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_sequences_do_not_split(dtype, block_size):
    contexts = [1 + (37 * i) % 450 for i in range(300)]  # 1 .. 450, most ending mid-block
    batch = Batch(decode_seqs(contexts), 16, 8, 64, block_size, dtype, seed=block_size)  # 2400 blocks
    assert not splits_keys(batch)
    check(batch, "cuda", **batch.max_seqlens())
    check(batch, "cuda", 100)  # and with a window, max_seqlen_q / max_seqlen_k computed (-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_prefill_rows(dtype):
    """The SIMT kernel also takes query runs > 1 (fp32, and 16-bit with other head sizes); a small batch
    of them splits its keys too."""
    head_dim = 64 if dtype == torch.float32 else 96
    batch = Batch([(20, 3000), (1, 2000), (7, 7)], 4, 2, head_dim, 16, dtype, seed=3)
    assert splits_keys(batch)
    check(batch, "cuda", **batch.max_seqlens())
    check(batch, "cuda", 300, **batch.max_seqlens())


# ---- the tensor-core kernel and the SIMT kernel's other head sizes ------------------------------

@pytest.mark.parametrize("block_size", [16, 1, 32])
@pytest.mark.parametrize("kind", ["prefill", "chunked_prefill", "mixed"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_head_dims(dtype, head_dim, kind, block_size):
    batch = Batch(batch_kinds(block_size)[kind], 8, 2, head_dim, block_size, dtype, seed=head_dim + block_size)
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("head_dim", [32, 80, 96, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_simt_head_dims(dtype, head_dim, kind):
    batch = Batch(batch_kinds(16)[kind], 8, 2, head_dim, 16, dtype, seed=head_dim)
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("heads", [(4, 4), (8, 4), (8, 2), (16, 2), (8, 1), (32, 1)], ids=lambda h: f"h{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_gqa_ratios(dtype, heads):
    """Row blocks of (token, head of the group) pairs: 64 per tensor-core block, 8 per SIMT block."""
    batch = Batch(batch_kinds(16)["mixed"] + [(70, 200)], *heads, 128, 16, dtype, seed=heads[0] * heads[1])
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_over_long_prefix_beside_decodes(dtype):
    """An engine step: decodes of long and short contexts, a 256-token chunk over a 2000-token cached
    prefix, a fresh prompt, and a sequence with no new tokens."""
    seqs = [(1, 4097), (1, 33), (256, 2256), (0, 100), (130, 130), (1, 1), (64, 700)]
    batch = Batch(seqs, 8, 2, 128, 16, dtype, seed=4)
    check(batch, "cuda", **batch.max_seqlens())


@pytest.mark.parametrize("window", [1, 7, 64, 100, 1000])
@pytest.mark.parametrize("path", ["tensor_cores", "simt_fp32", "split_decode"])
def test_sliding_window_paths(path, window):
    if path == "split_decode":
        batch = Batch(decode_seqs([3000, 1500, 129]), 8, 2, 128, 16, torch.bfloat16, seed=window)
        assert splits_keys(batch)
    else:
        dtype = torch.bfloat16 if path == "tensor_cores" else torch.float32
        seqs = batch_kinds(16)["mixed"] + [(150, 400), (1, 1200), (40, 40)]
        batch = Batch(seqs, 8, 2, 128, 16, dtype, seed=window)
    check(batch, "cuda", window, **batch.max_seqlens())


# ---- max_seqlen_q / max_seqlen_k ---------------------------------------------------------------

BATCHES = {
    "split_decode": lambda: Batch(decode_seqs([2000, 300, 5]), 8, 2, 128, 16, torch.bfloat16, seed=5),
    "tensor_cores": lambda: Batch([(1, 600), (33, 33), (9, 300)], 8, 2, 128, 16, torch.float16, seed=6),
    "simt_fp32": lambda: Batch([(1, 600), (33, 33), (9, 300)], 8, 2, 64, 16, torch.float32, seed=7),
    "many_decodes": lambda: Batch(decode_seqs(range(1, 600, 2)), 4, 1, 64, 16, torch.bfloat16, seed=8),
}


@pytest.mark.parametrize("max_seqlens", ["computed", "exact", "k_at_max_model_len", "q_at_num_tokens", "q_only"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_max_seqlen_arguments(name, max_seqlens):
    """Exact values, -1 (computed with a device sync), and upper bounds: max_seqlen_k at the model's
    length (what a graph captured for the longest context passes: more splits, most of them empty),
    max_seqlen_q at num_tokens (a decode batch planned as a prefill: the tensor-core kernel on q_len 1)."""
    batch = BATCHES[name]()
    exact = batch.max_seqlens()
    kwargs = {"computed": {}, "exact": exact, "k_at_max_model_len": dict(exact, max_seqlen_k=32768),
              "q_at_num_tokens": dict(exact, max_seqlen_q=batch.query.shape[0]),
              "q_only": dict(max_seqlen_q=exact["max_seqlen_q"])}[max_seqlens]
    check(batch, "cuda", **kwargs)


def test_bad_max_seqlens_and_devices_name_the_argument():
    batch = BATCHES["tensor_cores"]()
    args = batch.args(device="cuda")
    with pytest.raises(ValueError, match=r"max_seqlen_q=0 must be in \[1, num_tokens=43\] on the GPU"):
        tidal.ops.paged_attention(*args, max_seqlen_q=0, max_seqlen_k=600)
    with pytest.raises(ValueError, match=r"max_seqlen_q=44 must be in \[1, num_tokens=43\] on the GPU"):
        tidal.ops.paged_attention(*args, max_seqlen_q=44, max_seqlen_k=600)
    with pytest.raises(ValueError, match="max_seqlen_k=20 must be >= max_seqlen_q=33"):
        tidal.ops.paged_attention(*args, max_seqlen_q=33, max_seqlen_k=20)
    with pytest.raises(ValueError, match="key_cache is on cpu but query is on cuda"):
        tidal.ops.paged_attention(args[0], batch.key_cache, *args[2:])
    with pytest.raises(ValueError, match="seq_lens is on cpu but query is on cuda"):
        tidal.ops.paged_attention(*args[:4], batch.seq_lens, *args[5:])


# ---- misaligned inputs: the fallbacks ----------------------------------------------------------

def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CUDA copy of t whose data starts one element past a 16-byte boundary."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("what", ["query", "caches"])
@pytest.mark.parametrize("kind", ["mixed", "decode_split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_misaligned_inputs(dtype, kind, what):
    """The tensor-core kernel moves 16-byte chunks: a query or cache off that alignment falls back to
    the SIMT kernel, and a misaligned cache to its scalar loads."""
    num_heads, head_dim = 4, 64
    seqs = batch_kinds(16)["mixed"] + [(40, 300)] if kind == "mixed" else decode_seqs([1500, 700])
    num_tokens = sum(q for q, _ in seqs)
    query = None
    if what == "query":  # token stride not a multiple of 8, data 2 or 4 bytes off
        buffer = torch.randn(num_tokens, num_heads * head_dim + 3).to(dtype)
        query = buffer[:, 1:1 + num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    batch = Batch(seqs, num_heads, 2, head_dim, 16, dtype, seed=9, query=query)
    expected = batch.reference()
    batch.poison_unread()
    args = list(batch.args(device="cuda"))
    if what == "caches":
        args[1], args[2] = misaligned_copy(batch.key_cache), misaligned_copy(batch.value_cache)
    else:
        assert args[0].data_ptr() % 16 != 0
    out = tidal.ops.paged_attention(*args, **batch.max_seqlens())
    assert_close(out, expected)
    assert_close(out, batch.run())


# ---- CUDA graphs and streams -------------------------------------------------------------------

def capture(static_args, **max_seqlens):
    """Captures paged_attention on static_args (warmed up on a side stream first) and returns the graph
    and its output tensor, as the engine's decode graphs do (no autograd: the direct path)."""
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm), torch.no_grad():
        tidal.ops.paged_attention(*static_args, **max_seqlens)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = tidal.ops.paged_attention(*static_args, **max_seqlens)
    return graph, out


def replay_and_check(graph, static_out, static_args, batch: Batch):
    """Copies batch (same shapes as the captured one) into the static tensors, replays, and checks."""
    expected = batch.reference()
    batch.poison_unread()
    for static, new in zip(static_args[:6], batch.args()[:6]):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_out, expected)
    assert_close(static_out, batch.run())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_graph_captured_at_max_model_len(dtype):
    """Captured once with max_seqlen_k = 4096 (the split count for the longest context); replayed on
    new contexts, block tables, queries and cache contents, short ones included (empty splits)."""
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=dtype, num_blocks=1100,
                 max_num_blocks=256)
    first = Batch(decode_seqs([4096, 1, 17, 300]), seed=10, **shape)
    static_args = first.args(device="cuda")
    graph, static_out = capture(static_args, max_seqlen_q=1, max_seqlen_k=4096)
    assert splits_keys(first, max_seqlen_k=4096)
    for seed, contexts in enumerate(([4096, 1, 17, 300], [5, 4000, 129, 2048], [1, 2, 3, 16]), start=11):
        replay_and_check(graph, static_out, static_args, Batch(decode_seqs(contexts), seed=seed, **shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_graph_replayed_on_new_query_splits(dtype):
    """A captured mixed step (tensor cores in bf16, SIMT rows in fp32): the same 64 query tokens split
    differently between sequences on each replay (cu_seqlens_q contents change)."""
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=dtype, num_blocks=200,
                 max_num_blocks=64)
    layouts = ([(1, 900), (60, 60), (3, 500)], [(40, 1000), (1, 1), (23, 23)], [(1, 30), (1, 31), (62, 600)])
    first = Batch(layouts[0], seed=20, **shape)
    static_args = first.args(device="cuda")
    graph, static_out = capture(static_args, max_seqlen_q=64, max_seqlen_k=1024)
    for seed, seqs in enumerate(layouts, start=21):
        replay_and_check(graph, static_out, static_args, Batch(seqs, seed=seed, **shape))


# ---- seq_order: the grid takes the sequences longest first (the GPU model runner's order) ----

ORDERED_BATCHES = dict(BATCHES, **{
    "tensor_core_decode": lambda: Batch(decode_seqs([5, 2000, 17, 1100, 64, 1]), 16, 8, 128, 16, torch.bfloat16,
                                        seed=30),
    "many_decodes_gqa": lambda: Batch(decode_seqs(range(1, 1200, 7)), 16, 8, 128, 16, torch.bfloat16, seed=31),
    "prefill_fp16": lambda: Batch([(40, 40), (1, 3000), (7, 900), (64, 64)], 8, 2, 128, 16, torch.float16, seed=32),
})


@pytest.mark.parametrize("name", list(ORDERED_BATCHES))
def test_seq_order_every_kernel(name):
    """Every GPU kernel (split and unsplit decode on tensor cores and SIMT, prefill, mixed) gives the
    same bits with the sequences taken longest first or in a random order, in-kernel split merge
    included."""
    batch = ORDERED_BATCHES[name]()
    expected = batch.reference()
    batch.poison_unread()
    args = batch.args(device="cuda")
    num_seqs = batch.seq_lens.shape[0]
    counters = torch.zeros(num_seqs * batch.query.shape[1], dtype=torch.int32, device="cuda")
    plain = tidal.ops.paged_attention(*args, **batch.max_seqlens())
    assert_close(plain, expected)
    random = torch.randperm(num_seqs, generator=torch.Generator().manual_seed(4)).to(torch.int32)
    for order in (longest_first(batch), random):
        for split_counters in (None, counters):
            out = tidal.ops.paged_attention(*args, **batch.max_seqlens(), split_counters=split_counters,
                                            seq_order=order.cuda())
            assert torch.equal(out, plain), (order, split_counters is not None)
    assert not counters.any()  # every in-kernel merge left its counter at zero


def test_seq_order_in_a_graph():
    """A decode graph captured with an order buffer replays right as the order changes with the batch."""
    shape = dict(num_heads=16, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, num_blocks=900,
                 max_num_blocks=256)
    first = Batch(decode_seqs([4096, 1, 17, 300]), seed=33, **shape)
    static_args = first.args(device="cuda")
    order = longest_first(first).cuda()
    graph, static_out = capture(static_args, max_seqlen_q=1, max_seqlen_k=4096, seq_order=order)
    for seed, contexts in enumerate(([4096, 1, 17, 300], [5, 4000, 129, 2048], [1, 2, 3, 16]), start=34):
        batch = Batch(decode_seqs(contexts), seed=seed, **shape)
        order.copy_(longest_first(batch))
        replay_and_check(graph, static_out, static_args, batch)


@pytest.mark.parametrize("name", ["split_decode", "tensor_cores", "simt_fp32"])
def test_side_stream(name):
    batch = BATCHES[name]()
    expected = batch.reference()
    args = batch.args(device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launched on torch's current stream, whatever it is
        out = tidal.ops.paged_attention(*args, **batch.max_seqlens())
    torch.cuda.current_stream().wait_stream(side)
    assert_close(out, expected)


# ---- FP8 E4M3 caches (uint8 codes, scale 1): the tensor-core kernels convert them in shared memory ----

def fp8_codes(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


def to_fp8_caches(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes of the batch's caches (keys spread wider, some saturated); the batch's own caches
    become the codes widened back, so its reference and 16-bit run read exactly what the codes hold."""
    k_codes = fp8_codes(batch.key_cache.float() * 3)
    v_codes = fp8_codes(batch.value_cache.float() / 4)  # values down to FP8's subnormals
    dtype = batch.key_cache.dtype
    batch.key_cache = k_codes.view(torch.float8_e4m3fn).float().to(dtype)
    batch.value_cache = v_codes.view(torch.float8_e4m3fn).float().to(dtype)
    return k_codes, v_codes


def check_fp8(batch: Batch, sliding_window=-1, **max_seqlens):
    k_codes, v_codes = to_fp8_caches(batch)
    expected = batch.reference(sliding_window)
    args = list(batch.args(sliding_window, device="cuda"))
    args[1], args[2] = k_codes.cuda(), v_codes.cuda()
    out = tidal.ops.paged_attention(*args, **max_seqlens)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    assert_close(out, expected)
    assert_close(out, batch.run(sliding_window, "cuda", **max_seqlens))  # the kernel over widened caches


@pytest.mark.parametrize("block_size", [16, 1, 32])
@pytest.mark.parametrize("kind", ["decode", "prefill", "chunked_prefill", "mixed"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_caches(dtype, head_dim, kind, block_size):
    batch = Batch(batch_kinds(block_size)[kind], 8, 2, head_dim, block_size, dtype, seed=head_dim + block_size)
    check_fp8(batch, **batch.max_seqlens())


@pytest.mark.parametrize("heads", [(4, 4), (8, 4), (8, 1), (32, 1)], ids=lambda h: f"h{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("contexts", [(3000, 700), (1, 2, 17, 120)], ids=["split", "short"])
def test_fp8_decode_gqa_ratios_and_splits(contexts, heads):
    """Decode over FP8 takes the tensor-core kernel for every group, one query head per KV head
    included, split-K for few long sequences."""
    batch = Batch(decode_seqs(contexts), *heads, 128, 16, torch.bfloat16, seed=heads[0] + heads[1])
    assert splits_keys(batch) == (max(contexts) > 128)
    check_fp8(batch, **batch.max_seqlens())


@pytest.mark.parametrize("window", [1, 7, 100])
def test_fp8_sliding_window_and_long_prefix(window):
    seqs = batch_kinds(16)["mixed"] + [(37, 1500), (1, 2000)]
    batch = Batch(seqs, 8, 2, 128, 16, torch.bfloat16, seed=window)
    check_fp8(batch, window, **batch.max_seqlens())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_codes_are_read_exactly(dtype):
    """Every finite code (NaN's two left out), subnormals and +-448 included: a query row that sees one
    key returns that key's value row, so each output element is its code's value, bit for bit."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # 254 codes: two rows of 127
    v_codes = torch.zeros(1, 16, 1, 128, dtype=torch.uint8)
    v_codes[0, 0, 0, :127], v_codes[0, 1, 0, :127] = codes[:127], codes[127:]
    k_codes = torch.zeros_like(v_codes)
    k_codes[0, 0] = fp8_codes(torch.full((1, 128), -448.0))  # key 0 loses to key 1 against a positive query
    k_codes[0, 1] = fp8_codes(torch.full((1, 128), 448.0))
    rows = [v_codes[0, i, 0].view(torch.float8_e4m3fn).to(dtype) for i in range(2)]
    cuda = lambda *xs: [torch.tensor(x, dtype=torch.int32, device="cuda") for x in xs]  # noqa: E731

    def run(seq_lens, cu_seqlens_q, max_seqlen_q):
        query = torch.ones(cu_seqlens_q[-1], 1, 128, dtype=dtype, device="cuda")
        table, lens, cu = cuda([[0]] * len(seq_lens), seq_lens, cu_seqlens_q)
        return tidal.ops.paged_attention(query, k_codes.cuda(), v_codes.cuda(), table, lens, cu, 1.0, -1,
                                         max_seqlen_q, max(seq_lens)).cpu()

    out = run([1, 2], [0, 1, 2], 1)  # decode: one key, then key 1 alone carries the softmax
    assert torch.equal(out[0, 0], rows[0]) and torch.equal(out[1, 0], rows[1])
    out = run([1, 2], [0, 1, 3], 2)  # the prefill kernel: rows 0 and 1 see key 0 alone, row 2 key 1
    assert torch.equal(out[0, 0], rows[0]) and torch.equal(out[1, 0], rows[0]) and torch.equal(out[2, 0], rows[1])


def test_fp8_caches_refused_where_no_kernel_reads_them():
    codes = torch.zeros(2, 16, 2, 64, dtype=torch.uint8, device="cuda")
    args = (codes, codes.clone(), torch.zeros(1, 2, dtype=torch.int32, device="cuda"),
            torch.tensor([5], dtype=torch.int32, device="cuda"), torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
            0.125, -1, 1, 5)
    with pytest.raises(ValueError, match="FP8 KV cache on the GPU needs float16 or bfloat16 .* query.dtype=float32"):
        tidal.ops.paged_attention(torch.randn(1, 4, 64, device="cuda"), *args)
    odd = torch.zeros(2, 16, 2, 40, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="head_dim=40"):
        tidal.ops.paged_attention(torch.randn(1, 4, 40, device="cuda", dtype=torch.bfloat16), odd, odd.clone(),
                                  *args[2:])


# ---- key splits merged inside the kernel (split_counters) --------------------------------------

def counters_for(batch: Batch) -> torch.Tensor:
    return torch.zeros(batch.seq_lens.shape[0] * batch.query.shape[1], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("shape", [(8, 2, 128, torch.bfloat16), (32, 8, 128, torch.float16), (8, 1, 64, torch.bfloat16),
                                   (16, 2, 256, torch.bfloat16), (4, 4, 128, torch.bfloat16),
                                   (8, 2, 128, torch.float32), (6, 3, 80, torch.float32), (4, 4, 16, torch.float16)],
                         ids=lambda s: f"h{s[0]}_kv{s[1]}_d{s[2]}_{str(s[3])[6:]}")
def test_split_counters_merge_in_the_kernel(shape):
    """The last split of each (sequence, KV head) to finish merges the splits (the tensor-core decode
    kernel for GQA in 16-bit types, the SIMT kernel for one query head per KV head, fp32 and odd head
    sizes): the same bits as the second kernel's merge, the reference's values, and every counter
    back at zero after each of three calls in a row (contexts ending mid-block, one of one key)."""
    heads, kv_heads, head_dim, dtype = shape
    counters = None
    for seed, contexts in enumerate(([5000, 257, 1003], [1, 4999, 300], [129, 130, 2049]), start=40):
        batch = Batch(decode_seqs(contexts), heads, kv_heads, head_dim, 16, dtype, seed=seed)
        assert splits_keys(batch)
        counters = counters_for(batch) if counters is None else counters
        expected = batch.reference()
        batch.poison_unread()
        separate = batch.run(-1, "cuda", **batch.max_seqlens())
        merged = batch.run(-1, "cuda", split_counters=counters, **batch.max_seqlens())
        assert torch.equal(merged, separate)
        assert_close(merged, expected)
        assert int(counters.abs().sum()) == 0


def test_split_counters_over_fp8_caches():
    batch = Batch(decode_seqs([3000, 700]), 8, 2, 128, 16, torch.bfloat16, seed=50)
    assert splits_keys(batch)
    k_codes, v_codes = to_fp8_caches(batch)
    expected = batch.reference()
    args = list(batch.args(device="cuda"))
    args[1], args[2] = k_codes.cuda(), v_codes.cuda()
    counters = counters_for(batch)
    merged = tidal.ops.paged_attention(*args, **batch.max_seqlens(), split_counters=counters)
    assert torch.equal(merged, tidal.ops.paged_attention(*args, **batch.max_seqlens()))
    assert_close(merged, expected)
    assert int(counters.abs().sum()) == 0


def test_split_counters_too_few_or_unsplit_fall_back():
    """Fewer counters than the grid needs: the second kernel merges (the counters untouched); a plan
    that does not split leaves them alone too; the same outputs either way."""
    split = Batch(decode_seqs([3000, 700]), 8, 2, 128, 16, torch.bfloat16, seed=51)
    # 2,400 blocks (300 sequences x 8 KV heads): past 8 per SM on a 132-SM card, so no split
    whole = Batch(decode_seqs(range(1, 600, 2)), 8, 8, 64, 16, torch.bfloat16, seed=52)
    assert splits_keys(split) and not splits_keys(whole)
    for batch, counters in ((split, torch.full((3,), 7, dtype=torch.int32, device="cuda")),
                            (whole, torch.full((1200,), 7, dtype=torch.int32, device="cuda"))):
        out = batch.run(-1, "cuda", split_counters=counters, **batch.max_seqlens())
        assert_close(out, batch.reference())
        assert torch.equal(out, batch.run(-1, "cuda", **batch.max_seqlens()))
        assert bool((counters == 7).all())


def test_split_counters_in_a_graph_captured_at_max_model_len():
    """As the GPU model runner uses them: one set of counters in a graph captured with max_seqlen_k at
    its largest (64 splits, most of them empty on short contexts), replayed on new batches."""
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16, num_blocks=1100,
                 max_num_blocks=256)
    first = Batch(decode_seqs([4096, 1, 17, 300]), seed=53, **shape)
    static_args = first.args(device="cuda")
    counters = counters_for(first)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm), torch.no_grad():
        tidal.ops.paged_attention(*static_args, max_seqlen_q=1, max_seqlen_k=4096, split_counters=counters)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = tidal.ops.paged_attention(*static_args, max_seqlen_q=1, max_seqlen_k=4096,
                                               split_counters=counters)
    for seed, contexts in enumerate(([4096, 1, 17, 300], [5, 4000, 129, 2048], [1, 2, 3, 16]), start=54):
        replay_and_check(graph, static_out, static_args, Batch(decode_seqs(contexts), seed=seed, **shape))
        assert int(counters.abs().sum()) == 0


def test_split_counters_checked_by_name():
    batch = BATCHES["split_decode"]()
    args = batch.args(device="cuda")
    with pytest.raises(ValueError, match="split_counters must be contiguous torch.int32, got torch.int64"):
        tidal.ops.paged_attention(*args, split_counters=torch.zeros(64, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="split_counters is on cpu but query is on cuda"):
        tidal.ops.paged_attention(*args, split_counters=torch.zeros(64, dtype=torch.int32))
