"""The Triton kernels' logic on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Runs wherever Triton is installed, GPU or not, so the GPU kernels' indexing, masking, dtype handling
and multi-tensor address table are checked against the reference without a GPU. Speed is not.
The interpreter rounds fp32 -> 16-bit toward zero where compiled Triton rounds to nearest even, so
16-bit results here are compared to within one ulp; the `gpu` tests check exact rounding.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent("""
    import torch
    from dsrun.kernels import reference as R, triton_adam as T
    HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.float32, torch.float32, torch.float32, None),
             (torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
             (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
             (torch.float32, torch.float16, torch.float32, torch.float16)]
    sizes = [1, 7, 4097, 70001]
    for pdt, gdt, sdt, odt in cases:
        for adamw in (True, False):
            ps = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
            gs = [torch.randn(n, generator=gen).to(gdt) for n in sizes]
            ms = [torch.zeros(n, dtype=sdt) for n in sizes]
            vs = [torch.zeros(n, dtype=sdt) for n in sizes]
            outs = None if odt is None else [torch.full((n,), float("nan"), dtype=odt) for n in sizes]
            refs = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(ps, ms, vs)]
            bc1, bc2 = R.bias_corrections(0.9, 0.999, 2)
            # flat form on the largest tensor, multi form on all of them (separate copies)
            fp, fm, fv = ps[-1].clone(), ms[-1].clone(), vs[-1].clone()
            fo = None if odt is None else torch.empty(sizes[-1], dtype=odt)
            T.adam_flat(fp, gs[-1], fm, fv, fo, bc1=bc1, bc2=bc2, adamw_mode=adamw, **HP)
            T.adam_multi(ps, gs, ms, vs, outs, bc1=bc1, bc2=bc2, adamw_mode=adamw, **HP)
            tol = dict(rtol=1e-6, atol=1e-8) if pdt == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
            for i, (rp, rm, rv) in enumerate(refs):
                R.adam_step(rp, gs[i], rm, rv, step=2, adamw_mode=adamw, **HP)
                torch.testing.assert_close(ps[i].float(), rp.float(), **tol)
                torch.testing.assert_close(vs[i].float(), rv.float(), rtol=1e-2 if sdt != torch.float32 else 1e-5,
                                           atol=1e-12)
                if outs is not None:  # one 16-bit ulp: see the module note on the interpreter's rounding
                    torch.testing.assert_close(outs[i].float(), ps[i].float(), rtol=2 ** -7, atol=1e-6)
            torch.testing.assert_close(fp, ps[-1], rtol=0, atol=0)
            if fo is not None:
                assert torch.equal(fo, outs[-1])
    from dsrun.kernels import triton_accumulate as A  # fp32 += 16-bit: exact, as PyTorch's add_
    for gdt in (torch.bfloat16, torch.float16, torch.float32):
        for n in sizes:
            acc, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen).to(gdt)
            want = acc.clone().add_(g)
            A.accumulate(acc, g)
            assert torch.equal(acc, want), (gdt, n)
    print("ok")
""")


def test_triton_kernels_match_reference_in_interpreter():
    if importlib.util.find_spec("triton") is None:  # .ci/run installs the CPU wheel: this test never skips
        pytest.fail("Triton is not installed: `pip install triton` (its interpreter runs on CPU)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSRUN_")}
    env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
