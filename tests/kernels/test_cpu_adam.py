"""CPUAdam / CPUAdagrad against torch's optimizers and the pure PyTorch reference."""
import copy

import pytest
import torch

from dsrun.kernels import CPUAdagrad, CPUAdam, cpu_ops, reference
from dsrun.kernels.loader import OpState, load_cpu_ops

SIZES = [1, 7, 4097, 2 ** 20 + 3]
# fp32 tolerance: 1e-6 relative; the absolute floor (1e-6 x lr) covers elements that pass near zero,
# where the last-ulp rounding difference of a ~lr-sized update is large relative to the element.
RTOL, ATOL = 1e-6, 1e-9  # for lr=1e-3


def _levels():
    res = load_cpu_ops(warn=False)
    if res.lib is None:
        return [None]
    top = res.lib.dsrun_simd_level()
    return list(range(top + 1))


@pytest.fixture
def simd_level(request):
    level = request.param
    if level is not None:
        cpu_ops.set_simd_level(level)
    yield level
    if level is not None:
        cpu_ops.set_simd_level(99)  # back to the best the CPU supports


def _run_pair(n, ours_cls, ours_kw, ref_cls, ref_kw, steps=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen)
    a = torch.nn.Parameter(p0.clone())
    b = torch.nn.Parameter(p0.clone())
    oa, ob = ours_cls([a], **ours_kw), ref_cls([b], **ref_kw)
    for _ in range(steps):
        g = torch.randn(n, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


def test_library_loads_here():
    assert load_cpu_ops(warn=False).state in (OpState.PREBUILT, OpState.JIT)


@pytest.mark.parametrize("simd_level", _levels(), indirect=True)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adamw,wd", [(True, 0.01), (False, 0.01), (True, 0.0)])
def test_fp32_matches_torch_after_10_steps(simd_level, n, adamw, wd):
    ref_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    a, b, oa, ob = _run_pair(n, CPUAdam, dict(lr=1e-3, weight_decay=wd, adamw_mode=adamw), ref_cls,
                             dict(lr=1e-3, weight_decay=wd))
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(oa.state[a][key], ob.state[b][key], rtol=RTOL, atol=1e-12)
    assert oa.state[a]["step"] == 10


def test_no_bias_correction_matches_reference():
    n = 4097
    gen = torch.Generator().manual_seed(3)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v, rp, rm, rv = torch.zeros(n), torch.zeros(n), p.clone(), torch.zeros(n), torch.zeros(n)
    for step in (1, 2, 3):
        cpu_ops.adam_step(p, g, m, v, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, step=step,
                          bias_correction=False)
        reference.adam_step(rp, g, rm, rv, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                            step=step, bias_correction=False)
    torch.testing.assert_close(p, rp, rtol=RTOL, atol=1e-6 * 1e-2)


@pytest.mark.parametrize("simd_level", _levels(), indirect=True)
@pytest.mark.parametrize("pdt,gdt", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                     (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("n", [7, 4097, 2 ** 20 + 3])
def test_16bit_variants_match_reference(simd_level, pdt, gdt, n):
    """16-bit storage: compute is fp32 in both, so results agree to one 16-bit ulp (rounding of the
    final store), and fp32 states to 1e-6."""
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(n, generator=gen).to(pdt)
    rp = p.clone()
    m, v, rm, rv = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    out16 = torch.empty(n, dtype=torch.bfloat16)
    rout16 = torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 4):
        g = torch.randn(n, generator=gen).to(gdt)
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step)
        cpu_ops.adam_step(p, g, m, v, out=out16, **kw)
        reference.adam_step(rp, g, rm, rv, out=rout16, **kw)
    ulp = {torch.float32: 0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[pdt]
    torch.testing.assert_close(p.float(), rp.float(), rtol=ulp + RTOL, atol=1e-6)
    torch.testing.assert_close(out16.float(), rout16.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-8)


def test_fp16_conversion_special_values():
    """The scalar fp16 path (used for tails and non-x86) rounds like torch, incl. subnormals/inf/nan."""
    vals = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e5, 6e-8, 3e-8, 2.98e-8, 1e-5, 6.1e-5, -2.5,
                         float("inf"), float("-inf")])
    for level in _levels():
        if level is None:
            pytest.skip("reference only")
        cpu_ops.set_simd_level(level)
        try:
            n = vals.numel()
            # step with lr=0 leaves the param unchanged, so `out` is exactly the conversion of vals
            p = vals.clone()
            out = torch.empty(n, dtype=torch.float16)
            cpu_ops.adam_step(p, torch.zeros(n), torch.zeros(n), torch.zeros(n), out=out, lr=0.0, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
            assert torch.equal(out.view(torch.int16), vals.half().view(torch.int16)), level
        finally:
            cpu_ops.set_simd_level(99)


def test_param_groups_use_their_own_hyperparameters():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 300)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    groups = lambda xs: [{"params": [xs[0]], "lr": 1e-2, "weight_decay": 0.1},
                         {"params": [xs[1], xs[2]], "lr": 3e-3, "betas": (0.8, 0.95)}]
    oa, ob = CPUAdam(groups(ps), lr=1e-3), torch.optim.AdamW(groups(qs), lr=1e-3, weight_decay=0.0)
    for _ in range(10):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_state_dict_round_trip_and_torch_compatibility():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4097))
    opt = CPUAdam([p], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # into a fresh CPUAdam, and into torch's AdamW: both continue identically
    p2 = torch.nn.Parameter(p.detach().clone())
    p3 = torch.nn.Parameter(p.detach().clone())
    opt2 = CPUAdam([p2], lr=1e-3, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(sd))  # torch's loader aliases same-device tensors
    opt3 = torch.optim.AdamW([p3], lr=1e-3, weight_decay=0.01)
    opt3.load_state_dict(copy.deepcopy(sd))
    # and back from torch into CPUAdam
    p4 = torch.nn.Parameter(p.detach().clone())
    opt4 = CPUAdam([p4], lr=1e-3, weight_decay=0.01)
    opt4.load_state_dict(copy.deepcopy(opt3.state_dict()))
    for _ in range(3):
        g = torch.randn_like(p)
        for q, o in ((p, opt), (p2, opt2), (p3, opt3), (p4, opt4)):
            q.grad = g.clone()
            o.step()
    for q in (p2, p3, p4):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
    assert opt2.state[p2]["step"] == 6 and opt4.state[p4]["step"] == 6


def test_state_dict_keeps_fp32_states_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    opt = CPUAdam([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = CPUAdam([torch.nn.Parameter(p.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    st = next(iter(opt2.state.values()))
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], opt.state[p]["exp_avg"])


def test_step_flat_with_16bit_copy_out_matches_step():
    n = 2 ** 16 + 5
    torch.manual_seed(0)
    master = torch.randn(n)
    p = torch.nn.Parameter(master.clone())
    opt = CPUAdam([p], lr=2e-3, weight_decay=0.05)
    m, v = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 4):
        g = torch.randn(n)
        p.grad = g.clone()
        opt.step()
        opt.step_flat(master, g, m, v, step, out=out)
    torch.testing.assert_close(master, p.detach(), rtol=0, atol=0)
    assert torch.equal(out, master.bfloat16())


def test_fp16_param_groups_copy_out():
    p = torch.nn.Parameter(torch.randn(1000))
    half = torch.empty(1000, dtype=torch.float16)
    opt = CPUAdam([p])
    p.grad = torch.randn_like(p)
    opt.step(fp16_param_groups=[[half]])
    assert torch.equal(half, p.detach().half())


def test_rejects_amsgrad_and_bad_tensors():
    with pytest.raises(ValueError, match="amsgrad"):
        CPUAdam([torch.nn.Parameter(torch.zeros(1))], amsgrad=True)
    with pytest.raises(ValueError, match="elements"):
        cpu_ops.adam_step(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4), lr=1e-3, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0, step=1)
    with pytest.raises(TypeError, match="float32"):
        cpu_ops.adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4).bfloat16(), torch.zeros(4), lr=1e-3,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0, step=1)


