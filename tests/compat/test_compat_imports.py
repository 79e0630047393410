"""DeepSpeed's module tree under dsrun: every import real DeepSpeed scripts write (issue 16 part 1)."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter on this checkout, so that imports start from nothing."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_statements_of_deepspeed_scripts_work_in_a_fresh_interpreter():
    """One new interpreter (imports start from nothing): DeepSpeed-style import statements, runtime
    submodules reached as attributes after the alias, and `from dsrun import *` with every name in __all__."""
    code = """
import dsrun as deepspeed
assert 'WarmupLR' in deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES  # before any import statement for it
assert callable(deepspeed.runtime.utils.set_random_seed) and callable(deepspeed.ops.adam.FusedAdam)
from dsrun.comm import init_distributed, is_initialized, get_rank, get_world_size, barrier, all_reduce, ReduceOp
import dsrun.comm as dist
from dsrun.ops.adam import FusedAdam, DeepSpeedCPUAdam
from dsrun.ops.adam.fused_adam import FusedAdam as FA
from dsrun.ops.adam.cpu_adam import DeepSpeedCPUAdam as CA
from dsrun.ops.adagrad import DeepSpeedCPUAdagrad
from dsrun.ops.lamb import FusedLamb
from dsrun.ops.lion import FusedLion, DeepSpeedCPULion
from dsrun.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder, CPUAdagradBuilder, FusedLambBuilder, AsyncIOBuilder
from dsrun.accelerator import get_accelerator
import dsrun.zero
from dsrun.zero import Init, GatheredParameters, register_external_parameter
from dsrun.utils import logger, RepeatingLoader, log_dist, groups, safe_get_full_grad, safe_get_local_grad
from dsrun.utils import safe_set_local_grad, set_z3_leaf_modules
from dsrun.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from dsrun.runtime.utils import set_random_seed, see_memory_usage, clip_grad_norm_
from dsrun.runtime.lr_schedules import WarmupLR, VALID_LR_SCHEDULES
from dsrun.checkpoint.utils import clone_tensors_for_torch_save
from dsrun.moe.utils import split_params_into_different_moe_groups_for_optimizer
from dsrun.git_version_info import version, git_hash, git_branch, installed_ops, compatible_ops, torch_info
assert deepspeed.DeepSpeedEngine.__name__ == "Engine" and dist.ReduceOp is ReduceOp
assert FA is FusedAdam and CA is DeepSpeedCPUAdam and deepspeed.ops.__compatible_ops__[FusedAdamBuilder.NAME]
assert dsrun.zero.Init is Init and deepspeed.git_version_info.version == deepspeed.__version__
namespace = {}
exec("from dsrun import *", namespace)
missing = [n for n in deepspeed.__all__ if n not in namespace]
assert not missing, missing
print("ok")
"""
    done = _fresh_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_name_in_all_resolves():
    import dsrun
    for name in dsrun.__all__:
        assert getattr(dsrun, name) is not None, name


def test_unknown_top_level_name_is_an_attribute_error():
    import dsrun
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsrun.nope
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsrun.runtime.nope


def test_checkpointing_and_pipe_import():
    import subprocess
    import sys
    code = ("import dsrun.checkpointing, dsrun.pipe, dsrun.pipe.schedule\n"
            "from dsrun.checkpointing import checkpoint, configure, get_cuda_rng_tracker\n"
            "from dsrun.pipe import LayerSpec, TiedLayerSpec, PipelineModule, TrainSchedule\n"
            "import dsrun\n"
            "assert dsrun.checkpointing is sys.modules['dsrun.runtime.checkpointing']\n"
            "assert dsrun.pipe.PipelineModule is PipelineModule\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    import dsrun
    x = torch.ones(2, requires_grad=True)
    dsrun.checkpointing.checkpoint(lambda t: t * 2, x).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="must provide num_stages or topology"):  # DeepSpeed's message
        dsrun.PipelineModule(layers=[])


def test_missing_features_raise_not_implemented_naming_them():
    from dsrun.moe.layer import MoE
    from dsrun.moe.utils import split_params_into_different_moe_groups_for_optimizer as split
    from dsrun.ops.lion import FusedLion
    from dsrun.ops.op_builder import AsyncIOBuilder
    from dsrun.utils import safe_get_full_fp32_param, safe_get_full_grad
    with pytest.raises(NotImplementedError, match="MoE"):
        MoE(hidden_size=4)
    with pytest.raises(NotImplementedError, match="FusedLion"):
        FusedLion([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(NotImplementedError, match="async_io"):
        AsyncIOBuilder().load()
    assert not AsyncIOBuilder().is_compatible()
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="safe_get_full_grad"):
        safe_get_full_grad(p)
    p.grad = torch.ones(2)
    assert safe_get_full_grad(p) is p.grad
    with pytest.raises(NotImplementedError, match="safe_get_full_fp32_param"):
        safe_get_full_fp32_param(p)
    expert = torch.nn.Parameter(torch.zeros(1))
    expert.allreduce = False
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        split({"params": [expert], "name": "g"})


def test_moe_split_without_experts_returns_the_groups():
    from dsrun.moe.utils import split_params_into_different_moe_groups_for_optimizer as split
    params = [torch.nn.Parameter(torch.zeros(2))]
    group = {"params": params, "name": "parameters"}
    assert split(group) == [group]
    assert split((group,)) == [group]


def test_op_builders_and_compatible_ops():
    import dsrun.ops
    from dsrun.ops.op_builder import ALL_OPS, CPUAdamBuilder, FusedAdamBuilder
    assert CPUAdamBuilder.NAME == "cpu_adam" and CPUAdamBuilder().is_compatible()
    assert dsrun.ops.__compatible_ops__ == {name: b.is_compatible() for name, b in ALL_OPS.items()}
    assert FusedAdamBuilder().load().FusedAdam is dsrun.ops.adam.FusedAdam
    assert dsrun.accelerator.get_accelerator().create_op_builder("CPUAdamBuilder").NAME == "cpu_adam"


def test_runtime_utils():
    from dsrun.runtime.utils import RepeatingLoader, clip_grad_norm_, set_random_seed
    set_random_seed(7)
    a = torch.rand(3)
    set_random_seed(7)
    assert torch.equal(a, torch.rand(3))
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_grad_norm_([p], max_norm=1.0)
    assert norm.item() == pytest.approx(6.0) and p.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert [x for _, x in zip(range(5), RepeatingLoader([1, 2]))] == [1, 2, 1, 2, 1]


def test_clone_tensors_for_torch_save():
    from dsrun.checkpoint.utils import clone_tensors_for_torch_save
    base = torch.arange(10.0)
    out = clone_tensors_for_torch_save({"a": [base[:2], (base[2:4], 5)]})
    assert out["a"][0].untyped_storage().nbytes() == 8 and out["a"][1][1] == 5
    assert torch.equal(out["a"][1][0], base[2:4])
