"""tidal.ops.adam_step_ against torch.optim.AdamW / Adam (foreach=False) over 20 steps, grad_scale,
argument errors, opcheck.

NOTE(tidal): bit equality with torch is not the bar: torch's vectorised CPU sqrt (AVX512, Sleef) is
not correctly rounded (about 1 element in 140 is 1 ulp off), while tidal's is. The bound below is
1e-6 relative per element, plus 1e-6 of the tensor's largest magnitude for elements that pass near 0.
"""

import pytest
import torch

import tidal

SIZES = [1, 7, 4096, 100003]
# (lr, beta1, beta2, eps, weight_decay)
HYPER = [
    (1e-3, 0.9, 0.999, 1e-8, 0.0),
    (1e-2, 0.9, 0.99, 1e-8, 0.01),
    (3e-2, 0.5, 0.9, 1e-6, 0.1),
    (1e-1, 0.0, 0.5, 1e-3, 0.0),
]


def assert_adam_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale)


def run_pair(numel, hyper, decoupled, grad_scale=1.0, steps=20, seed=0):
    lr, beta1, beta2, eps, wd = hyper
    g = torch.Generator().manual_seed(seed + numel)
    param = torch.randn(numel, generator=g)
    ref = param.clone().requires_grad_()
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([ref], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, amsgrad=False, foreach=False)
    for step in range(1, steps + 1):
        grad = torch.randn(numel, generator=g)
        scaled = grad * grad_scale
        ref.grad = scaled * torch.tensor(1.0 / grad_scale, dtype=torch.float32)
        opt.step()
        scaled_before = scaled.clone()
        tidal.ops.adam_step_(param, scaled, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd, decoupled,
                             grad_scale)
        torch.testing.assert_close(scaled, scaled_before, rtol=0, atol=0)  # grad is read only
    state = opt.state[ref]
    return (param, exp_avg, exp_avg_sq), (ref.detach(), state["exp_avg"], state["exp_avg_sq"])


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("numel", SIZES)
def test_matches_torch(numel, hyper, decoupled):
    got, want = run_pair(numel, hyper, decoupled)
    for a, b in zip(got, want):
        assert_adam_close(a, b)


@pytest.mark.parametrize("grad_scale", [2.0**16, 3.0, 0.25])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_grad_scale(grad_scale, decoupled):
    got, want = run_pair(4099, HYPER[1], decoupled, grad_scale=grad_scale, steps=5)
    for a, b in zip(got, want):
        assert_adam_close(a, b)


def test_empty_and_grad_enabled():
    empty = [torch.zeros(0) for _ in range(4)]
    tidal.ops.adam_step_(*empty, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    # With grad enabled the call goes through the dispatcher; same result.
    gen = torch.Generator().manual_seed(1)
    p1, g = torch.randn(33, generator=gen), torch.randn(33, generator=gen)
    p2 = p1.clone()
    s1, s2 = [torch.zeros(33), torch.zeros(33)], [torch.zeros(33), torch.zeros(33)]
    with torch.no_grad():
        tidal.ops.adam_step_(p1, g, *s1, 1, 1e-2, 0.9, 0.99, 1e-8, 0.1, False)
    tidal.ops.adam_step_(p2, g, *s2, 1, 1e-2, 0.9, 0.99, 1e-8, 0.1, False)
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def _tensors(n=8):
    return [torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)]


GOOD = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, grad_scale=1.0)


@pytest.mark.parametrize("override, needle", [
    (dict(step=0), "step=0"),
    (dict(lr=-1.0), "lr=-1"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(beta1=1.0), "beta1=1"),
    (dict(beta2=-0.1), "beta2=-0.1"),
    (dict(eps=0.0), "eps=0"),
    (dict(weight_decay=-0.5), "weight_decay=-0.5"),
    (dict(grad_scale=0.0), "grad_scale=0"),
    (dict(grad_scale=float("inf")), "grad_scale=inf"),
])
@pytest.mark.parametrize("layer", ["python", "native"])
def test_bad_hyper(override, needle, layer):
    kw = {**GOOD, **override}
    t = _tensors()
    if layer == "python":
        with pytest.raises(ValueError, match=needle):
            tidal.ops.adam_step_(*t, **kw)
    else:
        from torch.utils.dlpack import to_dlpack
        with pytest.raises(ValueError, match=needle):
            tidal._core.ops.adam_step(*(to_dlpack(x) for x in t), *kw.values())


