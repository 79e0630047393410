"""DeepSpeed's module name `deepspeed.launcher.runner`, for code that imports it.

`accelerate launch --use_deepspeed` imports `DEEPSPEED_ENVIRONMENT_NAME` from here (the env file it
appends to for multi-node runs); `main` is the launcher's command line (cli.py).
"""
import os

from .cli import main
from .envfile import ENV_FILE_NAME

__all__ = ["DEEPSPEED_ENVIRONMENT_NAME", "main"]

# As DeepSpeed: the file name, renamed by DS_ENV_FILE (read once, at import; envfile.py reads it per launch).
DEEPSPEED_ENVIRONMENT_NAME = os.getenv("DS_ENV_FILE", ENV_FILE_NAME)
