"""paged_attention against a pure-torch fp32 reference: per sequence, gather K/V through the block
table, dense causal (+ sliding window) softmax attention with GQA by repeat_interleave. Prefill,
chunked prefill over a cached prefix, decode and all three mixed; GQA ratios and MQA; block sizes
1 / 16 / larger than the kernel's key tile; shuffled block tables; strided queries; errors. Every
cache slot no query may read is NaN, so a kernel that reads one shows it. On CPU here and on CUDA
where there is a GPU (there also against the CPU kernel); the GPU-specific paths (split-K, the
tensor-core kernel, CUDA graphs, max_seqlen_q / max_seqlen_k) are in test_paged_attention_cuda.py."""

import math
import os
import subprocess
import sys

import pytest
import torch

import tidal
from conftest import DEVICES, assert_close, cuda_param, poison_cuda_allocator, to_device


def ref_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                        sliding_window=-1):
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32)
    for s in range(seq_lens.shape[0]):
        q_begin, q_end = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        q_len, seq_len = q_end - q_begin, int(seq_lens[s])
        if q_len == 0:
            continue
        blocks = block_tables[s, :math.ceil(seq_len / block_size)].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [seq_len, num_heads, hd]
        q = query[q_begin:q_end].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = seq_len - q_len + torch.arange(q_len)
        key_pos = torch.arange(seq_len)
        visible = key_pos[None, :] <= pos[:, None]
        if sliding_window > 0:
            visible &= key_pos[None, :] > pos[:, None] - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out.to(query.dtype)


