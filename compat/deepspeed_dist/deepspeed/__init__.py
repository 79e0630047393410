"""`deepspeed`, served by dsrun: the opt-in alias distribution (compat/deepspeed_dist, docs/compat.md).

Libraries that import DeepSpeed by name (transformers' Trainer with `deepspeed=cfg`, Accelerate's
DeepSpeed plugin) check `importlib.util.find_spec("deepspeed")` and the distribution's version, then
write `import deepspeed`, `deepspeed.zero.Init`, `from deepspeed.utils import logger`, ... This package
answers all of them with dsrun:

- `deepspeed.<name>` is `dsrun.<name>` (attribute access is forwarded to the `dsrun` module);
- `import deepspeed.a.b` gives the module object `dsrun.a.b` itself, registered under both names, so
  classes and module state are shared (`isinstance(engine, deepspeed.DeepSpeedEngine)` holds for an
  engine built by `dsrun.initialize`);
- `deepspeed.__version__` is this distribution's version (the DeepSpeed API level dsrun follows).

dsrun is found wherever Python finds it (installed, editable, or on PYTHONPATH); this package holds no
copy of it.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys

try:
    import dsrun as _dsrun
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    if exc.name != "dsrun":  # dsrun is there but something it imports is not: that error is the news
        raise
    raise ImportError(
        "the installed 'deepspeed' distribution is dsrun's alias (compat/deepspeed_dist), but dsrun itself "
        "cannot be imported: install dsrun (pip install <dsrun checkout>) or put its checkout on PYTHONPATH"
    ) from exc

_ALIAS = __name__  # "deepspeed"
_TARGET = _dsrun.__name__  # "dsrun"

try:
    __version__ = importlib.metadata.version(_ALIAS)
except importlib.metadata.PackageNotFoundError:  # imported from the source folder without installing
    __version__ = "0.19.8+dsrun"
__version_major__, __version_minor__, __version_patch__ = (int(p) for p in __version__.split("+")[0].split(".")[:3])
dsrun_version = _dsrun.__version__


class _AliasLoader(importlib.abc.Loader):
    """Loads `deepspeed.a.b` as the already imported module `dsrun.a.b` (no second copy)."""

    def __init__(self, target: str):
        self._target = target
        self._target_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self._target)
        self._target_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system set `module.__spec__` to the alias spec before calling us (it always does);
        # the module stays dsrun's, so its own spec goes back (reload, pickling and find_spec read it).
        module.__spec__ = self._target_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds `deepspeed.a.b` wherever dsrun has `dsrun.a.b`; anything else is left to other finders."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS):]
        try:
            real_spec = importlib.util.find_spec(real)
        except ModuleNotFoundError:  # a parent package is missing in dsrun
            return None
        if real_spec is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real),
                                              is_package=real_spec.submodule_search_locations is not None)


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module {_ALIAS!r} has no attribute {name!r}")
    try:
        value = getattr(_dsrun, name)
    except AttributeError:
        raise AttributeError(f"module {_ALIAS!r} (dsrun's alias) has no attribute {name!r}: dsrun does not "
                             f"provide deepspeed.{name}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(getattr(_dsrun, "__all__", ())))