def test_bad_tensors():
    p, g, m, v = _tensors()
    with pytest.raises(ValueError, match="grad.dtype=torch.float64"):
        tidal.ops.adam_step_(p, g.double(), m, v, **GOOD)
    with pytest.raises(ValueError, match="exp_avg.numel\\(\\)=7"):
        tidal.ops.adam_step_(p, g, m[:7], v, **GOOD)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        tidal.ops.adam_step_(p, g, m, torch.zeros(16)[::2], **GOOD)
    from torch.utils.dlpack import to_dlpack
    with pytest.raises(ValueError, match="param and exp_avg overlap"):
        tidal._core.ops.adam_step(to_dlpack(p), to_dlpack(g), to_dlpack(p), to_dlpack(v), *GOOD.values())
    with pytest.raises(ValueError, match="grad.dtype=float64 must be float32, float16 or bfloat16"):
        tidal._core.ops.adam_step(to_dlpack(p), to_dlpack(g.double()), to_dlpack(m), to_dlpack(v), *GOOD.values())


@pytest.mark.skipif(not (torch.cuda.is_available() and tidal.build_info()["cuda"]), reason="needs a CUDA GPU and build")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])  # 16-byte accesses, or one float each
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("numel", [1, 7, 100003])
def test_cuda_kernel_matches_the_cpu_kernel_and_torch(numel, decoupled, offset):
    """The GPU kernel over 20 steps against the CPU kernel on the same inputs (same arithmetic order;
    the GPU's sqrt and division are correctly rounded too) and against torch.optim on the GPU."""
    lr, beta1, beta2, eps, wd = HYPER[1]
    g = torch.Generator().manual_seed(numel)
    base = torch.randn(numel + offset, generator=g)
    cpu = [base[offset:].clone(), torch.zeros(numel), torch.zeros(numel)]
    gpu = [t.cuda() for t in (base, torch.zeros(numel + offset), torch.zeros(numel + offset))]
    gpu = [t[offset:] for t in gpu]
    ref = base[offset:].clone().cuda().requires_grad_()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([ref], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    for step in range(1, 21):
        grad = torch.randn(numel, generator=g)
        tidal.ops.adam_step_(cpu[0], grad, cpu[1], cpu[2], step, lr, beta1, beta2, eps, wd, decoupled, 4.0)
        grad_gpu = torch.cat((torch.zeros(offset), grad)).cuda()[offset:]
        tidal.ops.adam_step_(gpu[0], grad_gpu, gpu[1], gpu[2], step, lr, beta1, beta2, eps, wd, decoupled, 4.0)
        ref.grad = grad.cuda() / 4.0
        opt.step()
    for got, want in zip(gpu, cpu):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    assert_adam_close(gpu[0].cpu(), ref.detach().cpu())


@pytest.mark.parametrize("numel", [1, 7, 4096])
def test_opcheck(numel):
    g = torch.Generator().manual_seed(numel)
    args = (torch.randn(numel, generator=g), torch.randn(numel, generator=g), torch.zeros(numel),
            torch.rand(numel, generator=g), 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 4.0)
    torch.library.opcheck(torch.ops.tidal.adam_step_, args)


COPY_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _copy_case(numel, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g), torch.randn(numel, generator=g), torch.zeros(numel),
            torch.zeros(numel))


@pytest.mark.parametrize("dtype", COPY_DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 16384 * 5 + 3])
def test_param_copy_is_the_rounded_update(numel, dtype):
    """param_copy receives exactly param.to(dtype) after the step, and the step itself is unchanged."""
    p, grad, m, v = _copy_case(numel, numel)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    copy = torch.full((numel,), float("nan"), dtype=dtype)
    for step in (1, 2):
        tidal.ops.adam_step_(p, grad, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 2.0, param_copy=copy)
        tidal.ops.adam_step_(p2, grad, m2, v2, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 2.0)
        assert torch.equal(copy, p.to(dtype))
    for a, b in zip((p, m, v), (p2, m2, v2)):
        assert torch.equal(a, b)