class Batch:
    """A flat batch over a paged cache: seqs is a list of (q_len, seq_len)."""

    def __init__(self, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, num_spare_blocks=3,
                 query=None, pad_value=0, num_blocks=None, max_num_blocks=None):
        g = torch.Generator().manual_seed(seed)
        blocks_per_seq = [math.ceil(seq_len / block_size) for _, seq_len in seqs]
        num_blocks = num_blocks or sum(blocks_per_seq) + num_spare_blocks
        max_blocks = max_num_blocks or max(blocks_per_seq + [1]) + 1  # one column wider than needed
        ids = torch.randperm(num_blocks, generator=g).to(torch.int32)  # non-contiguous, shuffled
        self.block_tables = torch.full((len(seqs), max_blocks), pad_value, dtype=torch.int32)
        used = 0
        for s, n in enumerate(blocks_per_seq):
            self.block_tables[s, :n] = ids[used:used + n]
            used += n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = torch.randn(*shape, generator=g).to(dtype)
        self.value_cache = torch.randn(*shape, generator=g).to(dtype)
        self.seq_lens = torch.tensor([seq_len for _, seq_len in seqs], dtype=torch.int32)
        q_lens = torch.tensor([q_len for q_len, _ in seqs], dtype=torch.int32)
        self.cu_seqlens_q = torch.cat((torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)))
        num_tokens = int(q_lens.sum())
        self.query = query if query is not None else torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
        self.scale = head_dim ** -0.5

    def args(self, sliding_window=-1, device="cpu"):
        """On another device: copies (the query's strides kept)."""
        if device == "cpu":
            return (self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                    self.cu_seqlens_q, self.scale, sliding_window)
        tensors = (self.key_cache, self.value_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q)
        return (to_device(self.query, device), *(t.to(device) for t in tensors), self.scale, sliding_window)

    def run(self, sliding_window=-1, device="cpu", **max_seqlens):
        args = self.args(sliding_window, device)
        if device == "cuda":  # the output lands on NaN: a row the kernel skips shows
            poison_cuda_allocator(self.query.numel() * self.query.element_size())
        return tidal.ops.paged_attention(*args, **max_seqlens)

    def reference(self, sliding_window=-1):
        return ref_paged_attention(*self.args(sliding_window))

    def max_seqlens(self):
        """The exact max_seqlen_q / max_seqlen_k of the batch, as the engine passes them."""
        q_lens = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        return dict(max_seqlen_q=max(int(q_lens.max()), 1) if len(q_lens) else 1,
                    max_seqlen_k=max(int(self.seq_lens.max()), 1) if len(q_lens) else 1)

    def poison_unread(self, sliding_window=-1):
        """NaN into every cache slot that no query row of the batch may read (past each context,
        before each sliding window, blocks no sequence owns): a kernel that reads one, even to mask
        it, turns its output NaN. Call after the reference."""
        block_size = self.key_cache.shape[1]
        read = torch.zeros(self.key_cache.shape[0] * block_size, dtype=torch.bool)
        for s in range(self.seq_lens.shape[0]):
            q_len, seq_len = int(self.cu_seqlens_q[s + 1] - self.cu_seqlens_q[s]), int(self.seq_lens[s])
            if q_len == 0:
                continue
            first = max(0, seq_len - q_len - sliding_window + 1) if sliding_window > 0 else 0
            pos = torch.arange(first, seq_len)
            read[self.block_tables[s, pos // block_size].long() * block_size + pos % block_size] = True
        for cache in (self.key_cache, self.value_cache):
            cache.view(read.shape[0], -1)[~read] = float("nan")


def check(batch: Batch, device: str, sliding_window=-1, **max_seqlens) -> torch.Tensor:
    """batch on `device` against the reference, with the unread cache slots poisoned; on CUDA also
    against the CPU kernel."""
    expected = batch.reference(sliding_window)
    batch.poison_unread(sliding_window)
    out = batch.run(sliding_window, device, **max_seqlens)
    assert out.device.type == device and out.dtype == batch.query.dtype and out.is_contiguous()
    assert out.shape == batch.query.shape
    assert_close(out, expected)
    if device == "cuda":  # cross-backend: the GPU kernel equals the CPU kernel
        assert_close(out, batch.run(sliding_window))
    return out


def batch_kinds(bs):
    lengths = [1, bs - 1, bs, bs + 1, 3 * bs + 2]
    prefill = [(n, n) for n in lengths if n > 0]
    chunked = [(5, 2 * bs + 5), (bs, 3 * bs), (bs + 1, 4 * bs + 3), (1, bs + 1), (3, 3)]
    decode = [(1, n) for n in (1, 2, bs - 1, bs, bs + 1, 2 * bs + 7, 5 * bs, 40, 77) if n > 0]
    return {"prefill": prefill, "chunked_prefill": chunked, "decode": decode, "mixed": decode[:4] + prefill + chunked}


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # GQA ratios 1, 2, 4 and MQA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["prefill", "chunked_prefill", "decode", "mixed"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}_kv{h[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention(dtype, heads, head_dim, block_size, kind, device):
    seqs = batch_kinds(block_size)[kind]
    batch = Batch(seqs, *heads, head_dim, block_size, dtype, seed=head_dim + block_size)
    check(batch, device, **batch.max_seqlens())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 5, 16, 50, 200])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window(dtype, block_size, window, device):
    seqs = batch_kinds(block_size)["mixed"] + [(20, 120), (1, 130)]
    batch = Batch(seqs, 4, 2, 64, block_size, dtype, seed=window)
    out = check(batch, device, window)
    if window >= 130:  # the window covers every context: no window at all
        assert_close(out, batch.run(-1, device))


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_blocks_outside_the_window_are_never_read(device):
    """With a window, the blocks before it may hold anything: NaN, and on the CPU (which checks the ids
    it reads) even invalid ids. On the GPU an invalid id would be a wild read, so they point at a
    NaN block there."""
    seqs = [(1, 100), (4, 64)]
    batch = Batch(seqs, 4, 2, 64, 16, torch.float32, seed=1)
    expected = batch.reference(10)
    batch.poison_unread(10)
    spare = int(batch.block_tables[0, 0])  # before the window: NaN now
    batch.block_tables[0, :5] = -7 if device == "cpu" else spare  # keys 0..79: before the window of position 99
    batch.block_tables[1, :2] = 10**6 if device == "cpu" else spare  # keys 0..31: before positions 60..63's
    assert_close(batch.run(10, device), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [1, 5, 36, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, cuda_param(torch.float16, id="float16"),
                                   cuda_param(torch.bfloat16, id="bfloat16")])
def test_odd_head_dims(dtype, head_dim, device):
    seqs = [(1, 37), (9, 9), (3, 20)]
    batch = Batch(seqs, 4, 2, head_dim, 16, dtype, seed=head_dim)
    check(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [7, 48, 100])  # not a power of two; larger than a 32-key tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_block_sizes(dtype, block_size, device):
    seqs = [(1, 1), (1, 2 * block_size + 3), (block_size + 2, block_size + 2), (5, 3 * block_size)]
    batch = Batch(seqs, 8, 2, 64, block_size, dtype, seed=block_size)
    check(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(20, 1), (32, 2), (48, 3)], ids=lambda h: f"h{h[0]}_kv{h[1]}")
def test_large_groups(heads, device):
    """A KV head's group larger than one work item's 16 rows is split across items."""
    batch = Batch(batch_kinds(16)["mixed"], *heads, 64, 16, torch.float32, seed=heads[0])
    check(batch, device)


