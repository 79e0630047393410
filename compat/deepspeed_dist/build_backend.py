"""A PEP 517 build backend for the `deepspeed` alias distribution that needs nothing but the standard
library: it zips the `deepspeed/` package and a dist-info folder into a pure-Python wheel.

Why not setuptools: pip would fetch setuptools and wheel into an isolated build environment (no index on
an offline GPU machine), and a venv's own setuptools may lack `bdist_wheel`. Name, version, summary and
Python requirement are read from pyproject.toml's [project] table (simple `key = "value"` lines).
"""
import base64
import hashlib
import os
import re
import zipfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = "deepspeed"


def _project() -> dict:
    with open(os.path.join(_HERE, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read().split("[project]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]*)"', text, flags=re.M))


def _dist_info(project: dict) -> dict:
    """dist-info file name -> text (RECORD excluded)."""
    metadata = (f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
                f"Summary: {project['description']}\nRequires-Python: {project['requires-python']}\n"
                "License: Apache-2.0\n")
    wheel = "Wheel-Version: 1.0\nGenerator: dsrun-alias-build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    # DeepSpeed's launcher command, as dsrun's (Accelerate's multi-node launch runs `deepspeed ...`).
    entry_points = "[console_scripts]\ndeepspeed = dsrun.launcher.cli:main\n"
    return {"METADATA": metadata, "WHEEL": wheel, "top_level.txt": _PACKAGE + "\n", "entry_points.txt": entry_points}


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    project = _project()
    stem = f"{project['name']}-{project['version']}"
    dist_info = stem + ".dist-info"
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(_HERE, _PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(n for n in filenames if n.endswith(".py")):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files.append((os.path.relpath(path, _HERE).replace(os.sep, "/"), f.read()))
    files += [(f"{dist_info}/{name}", text.encode()) for name, text in _dist_info(project).items()]
    record = [_record_line(arcname, data) for arcname, data in files] + [f"{dist_info}/RECORD,,"]
    files.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    wheel_name = f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as wheel:
        for arcname, data in files:
            wheel.writestr(arcname, data)
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    raise NotImplementedError("the deepspeed alias is installed from its folder: pip install --no-deps <folder>")
