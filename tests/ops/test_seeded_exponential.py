"""seeded_exponential_ against a pure-numpy Philox4x32-10 reference (itself checked against Random123's
known-answer vectors), on CPU here and on CUDA where there is a GPU (there also against the CPU
kernel: the same numbers on every device): determinism in (seed, offset), independence of the batch
around a row, different streams for different seeds and offsets (both 32-bit halves), vocabulary
sizes not divisible by 4, the Exp(1) distribution, the exponential race, errors, opcheck, side
streams and CUDA graph replay."""

import numpy as np
import pytest
import torch

import tidal
from conftest import DEVICES, cuda_param, gpu_only

_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, key: int):
    """Random123's Philox4x32-10 on uint64 arrays holding 32-bit words; key is a 64-bit int
    (low word first)."""
    c = [np.asarray(x, dtype=np.uint64) & _MASK for x in (c0, c1, c2, c3)]
    key = np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    k0, k1 = key & _MASK, key >> np.uint64(32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]  # < 2^64: exact
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _MASK, (k1 + np.uint64(0xBB67AE85)) & _MASK
    return c


def ref_seeded_exponential(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """out[r, v] = -log(u), u from word v % 4 of Philox(counter (v // 4, offset low, offset high, 0),
    key seed), mapped to (0, 1) as the kernels do in float32: ((bits >> 9) + 0.5) * 2^-23."""
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32)
    counters = np.arange((vocab + 3) // 4, dtype=np.uint64)
    for r, (seed, offset) in enumerate(zip(seeds.tolist(), offsets.tolist())):
        offset &= 0xFFFFFFFFFFFFFFFF
        zeros = np.zeros_like(counters)
        words = np.stack(philox4x32_10(counters, zeros + np.uint64(offset & 0xFFFFFFFF),
                                       zeros + np.uint64(offset >> 32), zeros, seed), -1).reshape(-1)[:vocab]
        u = ((words >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
        out[r] = torch.from_numpy((-np.log(u.astype(np.float64))).astype(np.float32))
    return out


def assert_same_numbers(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the last bit or so of float32 logf / std::log."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=0, rtol=1e-6)


SEEDS = [0, 1, 42, -1, 2**40 + 7, -(2**63)]
OFFSETS = [0, 1, 17, 2**32, 2**32 + 1, -5]


def batch(num_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seeds = torch.tensor([SEEDS[i % len(SEEDS)] for i in range(num_rows)], dtype=torch.int64)
    offsets = torch.tensor([OFFSETS[(i + seed) % len(OFFSETS)] for i in range(num_rows)], dtype=torch.int64)
    return seeds ^ torch.randint(0, 1000, (num_rows,), generator=g), offsets


def test_philox_reference_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    def words(*counter, key):
        return [int(w) for w in philox4x32_10(*counter, key)]

    assert words(0, 0, 0, 0, key=0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words(*[0xFFFFFFFF] * 4, key=2**64 - 1) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, key=(0x299F31D0 << 32) | 0xA4093822) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [1, 3, 4, 5, 7, 1001, 32003, cuda_param(128257, id="128257"),
                                   cuda_param(151936, id="151936")])
def test_matches_reference(vocab, device):
    seeds, offsets = batch(7, seed=vocab)
    expected = ref_seeded_exponential(seeds, offsets, vocab)
    buffer = torch.full((7, vocab + 5), float("nan"), device=device)  # poisoned, and a row stride > vocab
    out = buffer[:, :vocab]
    assert tidal.ops.seeded_exponential_(out, seeds.to(device), offsets.to(device)) is out
    assert_same_numbers(out, expected)
    assert torch.isnan(buffer[:, vocab:]).all()  # nothing written past the view
    if device == "cuda":  # cross-backend: the GPU draws the CPU's numbers
        assert_same_numbers(out, tidal.ops.seeded_exponential_(torch.empty(7, vocab), seeds, offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_independent_of_the_batch(device):
    vocab = 1003
    seeds, offsets = batch(9, seed=1)
    seeds, offsets = seeds.to(device), offsets.to(device)
    first = tidal.ops.seeded_exponential_(torch.empty(9, vocab, device=device), seeds, offsets)
    again = tidal.ops.seeded_exponential_(torch.full((9, vocab), -1.0, device=device), seeds, offsets)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    for r in (0, 4, 8):  # one row alone
        alone = tidal.ops.seeded_exponential_(torch.empty(1, vocab, device=device), seeds[r:r + 1], offsets[r:r + 1])
        torch.testing.assert_close(alone[0], first[r], atol=0, rtol=0)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2)).to(device)  # the rows shuffled
    shuffled = tidal.ops.seeded_exponential_(torch.empty(9, vocab, device=device), seeds[perm], offsets[perm])
    torch.testing.assert_close(shuffled, first[perm], atol=0, rtol=0)
    prefix = tidal.ops.seeded_exponential_(torch.empty(9, 10, device=device), seeds, offsets)  # index alone
    torch.testing.assert_close(prefix, first[:, :10], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_and_offsets_draw_different_numbers(device):
    """Each 32-bit half of the seed (the Philox key) and of the offset (counter words 1 and 2) matters."""
    pairs = [(0, 0), (1, 0), (2**32, 0), (-1, 0), (0, 1), (0, 2**32), (0, -1), (5, 7), (7, 5)]
    seeds = torch.tensor([s for s, _ in pairs], device=device)
    offsets = torch.tensor([o for _, o in pairs], device=device)
    out = tidal.ops.seeded_exponential_(torch.empty(len(pairs), 512, device=device), seeds, offsets).cpu()
    for i in range(len(pairs)):
        for j in range(i):
            assert (out[i] == out[j]).float().mean() < 0.01, (pairs[i], pairs[j])


@pytest.mark.parametrize("device", DEVICES)
def test_exp1_distribution(device):
    """2^20 draws: all positive and finite, mean and variance 1, P(E > 1) = 1/e, exp(-E) uniform."""
    rows, vocab = 256, 4096
    seeds, offsets = torch.arange(rows) * 7919, torch.arange(rows) % 3
    out = tidal.ops.seeded_exponential_(torch.empty(rows, vocab, device=device), seeds.to(device),
                                        offsets.to(device)).double().cpu()
    assert torch.isfinite(out).all() and (out > 0).all()
    assert out.max() <= -np.log(0.5 * 2.0 ** -24) + 1e-4  # the smallest u the kernels make
    assert abs(out.mean().item() - 1) < 0.01  # std of the mean: 2^-10
    assert abs(out.var().item() - 1) < 0.03
    assert abs((out > 1).double().mean().item() - np.exp(-1)) < 0.003
    hist = torch.histc(torch.exp(-out), bins=16, min=0, max=1) / out.numel()
    assert (hist - 1 / 16).abs().max() < 0.002


@pytest.mark.parametrize("device", DEVICES)
def test_exponential_race_samples_the_distribution(device):
    """argmax(p / E) over 20000 rows of independent seeds draws each index with probability p."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4], device=device)
    rows = 20000
    noise = tidal.ops.seeded_exponential_(torch.empty(rows, 5, device=device),
                                          torch.arange(rows, device=device) + 12345,
                                          torch.full((rows,), 3, device=device))
    counts = torch.bincount((p / noise).argmax(-1), minlength=5).cpu().double() / rows
    torch.testing.assert_close(counts, p.cpu().double(), atol=0.015, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_positive_for_the_largest_words(device):
    # 24 bits would round words >= 0xFFFFFF00 to u = 1.0f and noise -0.0 (p / E: NaN for p = 0).
    # (seed 1234, offset 3373889) draws word 0xffffffea at index 0; (0, 28760074): 0xffffff42 at index 0.
    seeds = torch.tensor([1234, 0], device=device)
    offsets = torch.tensor([3373889, 28760074], device=device)
    out = tidal.ops.seeded_exponential_(torch.empty(2, 4, device=device), seeds, offsets)
    assert (out > 0).all(), out


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    one = torch.zeros(1, dtype=torch.int64, device=device)
    for rows, vocab in ((0, 16), (1, 0)):
        out = torch.empty(rows, vocab, device=device)
        tidal.ops.seeded_exponential_(out, one[:rows], one[:rows])


def test_bad_arguments_name_the_argument():
    seeds, offsets = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"out must be a 2-D float32 tensor \[num_rows, vocab\], got torch.float16"):
        tidal.ops.seeded_exponential_(torch.empty(2, 8, dtype=torch.float16), seeds, offsets)
    with pytest.raises(ValueError, match=r"out must be a 2-D float32 tensor .* got torch.float32 \(16,\)"):
        tidal.ops.seeded_exponential_(torch.empty(16), seeds, offsets)
    with pytest.raises(ValueError, match=r"seeds must be int64 \[num_rows\] = \[2\], got torch.int32 \(2,\)"):
        tidal.ops.seeded_exponential_(torch.empty(2, 8), seeds.int(), offsets)
    with pytest.raises(ValueError, match=r"offsets must be int64 \[num_rows\] = \[2\], got torch.int64 \(3,\)"):
        tidal.ops.seeded_exponential_(torch.empty(2, 8), seeds, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must have a contiguous last dimension"):
        tidal.ops.seeded_exponential_(torch.empty(8, 2).t(), seeds, offsets)


def test_native_errors_name_the_argument():
    from torch.utils.dlpack import to_dlpack as c

    from tidal import _core

    ints = torch.zeros(65536, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"out.shape\[0\]=65536 rows must be <= 65535"):
        _core.ops.seeded_exponential(c(torch.empty(65536, 1)), c(ints), c(ints), 0)
    with pytest.raises(ValueError, match=r"offsets.shape=\[3\] must be \[num_rows\] = \[2\]"):
        _core.ops.seeded_exponential(c(torch.empty(2, 4)), c(ints[:2]), c(ints[:3]), 0)
    with pytest.raises(ValueError, match="seeds.dtype=float32 must be int64"):
        _core.ops.seeded_exponential(c(torch.empty(2, 4)), c(torch.zeros(2)), c(ints[:2]), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        (torch.empty(3, 37), torch.tensor([1, 2, 3]), torch.tensor([0, 5, 2**33])),
        (torch.empty(2, 64 + 3)[:, :64], torch.tensor([-7, 9]), torch.tensor([1, 1])),
    ]
    for out, seeds, offsets in samples:
        torch.library.opcheck(torch.ops.tidal.seeded_exponential_.default,
                              (out.to(device), seeds.to(device), offsets.to(device)))


@gpu_only
def test_cuda_side_stream_graph_replay_and_devices():
    """The sampler draws inside the decode step's CUDA graph: each replay reads the seeds and offsets
    the static tensors hold then (offsets advance by one token per step)."""
    rows, vocab = 6, 50021
    seeds, offsets = batch(rows, seed=3)
    static_seeds, static_offsets = seeds.cuda(), offsets.cuda()
    static_out = torch.empty(rows, vocab, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a side stream, and the warm-up before capture
        tidal.ops.seeded_exponential_(static_out, static_seeds, static_offsets)
    torch.cuda.current_stream().wait_stream(side)
    assert_same_numbers(static_out, ref_seeded_exponential(seeds, offsets, vocab))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tidal.ops.seeded_exponential_(static_out, static_seeds, static_offsets)
    for step in (1, 2):
        static_offsets.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_numbers(static_out, ref_seeded_exponential(seeds, offsets + step, vocab))

    with pytest.raises(ValueError, match="offsets is on cpu but out is on cuda"):
        tidal.ops.seeded_exponential_(static_out, static_seeds, offsets)