@pytest.mark.parametrize("n", [7, 4097, 2 ** 20 + 3])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adagrad_matches_torch(n, wd):
    a, b, oa, ob = _run_pair(n, CPUAdagrad, dict(lr=1e-2, weight_decay=wd, initial_accumulator_value=0.1),
                             torch.optim.Adagrad, dict(lr=1e-2, weight_decay=wd, initial_accumulator_value=0.1))
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-8)
    torch.testing.assert_close(oa.state[a]["sum"], ob.state[b]["sum"], rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("simd_level", [lv for lv in _levels() if lv], indirect=True)
def test_vector_paths_match_torch_fused_bitwise(simd_level):
    """[Note: Adam update without dividers]: the divide-free denominator rounds like torch's divide."""
    n = 2 ** 16 + 5
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(n, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa = CPUAdam([a], lr=1e-3, weight_decay=0.01)
    ob = torch.optim.AdamW([b], lr=1e-3, weight_decay=0.01, fused=True)
    for _ in range(10):
        g = torch.randn(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen))  # e^+-9 spread
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert torch.equal(oa.state[a]["exp_avg_sq"], ob.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("simd_level", _levels(), indirect=True)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_special_values_follow_reference(simd_level, eps):
    """inf/nan moments, an overflowing v, signed zeros and eps=0 with v=0 give torch's IEEE results."""
    n = 39  # vector body (0-31) and scalar tail (32-38)
    p, g, m, v = torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for base in (0, 32):
        m[base + 0], v[base + 1], m[base + 2], g[base + 3] = float("inf"), float("inf"), float("nan"), 3e19
        m[base + 4], p[base + 5], m[base + 6] = -0.0, -0.0, 1.0
    ours, ref = [t.clone() for t in (p, g, m, v)], [t.clone() for t in (p, g, m, v)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=eps, weight_decay=0.0, step=1)
    cpu_ops.adam_step(*ours, **kw)
    reference.adam_step(*ref, **kw)
    assert torch.equal(ours[0].view(torch.int32), ref[0].view(torch.int32))

