"""Config inheritance: `extends = "base.toml"` (relative to the file) merges a base study TOML under the file's own
fields, recursively. Tables merge key by key; arrays and scalars replace. Each field remembers the file that set it
(`config check` prints it, errors name it), and a base's relative paths keep meaning what they meant in its folder.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from mtp_abliterate.search.errors import UserError

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EXTENDS = "extends"

Field = tuple[str, ...]  # a key path: ("search", "constraints", "max_kl")


class MergeError(UserError):
    """A study file, or one it extends, that cannot be read; one line naming the file and the fix."""


@dataclass(frozen=True)
class Merged:
    raw: dict[str, Any]  # the merged tables, without `extends`
    origins: dict[Field, Path]  # every value set by a file (arrays as one value) -> that file
    extends: str | None  # the top file's own `extends`, as written

    def origin(self, loc: tuple[Any, ...]) -> Path | None:
        """The file that set the field at `loc` (a validation error's location), or None for a default."""
        for end in range(len(loc), 0, -1):
            if (found := self.origins.get(loc[:end])) is not None:
                return found
        return None


def load_merged(path: Path, chain: tuple[Path, ...] = ()) -> Merged:
    """`path` with every config it extends merged under it. Raises MergeError."""
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(p.name for p in (*chain, here))
        raise MergeError(f"{chain[-1]}: extends: {cycle} is a cycle; remove one of these `extends`")
    raw = read_toml(path)
    extends = raw.pop(EXTENDS, None)
    own = {leaf: path for leaf in _leaves(raw)}
    if extends is None:
        return Merged(raw, own, None)
    if not isinstance(extends, str):
        raise MergeError(f"{path}: extends: must be the path of a study TOML (got {extends!r}); fix the value")
    base_path = path.parent / extends
    if not base_path.is_file():
        raise MergeError(f"{path}: extends: {base_path} does not exist; fix the path (relative to {path.parent})")
    base = load_merged(base_path, (*chain, here))
    base_raw = base.raw if base_path.parent.resolve() == here.parent else rebase_paths(base.raw, base_path.parent)
    merged = deep_merge(base_raw, raw)
    origins = {leaf: own.get(leaf) or base.origins[leaf] for leaf in _leaves(merged)}
    return Merged(merged, origins, extends)


def standalone_text(path: Path) -> str:
    """The study TOML as the study folder and MLflow keep it: its own text, or, when it extends another, the merged
    config (a copy read without its base must mean the same). Raises MergeError."""
    merged = load_merged(path)
    if merged.extends is None:
        return path.read_text(encoding="utf-8")
    header = f"# {path} merged with the configs it extends (`mtp-abliterate config check` shows which set what)\n"
    return header + tomli_w.dumps(merged.raw)


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MergeError(f"{path}: no such file; pass the path of a study TOML such as configs/organism.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise MergeError(f"{path}: not valid TOML ({e}); fix the syntax there") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot be read ({e.strerror}); fix its permissions") from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over `base`: tables key by key, anything else (arrays included) replaced."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_tables else value
    return out


def _leaves(raw: dict[str, Any], prefix: Field = ()) -> Iterator[Field]:
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def resolve_path(folder: Path, value: str) -> str:
    """`value` relative to `folder` made absolute; HF ids (that are no local path) and absolute paths unchanged."""
    local = folder / value
    if Path(value).is_absolute() or exists(local) or not HF_ID.match(value):
        # normpath, not resolve(): a virtualenv's python is a symlink that must stay one
        return os.path.normpath(local.absolute())
    return value


def exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def rebase_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`raw` with its relative paths made absolute from `folder`: a base in another folder than the file that
    extends it keeps its meaning there (the file's own paths stay relative to its own folder)."""

    def rebased(node: Any, keys: tuple[Any, ...]) -> Any:
        if not keys:
            return resolve_path(folder, node) if isinstance(node, str) else node
        key, rest = keys[0], keys[1:]
        if key == "*" and isinstance(node, list):
            return [rebased(item, rest) for item in node]
        if isinstance(node, dict) and key in node:
            return {**node, key: rebased(node[key], rest)}
        return node  # absent, or the wrong type: validation says so

    for keys in PATH_FIELDS:
        raw = rebased(raw, keys)
    return raw


# Every field that names a local path ("*": each item of an array): config.py's `LocalPath` fields, which load_config
# makes absolute from the TOML's folder.
PATH_FIELDS: tuple[tuple[str, ...], ...] = (
    ("runs_dir",),
    ("model", "target"),
    ("model", "draft"),
    *(("prompts", name, "source") for name in ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval")),
    ("acceptance", "sets", "*", "prompts", "source"),
    ("draft_tune", "prompts", "*", "source"),
    ("serving", "python"),
)