@pytest.mark.parametrize("device", DEVICES)
def test_long_contexts(device):
    seqs = [(1, 1400), (1, 1023), (300, 300), (64, 900)]
    batch = Batch(seqs, 4, 2, 64, 16, torch.float32, seed=2)
    check(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_query_from_fused_qkv(dtype, device):
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    seqs = [(1, 30), (7, 7), (3, 40)]
    num_tokens = sum(q for q, _ in seqs)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    query = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    assert not query.is_contiguous()
    batch = Batch(seqs, num_heads, num_kv_heads, head_dim, 16, dtype, seed=3, query=query)
    check(batch, device)
    transposed = query.contiguous().transpose(1, 2).contiguous().transpose(1, 2)  # head stride 1
    batch.query = transposed
    check(batch, device)


@pytest.mark.parametrize("device", DEVICES)
def test_sequences_without_new_tokens_and_empty_batches(device):
    seqs = [(0, 10), (3, 12), (0, 1), (1, 5)]
    batch = Batch(seqs, 4, 2, 64, 16, torch.float32, seed=4)
    check(batch, device)
    empty = Batch([], 4, 2, 64, 16, torch.float32, seed=5)
    assert empty.run(device=device).shape == (0, 4, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_unused_block_table_entries_are_never_read(device):
    batch = Batch(batch_kinds(16)["mixed"], 4, 2, 64, 16, torch.float32, seed=6, pad_value=-1)
    check(batch, device)


def test_threads_give_identical_results():
    batch = Batch([(1, 300 + 7 * i) for i in range(32)] + [(200, 260)], 4, 2, 64, 16, torch.float32, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # torch and tidal share one OpenMP runtime
        one = batch.run()
        torch.set_num_threads(max(2, threads))
        many = batch.run()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, atol=0, rtol=0)
    assert_close(many, batch.reference())


def check_baseline_build():
    """Runs in a subprocess with TIDAL_CPU_BASELINE=1: the kernels' non-AVX2 versions."""
    for dtype in DTYPES:
        for heads in HEADS:
            batch = Batch(batch_kinds(16)["mixed"], *heads, 64, 16, dtype, seed=8)
            assert_close(batch.run(), batch.reference())
            assert_close(batch.run(20), batch.reference(20))
        odd = Batch([(1, 37), (9, 9)], 4, 2, 36, 7, dtype, seed=9)
        assert_close(odd.run(), odd.reference())


def test_baseline_versions_without_avx2():
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
            "import test_paged_attention as t; t.check_baseline_build(); print('ok')")
    env = dict(os.environ, TIDAL_CPU_BASELINE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
def test_special_values_propagate(device):
    batch = Batch([(1, 20), (2, 20)], 4, 2, 64, 16, torch.float32, seed=10)
    bad_block = int(batch.block_tables[0, 0])
    batch.value_cache[bad_block, 3, 0, 5] = float("nan")
    out = batch.run(device=device).cpu()
    assert torch.isnan(out[0, :2, 5]).all()  # sequence 0's heads of kv head 0 read it
    assert not torch.isnan(out[1:]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        (Batch([(1, 20), (5, 5), (3, 19)], 4, 2, 64, 16, torch.float32, seed=11).args(device=device), {}),
        (Batch([(2, 9), (1, 1)], 4, 1, 32, 4, torch.bfloat16, seed=12).args(7, device), {}),
        (Batch([(7, 40), (1, 300)], 8, 2, 128, 16, torch.float16, seed=13).args(device=device),
         dict(max_seqlen_q=7, max_seqlen_k=4096)),
        (Batch([(1, 20), (5, 5), (3, 19)], 4, 2, 64, 16, torch.bfloat16, seed=14).args(device=device),
         dict(max_seqlen_q=5, max_seqlen_k=20, seq_order=torch.tensor([0, 2, 1], dtype=torch.int32, device=device))),
    ]
    for args, kwargs in samples:
        torch.library.opcheck(torch.ops.tidal.paged_attention.default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["rotary_then_cache", "rotary_and_cache"])
def test_chunked_steps_through_the_cache_match_one_dense_pass(fused, device):
    """The serving composition: rotary on fused-qkv views, the cache write (reshape_and_cache_, or
    both in rotary_embedding_and_cache_), paged_attention, over three steps (prefill chunk, rest of
    the prompt, decode) equals one dense causal pass."""
    num_heads, num_kv_heads, head_dim, block_size, seq_len = 4, 2, 64, 16, 40
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(seq_len, q_size + 2 * kv_size, generator=torch.Generator().manual_seed(14))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(64).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1)
    key_cache = torch.full((6, block_size, num_kv_heads, head_dim), float("nan"), device=device)
    value_cache = torch.full_like(key_cache, float("nan"))
    block_table = torch.tensor([[4, 1, 5, 0]], dtype=torch.int32)
    outs = []
    for start, end in ((0, 13), (13, 39), (39, 40)):
        step = qkv[start:end].to(device, copy=True)
        q, k, v = step.split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, num_heads, head_dim)
        k, v = k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
        positions = torch.arange(start, end)
        slots = (block_table[0, positions // block_size].long() * block_size + positions % block_size)
        if fused:
            tidal.ops.rotary_embedding_and_cache_(positions.to(device), q, k, v, key_cache, value_cache,
                                                  slots.to(device), cos_sin.to(device))
        else:
            tidal.ops.rotary_embedding_(positions.to(device), q, k, head_dim, cos_sin.to(device))
            tidal.ops.reshape_and_cache_(k, v, key_cache, value_cache, slots.to(device))
        outs.append(tidal.ops.paged_attention(q, key_cache, value_cache, block_table.to(device),
                                              torch.tensor([end], dtype=torch.int32, device=device),
                                              torch.tensor([0, end - start], dtype=torch.int32, device=device),
                                              head_dim ** -0.5, max_seqlen_q=end - start, max_seqlen_k=end))
    q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
    q, k, v = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
    cos, sin = cos_sin[:seq_len].chunk(2, -1)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]

    def rotate(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    q, k = rotate(q).transpose(0, 1), rotate(k).transpose(0, 1).repeat_interleave(2, 0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(0, 1).repeat_interleave(2, 0),
                                                             is_causal=True).transpose(0, 1)
    assert_close(torch.cat(outs), dense)


# ---- errors ------------------------------------------------------------------------------------

def longest_first(batch: Batch) -> torch.Tensor:
    """The GPU model runner's order: sequences by descending context length, ties in batch order."""
    return torch.sort(batch.seq_lens.long(), descending=True, stable=True).indices.to(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_seq_order_changes_no_output(kind, device):
    """The order in which the kernels take the sequences changes no bit of the output: longest first,
    a random permutation and the identity, each against the unordered call and the reference."""
    batch = Batch(batch_kinds(16)[kind], 8, 2, 64, 16, torch.bfloat16, seed=21)
    expected = batch.reference()
    batch.poison_unread()
    plain = batch.run(device=device)
    assert_close(plain, expected)
    num_seqs = batch.seq_lens.shape[0]
    random = torch.randperm(num_seqs, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    orders = (longest_first(batch), random, torch.arange(num_seqs, dtype=torch.int32))
    for order in orders:
        out = tidal.ops.paged_attention(*batch.args(device=device), seq_order=order.to(device))
        assert torch.equal(out, plain), order


def test_bad_seq_order_names_the_argument():
    b = small_batch()
    args = b.args()
    with pytest.raises(ValueError, match=r"seq_order must be \[num_seqs\] = \[2\] torch.int32, got torch.int64"):
        tidal.ops.paged_attention(*args, seq_order=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"seq_order must be \[num_seqs\] = \[2\] torch.int32, .* shape \(3,\)"):
        tidal.ops.paged_attention(*args, seq_order=torch.tensor([1, 0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_order must be a permutation of 0 .. 1, but seq_order\[1\]=0 repeats"):
        tidal.ops.paged_attention(*args, seq_order=torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_order\[0\]=2 is out of range"):
        tidal.ops.paged_attention(*args, seq_order=torch.tensor([2, 0], dtype=torch.int32))


def small_batch():
    return Batch([(2, 20), (1, 5)], 4, 2, 64, 16, torch.float32, seed=13)


def test_bad_metadata_names_the_argument():
    b = small_batch()

    def run(**changes):
        args = dict(zip(["query", "key_cache", "value_cache", "block_tables", "seq_lens", "cu_seqlens_q", "scale",
                         "sliding_window"], b.args()))
        args.update(changes)
        return tidal.ops.paged_attention(**args)

    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\]=1 must be 0"):
        run(cu_seqlens_q=torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\]=1 < "
                                         r"cu_seqlens_q\[1\]=3"):
        run(cu_seqlens_q=torch.tensor([0, 3, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[2\]=2 must equal num_tokens=query.shape\[0\]=3"):
        run(cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sequence 1 has q_len=1 .* but seq_lens\[1\]=0; need q_len <= seq_len"):
        run(seq_lens=torch.tensor([20, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sequence 0 has q_len=2 .* seq_lens\[0\]=1"):
        run(seq_lens=torch.tensor([1, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_tables.shape\[1\]=3 is too narrow: seq_lens\[0\]=49 with "
                                         r"block_size=16 needs 4 blocks"):
        run(seq_lens=torch.tensor([49, 5], dtype=torch.int32))
    with pytest.raises(IndexError, match=r"block_tables\[1, 0\]=99 is out of range \[0, num_blocks=6\)"):
        tables = b.block_tables.clone()
        tables[1, 0] = 99
        run(block_tables=tables)
    with pytest.raises(IndexError, match=r"block_tables\[0, 1\]=-1 is out of range"):
        tables = b.block_tables.clone()
        tables[0, 1] = -1
        run(block_tables=tables)
    for name in ("block_tables", "seq_lens", "cu_seqlens_q"):
        with pytest.raises(ValueError, match=rf"{name}.dtype=torch.int64 must be torch.int32"):
            run(**{name: getattr(b, name).long()})
    with pytest.raises(ValueError, match=r"seq_lens.shape=\(3,\) must be \[num_seqs\] = \[2\]"):
        run(seq_lens=torch.tensor([20, 5, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q.shape=\(2,\) must be \[num_seqs \+ 1\] = \[3\]"):
        run(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32))


def test_bad_tensors_name_the_argument():
    b = small_batch()
    q, kc, vc, bt, sl, cu, scale, _ = b.args()
    with pytest.raises(ValueError, match=r"num_heads=query.shape\[1\]=3 must be a multiple of "
                                         r"num_kv_heads=key_cache.shape\[2\]=2"):
        tidal.ops.paged_attention(q[:, :3], kc, vc, bt, sl, cu, scale)
    with pytest.raises(ValueError, match="key_cache.dtype=torch.float16 must equal query.dtype=torch.float32"):
        tidal.ops.paged_attention(q, kc.half(), vc, bt, sl, cu, scale)
    with pytest.raises(ValueError, match=r"value_cache.shape=\(6, 8, 2, 64\) must equal"):
        tidal.ops.paged_attention(q, kc, vc[:, :8].contiguous(), bt, sl, cu, scale)
    with pytest.raises(ValueError, match=r"head_dim=query.shape\[2\]=300 must be in \[1, 256\]"):
        tidal.ops.paged_attention(torch.randn(3, 4, 300), torch.randn(6, 16, 2, 300), torch.randn(6, 16, 2, 300),
                                  bt, sl, cu, scale)
    with pytest.raises(ValueError, match="query.dtype=torch.int32 is not supported"):
        tidal.ops.paged_attention(q.int(), kc, vc, bt, sl, cu, scale)
    with pytest.raises(ValueError, match="scale=inf must be finite"):
        tidal.ops.paged_attention(q, kc, vc, bt, sl, cu, float("inf"))
    with pytest.raises(ValueError, match="key_cache must be contiguous"):
        tidal.ops.paged_attention(q, kc.transpose(0, 1).contiguous().transpose(0, 1), vc, bt, sl, cu, scale)


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack as c

    from tidal import _core

    b = small_batch()
    q, kc, vc, bt, sl, cu, scale, _ = b.args()

    def native(out=None, query=q, key_cache=kc, block_tables=bt, scale=scale):
        out = torch.empty_like(q) if out is None else out
        _core.ops.paged_attention(c(out), c(query), c(key_cache), c(vc), c(block_tables), c(sl), c(cu), scale, -1, 0)

    with pytest.raises(ValueError, match=r"out.shape=\[3, 4, 32\] must equal query.shape=\[3, 4, 64\]"):
        native(out=torch.empty(3, 4, 32))
    with pytest.raises(ValueError, match="out overlaps query"):
        native(out=q)
    with pytest.raises(ValueError, match=r"query.stride\(-1\)=2 must be 1"):
        native(query=torch.randn(3, 4, 128)[..., ::2])
    with pytest.raises(ValueError, match="block_tables must be 2-D"):
        native(block_tables=bt.flatten())
    with pytest.raises(ValueError, match=r"key_cache.shape\[3\]=32 must equal head_dim=query.shape\[2\]=64"):
        native(key_cache=kc[..., :32].contiguous())
    with pytest.raises(ValueError, match="scale=nan must be finite"):
        native(scale=float("nan"))
