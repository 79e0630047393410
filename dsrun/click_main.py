"""Run a click command as a console entry point that returns its exit code (for `dsrun-report`,
`dsrun-to-fp32`): usage errors print click's message and give 2, `--help` gives 0, no traceback."""
from typing import Optional, Sequence

import click

__all__ = ["run_command"]


def run_command(command: click.Command, argv: Optional[Sequence[str]], prog_name: str) -> int:
    try:
        return command.main(args=list(argv) if argv is not None else None, prog_name=prog_name,
                            standalone_mode=False) or 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
