"""`dsrun-estimate`: model-state memory per GPU and per node for every ZeRO stage and offload choice.

    dsrun-estimate --params 7.5e9 --num_gpus 8 --num_nodes 8
    dsrun-estimate --model mypkg.models:build_model --num_gpus 4 --json

`--model module:factory` imports the module and calls `factory()` with torch's default device set to
"meta" (no memory is allocated), then counts its parameters, shared ones once. The numbers follow the
ZeRO paper (runtime/estimate.py's [Note: estimate formulas]). `--json` prints a list of rows, each with
`stage`, `offload_optimizer`, `offload_param`, `gpu_bytes` (per GPU) and `cpu_bytes` (per node).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys

import click

from dsrun.errors import UsageError

from .estimate import estimate_rows

__all__ = ["main", "cli", "parse_count", "count_model_params"]

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> int:
    """'7.5e9', '7.5B', '125M', '1_000_000' -> a parameter count. Raises ValueError."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9_]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a parameter count (examples: 7.5e9, 7.5B, 125M)")
    value = float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2).upper()]
    if value <= 0:
        raise ValueError(f"{text!r}: the parameter count must be > 0")
    return int(round(value))


class CountType(click.ParamType):
    name = "COUNT"

    def convert(self, value, param, ctx):
        try:
            return parse_count(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def count_model_params(spec: str) -> int:
    """Build `module:factory` on the meta device and count its parameters. Raises UsageError."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected module:factory, got {spec!r}", where="--model")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {spec!r}: {exc}", where="--model") from None
    import torch

    from .estimate import model_to_params
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module", where="--model")
    return model_to_params(model)[0]


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def _table(rows, params, num_gpus, num_nodes):
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Model states for {params / 1e9:g}B parameters on {num_nodes} node(s) x {num_gpus} GPU(s) "
                        "(mixed-precision Adam, 16 bytes per parameter before sharding)")
    for name in ("ZeRO stage", "offload_optimizer", "offload_param", "per GPU", "per node (CPU)"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.stage), "cpu" if r.offload_optimizer else "none", "cpu" if r.offload_param else "none",
                      _gb(r.gpu_bytes), _gb(r.cpu_bytes))
    Console().print(table)
    click.echo("GB = 10^9 bytes. Activations, communication buckets, fragmentation and (stage 3) the layer "
               "being gathered are extra.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", type=CountType(), default=None, help="parameter count: 7.5e9, 7.5B, 125M")
@click.option("--model", "model_spec", default=None, metavar="MODULE:FACTORY",
              help="count the parameters of the model this callable builds (on the meta device)")
@click.option("--num_gpus", "--num-gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs per node")
@click.option("--num_nodes", "--num-nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of rows instead of a table")
def cli(params, model_spec, num_gpus, num_nodes, as_json):
    """Memory for model states per GPU and per node, for each ZeRO stage and offload choice."""
    if (params is None) == (model_spec is None):
        raise UsageError("give exactly one of --params N and --model module:factory", where="--params/--model")
    if model_spec is not None:
        if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: modules in the cwd import
            sys.path.insert(0, os.getcwd())
        params = count_model_params(model_spec)
    rows = estimate_rows(params, num_gpus_per_node=num_gpus, num_nodes=num_nodes)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        _table(rows, params, num_gpus, num_nodes)


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="dsrun-estimate", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        return 130
    except UsageError as exc:
        click.echo(f"dsrun-estimate: error: {exc.render()}", err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
