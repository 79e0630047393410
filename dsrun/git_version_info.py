"""`dsrun.git_version_info`: DeepSpeed's version record (`version`, `git_hash`, `git_branch`, `installed_ops`,
`compatible_ops`, `torch_info`, `accelerator_name`) describing this dsrun install."""
import os

from dsrun import __version__ as version

__all__ = ["version", "git_hash", "git_branch", "installed_ops", "compatible_ops", "torch_info",
           "accelerator_name"]

git_hash = "[none]"
git_branch = "[none]"


def _installed_ops():
    from dsrun.kernels import build_ext
    from dsrun.ops.op_builder import ALL_OPS

    prebuilt = os.path.exists(os.path.join(build_ext.HERE, build_ext.LIB_FILE))
    return {name: prebuilt and name in ("cpu_adam", "cpu_adagrad") for name in ALL_OPS}


def _torch_info():
    import torch

    return {"version": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
            "cuda_version": torch.version.cuda or "0.0", "hip_version": getattr(torch.version, "hip", None) or "0.0"}


def _accelerator_name():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


from dsrun.ops.op_builder import compatible_ops  # noqa: E402  (after the helpers: ops imports torch)

installed_ops = _installed_ops()
torch_info = _torch_info()
accelerator_name = _accelerator_name()
