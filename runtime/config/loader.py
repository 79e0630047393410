"""Reading a config source into a plain dict (reference section 1.1).

Accepted sources: a mapping; a path (str or PathLike) to a JSON file or a YAML file (`.yaml`/`.yml`);
a url-safe base64 string of JSON. Duplicate keys are an error in every form (YAML included, which PyYAML
would otherwise resolve silently). Errors name the file and the line/column.

[Note: JSON, then hjson] DeepSpeed parses config files with hjson, so real configs carry comments,
trailing commas and unquoted keys. A file is parsed as strict JSON first (Python's json, which also
reads `Infinity` as Accelerate writes it for `steps_per_print`), and only if that fails with hjson
(a `.hjson` file goes straight to hjson). When both fail, the error of the parser that read further
into the file is reported: it is the likelier intended syntax. Without the hjson package, the fallback
strips `//`, `#` and `/* */` comments and trailing commas and parses JSON again.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any, Dict, List, Mapping, Tuple

from dsrun.errors import ConfigError

__all__ = ["read_source", "locate_key"]


def read_source(source: Any) -> Tuple[Dict[str, Any], str]:
    """Return (dict, description of the source for messages)."""
    if isinstance(source, Mapping):
        return _check_top(dict(source), "<dict>"), "<dict>"
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError("config file not found", where=path,
                              hint="pass an existing JSON/YAML file, a dict, or a base64-encoded JSON string")
        text = _read_text(path)
        if path.endswith((".yaml", ".yml")):
            return _check_top(_load_yaml(text, path), path), path
        if path.endswith(".hjson"):
            return _check_top(_load_hjson(text, path), path), path
        return _check_top(_load_json(text, path), path), path
    if isinstance(source, str):
        return _check_top(_load_base64(source), "<base64>"), "<base64>"
    raise ConfigError(f"expected a config dict, a path to a JSON/YAML file or a base64 JSON string; got "
                      f"{type(source).__name__}", where="config")


def _read_text(path: str) -> str:
    """The file's text as UTF-8; a ConfigError naming line, column and byte offset if it is not."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror or exc}", where=path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        head = data[:exc.start]
        line = head.count(b"\n") + 1
        column = exc.start - (head.rfind(b"\n") + 1) + 1
        raise ConfigError(f"not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
                          f"(line {line}, column {column})", where=f"{path}:{line}:{column}",
                          hint="save the config as UTF-8 text") from None


def _looks_like_path(text: str) -> bool:
    if os.path.exists(text) or text.endswith((".json", ".hjson", ".yaml", ".yml")):
        return True
    return not _is_b64(text)  # base64 of JSON ('{"' -> "eyJ") never has spaces, dots or path separators


def _is_b64(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_\-+/]+=*", text.strip()) is not None


def _check_top(data: Any, where: str) -> Dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be an object (mapping) at the top level, got {type(data).__name__}",
                          where=where)
    return data


def _pairs_hook(where: str):
    def hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        seen, dupes = {}, []
        for key, value in pairs:
            if key in seen and key not in dupes:
                dupes.append(key)
            seen[key] = value
        if dupes:
            raise ConfigError(f"duplicate keys in config: {dupes}", where=where, hint="keep one of each")
        return seen
    return hook


def _strip_comments(text: str) -> str:
    """Remove // and /* */ comments and trailing commas outside strings; keeps line numbers."""
    out, i, n = [], 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i) or c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            block = text[i:n if j < 0 else j + 2]
            out.append("\n" * block.count("\n"))
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def _load_json(text: str, path: str) -> Any:
    """[Note: JSON, then hjson]"""
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook(path))
    except json.JSONDecodeError as exc:
        json_error = exc
    try:
        import hjson
    except ImportError:  # the dependency is missing: a plain comment stripper, then JSON again
        try:
            return json.loads(_strip_comments(text), object_pairs_hook=_pairs_hook(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}:{exc.colno}") from None
    try:
        return hjson.loads(text, object_pairs_hook=_pairs_hook(path))
    except hjson.HjsonDecodeError as exc:
        worst = json_error if json_error.pos >= exc.pos else exc
    kind = "JSON" if worst is json_error else "hjson"
    raise ConfigError(f"invalid {kind}: {worst.msg}", where=f"{path}:{worst.lineno}:{worst.colno}") from None


def _load_hjson(text: str, path: str) -> Any:
    import hjson

    try:
        return hjson.loads(text, object_pairs_hook=_pairs_hook(path))
    except hjson.HjsonDecodeError as exc:
        raise ConfigError(f"invalid hjson: {exc.msg}", where=f"{path}:{exc.lineno}:{exc.colno}") from None


def _load_base64(text: str) -> Any:
    try:
        padded = text.strip() + "=" * (-len(text.strip()) % 4)
        decoded = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_")).decode("utf-8")
        return json.loads(decoded, object_pairs_hook=_pairs_hook("<base64>"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("not an existing file path and not a base64-encoded JSON config", where="config",
                          hint=f"got {text[:60]!r}") from None


def _load_yaml(text: str, path: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in out:
                raise ConfigError(f"duplicate key {key!r} in config", where=f"{path}:{key_node.start_mark.line + 1}",
                                  hint="keep one of each")
            out[key] = loader.construct_object(value_node, deep=deep)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", where=where) from None


def locate_key(path: str, key_path: str) -> "int | None":
    """1-based line of `key_path` (dotted) in the config file at `path`, or None.

    YAML: exact, from the composed node tree. JSON: the first match of each key, in order, after the
    previous one; exact for the usual one-key-per-line configs, a best effort otherwise.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    parts = [p for p in key_path.split(".") if p]
    if not parts:
        return None
    if path.endswith((".yaml", ".yml")):
        return _locate_yaml(text, parts)
    pos = 0
    for part in parts:
        # quoted (JSON) or bare (hjson) key
        match = re.compile(r'(?<![\w"])"?' + re.escape(part) + r'"?\s*:').search(text, pos)
        if match is None:
            return None
        pos = match.start()
    return text.count("\n", 0, pos) + 1


def _locate_yaml(text: str, parts) -> "int | None":
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            return line
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return line
    return line
