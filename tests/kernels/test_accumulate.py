"""kernels/accumulate.py: fp32 gradient accumulation equals PyTorch's (the reference) on CPU and GPU."""
import pytest
import torch

from dsrun.kernels import accumulate as A


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_accumulate_and_copy_match_pytorch_on_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 70001, generator=gen).to(dtype) for _ in range(3)]
    acc = A.fp32_copy(grads[0])
    assert acc.dtype == torch.float32 and acc.data_ptr() != grads[0].data_ptr()
    for g in grads[1:]:
        assert A.accumulate_(acc, g) is acc
    want = grads[0].float()
    for g in grads[1:]:
        want.add_(g)
    assert torch.equal(acc, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_on_gpu_takes_the_triton_kernel_and_matches_pytorch(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dsrun.kernels import fused_adam
    assert fused_adam.triton_available(), fused_adam._triton_error
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(2048, 5632), (A.MIN_TRITON_NUMEL + 3,), (7,)]:
        g0, g1 = (torch.randn(shape, generator=gen, device="cuda").to(dtype) for _ in range(2))
        acc = A.fp32_copy(g0)
        assert A._use_triton(acc, g1) == (g1.numel() >= A.MIN_TRITON_NUMEL)
        A.accumulate_(acc, g1)
        assert torch.equal(acc, g0.float().add_(g1))