def test_param_copy_bad_arguments():
    p, g, m, v = _tensors()
    with pytest.raises(ValueError, match="param_copy.dtype=torch.int32"):
        tidal.ops.adam_step_(p, g, m, v, **GOOD, param_copy=torch.zeros(16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"param_copy.numel\(\)=4 must equal param.numel\(\)=8"):
        tidal.ops.adam_step_(p, g, m, v, **GOOD, param_copy=torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="param_copy must be contiguous"):
        tidal.ops.adam_step_(p, g, m, v, **GOOD, param_copy=torch.zeros(16, dtype=torch.bfloat16)[::2])
    from torch.utils.dlpack import to_dlpack
    with pytest.raises(ValueError, match="param_copy and param overlap"):
        tidal._core.ops.adam_step(to_dlpack(p), to_dlpack(g), to_dlpack(m), to_dlpack(v), *GOOD.values(), 0,
                                  to_dlpack(p))


def test_param_copy_opcheck():
    p, g, m, v = _copy_case(100, 3)
    args = (p, g, m, v.abs(), 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 4.0, torch.zeros(100, dtype=torch.bfloat16))
    torch.library.opcheck(torch.ops.tidal.adam_step_, args)


@pytest.mark.skipif(not (torch.cuda.is_available() and tidal.build_info()["cuda"]), reason="needs a CUDA GPU and build")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", COPY_DTYPES)
@pytest.mark.parametrize("numel", [7, 100003])
def test_cuda_param_copy_matches_the_cpu_kernel(numel, dtype, offset):
    """The GPU kernel's copy (vectorised, or one element per access when the copy is misaligned)
    equals the CPU kernel's bit for bit."""
    p, grad, m, v = _copy_case(numel, numel)
    gp, gg, gm, gv = (t.cuda() for t in (p, grad, m, v))
    copy = torch.zeros(numel, dtype=dtype)
    gcopy = torch.full((numel + offset,), float("nan"), dtype=dtype, device="cuda")[offset:]
    for step in (1, 2, 3):
        tidal.ops.adam_step_(p, grad, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, param_copy=copy)
        tidal.ops.adam_step_(gp, gg, gm, gv, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, param_copy=gcopy)
    torch.testing.assert_close(gcopy.cpu(), copy, rtol=0, atol=0)
    torch.testing.assert_close(gp.cpu(), p, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [7, 16384 * 3 + 5])
def test_16bit_grad_equals_its_fp32_widening(numel, dtype):
    """A 16-bit gradient steps exactly as the same values in fp32 (widening is exact)."""
    p, grad, m, v = _copy_case(numel, numel)
    grad = grad.to(dtype)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    for step in (1, 2):
        tidal.ops.adam_step_(p, grad, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 8.0)
        tidal.ops.adam_step_(p2, grad.float(), m2, v2, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 8.0)
    for a, b in zip((p, m, v), (p2, m2, v2)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not (torch.cuda.is_available() and tidal.build_info()["cuda"]), reason="needs a CUDA GPU and build")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit_grad_matches_the_cpu_kernel(dtype, offset):
    numel = 100003
    p, grad, m, v = _copy_case(numel, 5)
    grad = grad.to(dtype)
    gp, gm, gv = (t.cuda() for t in (p, m, v))
    gg = torch.cat((torch.zeros(offset, dtype=dtype), grad)).cuda()[offset:]
    copy, gcopy = torch.zeros(numel, dtype=dtype), torch.zeros(numel, dtype=dtype, device="cuda")
    for step in (1, 2, 3):
        tidal.ops.adam_step_(p, grad, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 2.0, param_copy=copy)
        tidal.ops.adam_step_(gp, gg, gm, gv, step, 1e-2, 0.9, 0.99, 1e-8, 0.01, True, 2.0, param_copy=gcopy)
    torch.testing.assert_close(gp.cpu(), p, rtol=0, atol=0)
    torch.testing.assert_close(gcopy.cpu(), copy, rtol=0, atol=0)


def steps_for_isa_check(path: str) -> None:
    """Five AdamW and Adam steps over odd sizes, fp32 and bf16 gradients, with grad_scale; saves
    the results to ``path`` (run in subprocesses pinning the instruction set)."""
    out = {}
    for numel in (1, 15, 17, 100003):
        for decoupled in (True, False):
            for grad_dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(numel)
                param = torch.randn(numel, generator=g)
                m, v = torch.zeros(numel), torch.zeros(numel)
                for step in range(1, 6):
                    grad = torch.randn(numel, generator=g).to(grad_dtype)
                    tidal.ops.adam_step_(param, grad, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.1, decoupled, 3.0)
                out[f"{numel}-{decoupled}-{grad_dtype}"] = torch.stack([param, m, v])
    torch.save(out, path)


@pytest.mark.parametrize("pin", ["TIDAL_CPU_NO_AVX512", "TIDAL_CPU_BASELINE"])
def test_cpu_instruction_sets_agree_bit_for_bit(pin, tmp_path):
    """The CPU kernel's AVX-512, AVX2 and baseline versions (whichever this machine has, the
    others pinned by the environment) compute the same values bit for bit."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for name, env in (("default", {}), ("pinned", {pin: "1"})):
        path = str(tmp_path / f"{name}.pt")
        code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
                f"import test_adam as t; t.steps_for_isa_check({path!r})")
        run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = torch.load(path)
    for key, value in results["default"].items():
        torch.testing.assert_close(results["pinned"][key], value, rtol=0, atol=0, msg=key)
