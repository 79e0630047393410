"""`python -m dsrun [OPTIONS] SCRIPT [SCRIPT_ARGS]...`: the same as the `dsrun` command."""
from dsrun.launcher.cli import main

if __name__ == "__main__":
    main()
