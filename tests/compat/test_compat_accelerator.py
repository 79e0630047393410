"""`dsrun.accelerator.get_accelerator()` on a CPU machine (issue 16 part 1)."""
import pytest
import torch

from dsrun.accelerator import get_accelerator, set_accelerator
from dsrun.accelerator import real_accelerator
from dsrun.accelerator.cpu_accelerator import CPU_Accelerator
from dsrun.accelerator.cuda_accelerator import CUDA_Accelerator


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(real_accelerator, "_current", None)


def test_cpu_accelerator_surface(fresh, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    acc = get_accelerator()
    assert isinstance(acc, CPU_Accelerator) and acc is get_accelerator()
    assert (acc.device_name(), acc.device_name(1), acc.current_device_name()) == ("cpu", "cpu", "cpu")
    assert acc.current_device() == 1 and acc.device_count() == 2 and acc.is_available()
    assert acc.communication_backend_name() == "gloo" and acc.is_synchronized_device()
    assert acc.is_bf16_supported() and torch.bfloat16 in acc.supported_dtypes()
    assert acc.memory_allocated() > 0 and acc.max_memory_allocated() >= acc.memory_allocated()
    t = acc.FloatTensor([1.0, 2.0])
    assert t.dtype == torch.float32 and acc.on_accelerator(t) and acc.pin_memory(t) is t
    start, end = acc.Event(enable_timing=True), acc.Event(enable_timing=True)
    start.record()
    with acc.stream(acc.Stream()):
        end.record()
    acc.synchronize()
    assert start.elapsed_time(end) >= 0
    acc.manual_seed(3)
    a = torch.rand(2)
    acc.manual_seed(3)
    assert torch.equal(a, torch.rand(2))
    acc.set_device(0)
    acc.empty_cache()


def test_default_is_cuda_only_with_a_gpu(fresh, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    expected = CUDA_Accelerator if torch.cuda.is_available() else CPU_Accelerator
    assert type(get_accelerator()) is expected


def test_unknown_accelerator_is_refused(fresh, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    with pytest.raises(ValueError, match="DS_ACCELERATOR='xpu'"):
        get_accelerator()


def test_set_accelerator(fresh):
    acc = CPU_Accelerator()
    set_accelerator(acc)
    assert get_accelerator() is acc


@pytest.mark.gpu
def test_cuda_accelerator_on_a_gpu(fresh, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    acc = get_accelerator()
    assert acc.device_name(0) == "cuda:0" and acc.current_device_name().startswith("cuda:")
    assert acc.communication_backend_name() == "nccl" and acc.device_count() == torch.cuda.device_count()
    x = acc.FloatTensor([1.0])
    assert acc.on_accelerator(x) and acc.memory_allocated() > 0
    s, e = acc.Stream(), acc.Event()
    with acc.stream(s):
        e.record()
    acc.synchronize()
