"""Masking secret-looking values in what dsrun prints (`--dry_run`).

A variable's value is secret when its name looks like a credential: one of its `_`-separated words
ends with TOKEN, SECRET, PASSWORD, PASSWD, KEY, CREDENTIAL or AUTH (plurals too: `HF_TOKEN`,
`WANDB_API_KEY`, `AWS_SECRET_ACCESS_KEY`, `GITHUB_AUTH`), or starts with SECRET, PASSWORD, PASSWD,
CREDENTIAL or AUTHORIZ. `TOKENIZERS_PARALLELISM` is not. Such values print as `***` in the env and
wherever they appear inside a printed command (`NAME=value` words, whole words, and substrings of
values of 4 characters or more).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping

__all__ = ["MASK", "looks_secret", "mask_env", "mask_argv"]

MASK = "***"
_ENDS = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|AUTH)S?$")
_STARTS = re.compile(r"^(SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTHORIZ)")
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.-])(-{0,2}[A-Za-z_][A-Za-z0-9_.-]*)=([^\s'\"]+)")
_MIN_SUBSTRING = 4  # shorter values are masked only as whole words, not inside other text


def looks_secret(name: str) -> bool:
    """True when a variable (or option) named `name` probably holds a credential."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return any(_ENDS.search(w) or _STARTS.search(w) for w in words)


def mask_env(env: Mapping[str, str]) -> Dict[str, str]:
    """A copy of `env` with the values of secret-looking names replaced by `***`."""
    return {k: (MASK if looks_secret(k) and v else v) for k, v in env.items()}


def _secret_values(env: Mapping[str, str]) -> List[str]:
    values = {v for k, v in env.items() if v and looks_secret(k)}
    return sorted(values, key=len, reverse=True)  # longest first: a value containing another


def mask_word(word: str, secrets: Iterable[str]) -> str:
    """`word` with every secret value, and the value of any `SECRET_NAME=value`, masked."""
    word = _ASSIGNMENT.sub(lambda m: f"{m.group(1)}={MASK}" if looks_secret(m.group(1)) else m.group(0), word)
    for value in secrets:
        if word == value or word.endswith("=" + value):
            return word[:len(word) - len(value)] + MASK
        if len(value) >= _MIN_SUBSTRING and value in word:
            word = word.replace(value, MASK)
    return word


def mask_argv(argv: Iterable[str], env: Mapping[str, str]) -> List[str]:
    """`argv` with the secret values of `env` (and secret `NAME=value` words) masked."""
    secrets = _secret_values(env)
    return [mask_word(word, secrets) for word in argv]
