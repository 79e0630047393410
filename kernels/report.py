"""`dsrun-report`: a copy-paste block for a bug report (DeepSpeed's `ds_report`).

dsrun's version and install path, Python, torch with its CUDA and NCCL, the compilers, the state of each
compiled op and the multi-node launchers found on PATH. `--json` prints the same as JSON with
snake_case keys (`{section: {key: value}}`; a section whose probe failed is an "error: ..." string).
Never raises for a missing CUDA, compiler or Triton: each probe reports its own error instead.
"""
import json
import os
import platform
import shutil
import subprocess
import sys

import click

__all__ = ["collect", "format_report", "main"]

LAUNCHERS = ("pdsh", "mpirun", "srun", "ssh")
# Text labels where the snake_case key does not read well; other keys print with spaces for underscores.
_LABELS = {"cuda": "CUDA", "nccl": "NCCL", "gpus": "GPUs", "cuda_arch": "CUDA arch", "simd_level": "SIMD level",
           "openmp_threads": "OpenMP threads", "jit_cache": "JIT cache", "cxx": "C++ compiler",
           "op_cpu_adam": "op cpu_adam / cpu_adagrad (C++ SIMD + OpenMP)", "op_fused_adam": "op fused_adam (GPU)"}


def _probe(fn):
    try:
        return fn()
    except Exception as e:  # a report must describe a broken install, not crash on it
        return f"error: {type(e).__name__}: {e}"


def _dsrun_info():
    import dsrun
    return {"version": dsrun.__version__, "install_path": os.path.dirname(os.path.abspath(dsrun.__file__)),
            "python": sys.version.split()[0], "python_executable": sys.executable,
            "platform": platform.platform(), "machine": platform.machine()}


def _torch_info():
    import torch
    info = {"version": torch.__version__, "install_path": os.path.dirname(torch.__file__),
            "cuda": torch.version.cuda or "none (CPU build)", "nccl": _nccl_version(torch)}
    if torch.cuda.is_available():
        names, archs = [], []
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            names.append(torch.cuda.get_device_name(i))
            archs.append(f"sm_{major}{minor}")
        info["gpus"] = ", ".join(names)
        info["cuda_arch"] = ", ".join(sorted(set(archs)))
    else:
        info["gpus"] = "none visible"
        info["cuda_arch"] = "n/a"
    return info


def _nccl_version(torch):
    if not torch.version.cuda:
        return "none (CPU build)"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _compilers_info():
    from . import build_ext
    cxx = build_ext.find_compiler()
    nvcc = shutil.which("nvcc")
    return {"cxx": f"{cxx} ({build_ext.compiler_version(cxx)})" if cxx else "none found",
            "nvcc": f"{nvcc} ({_nvcc_version(nvcc)})" if nvcc else "none found",
            "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "not set"}


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else "unknown version"


def _launchers_info():
    return {name: shutil.which(name) or "not found" for name in LAUNCHERS}


def _cpu_ops_info():
    from . import build_ext, cpu_ops, loader
    res = loader.load_cpu_ops(warn=False)
    cxx = build_ext.find_compiler()
    prebuilt = os.path.join(build_ext.HERE, build_ext.LIB_FILE)
    rows = {
        "state": res.state.value,
        "loadable": "yes" if res.lib is not None else "no",
        "library": res.path or "-",
        "prebuilt_present": "yes" if os.path.exists(prebuilt) else "no",
        "simd_level": cpu_ops.simd_level_name() or "n/a (reference)",
        "openmp_threads": str(res.lib.dsrun_max_threads()) if res.lib is not None else "n/a",
        "cxx": f"{cxx} ({build_ext.compiler_version(cxx)})" if cxx else "none found",
        "jit_cache": loader.cache_dir(),
    }
    if res.lib is None:
        rows["why"] = res.detail
    return rows


def _fused_adam_info():
    from . import fused_adam
    import torch
    ok = fused_adam.triton_available()
    rows = {"triton": "yes" if ok else f"no ({fused_adam._triton_error})"}
    if ok:
        import triton
        rows["triton_version"] = triton.__version__
    if ok and torch.cuda.is_available():
        rows["state"] = "loadable (Triton JIT, cached by Triton)"
    elif torch.cuda.is_available():
        rows["state"] = "fallback (torch fused Adam kernels)"
    else:
        rows["state"] = "fallback (pure PyTorch; no CUDA device)"
    return rows


def collect():
    """The report as {section: {key: value}}, snake_case keys; a section is a string if its probe failed."""
    return {
        "dsrun": _probe(_dsrun_info),
        "torch": _probe(_torch_info),
        "compilers": _probe(_compilers_info),
        "op_cpu_adam": _probe(_cpu_ops_info),
        "op_fused_adam": _probe(_fused_adam_info),
        "launchers": _probe(_launchers_info),
    }


def _label(key):
    return _LABELS.get(key, key.replace("_", " "))


def format_report(report):
    """The text block: one section title per line, then `key : value` rows."""
    lines = []
    for section, rows in report.items():
        lines.append(_label(section))
        if isinstance(rows, str):
            lines.append(f"  {rows}")
            continue
        width = max(len(_label(k)) for k in rows) if rows else 0
        for k, v in rows.items():
            lines.append(f"  {_label(k).ljust(width)} : {v}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print JSON (snake_case keys) instead of the text block.")
def _command(as_json):
    """dsrun's environment and kernel report, to paste into a bug report."""
    report = collect()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo("```text\n" + format_report(report) + "\n```")
    return 0


def main(argv=None):
    """Console entry point of `dsrun-report`; returns the exit code (2 for a bad option)."""
    from dsrun.click_main import run_command
    return run_command(_command, argv, "dsrun-report")


if __name__ == "__main__":
    sys.exit(main())
