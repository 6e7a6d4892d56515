"""Incremental FP8_DYNAMIC candidates: quantize the vanilla model once, then only the matrices a trial edits.

llm-compressor's FP8_DYNAMIC weights are a pure function of each matrix (search/candidate/quantize.py, verified bit
for bit). So a candidate's checkpoint equals llm-compressor's output for the merged weights when the edited matrices
are re-quantized with that formula and every other tensor is taken from the vanilla run.

Integrity. The base is built in `<base>.staging` and renamed into place once complete, its key file (`base-key.json`:
the key and every file's sha256) written last inside the staging folder: a build killed half-way leaves no key
file, so the next start rebuilds it and never reuses half of it. A reused base is checked against the recorded
sha256 of every file before anything serves it; a corrupted or missing file is named in one line and the base
rebuilt.

Layout. `prepare_base` quantizes the vanilla model once, streamed shard by shard (search/candidate/quantize.py), into
this layout: each editable matrix (with its scale) gets its own file `edit-<module>.safetensors`, everything else goes
to `base-<source shard>.safetensors`.
`write_candidate` then makes a folder with the same file names and index: the edited matrices' files are written
anew, every other file is a relative symlink into the base. vLLM (and safetensors) load it as a normal checkpoint;
its disk use is the edited matrices only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_abliterate.search.candidate.quantize import FP8, INDEX, SCALE, quantize_fp8_dynamic, quantize_rows
from mtp_abliterate.search.errors import UserError

KEY_FILE = "base-key.json"


class Fp8BaseError(UserError, RuntimeError):
    """The vanilla FP8 base cannot serve this candidate (missing tensor, stale base); the message names the fix."""


def _edit_file(weight_name: str) -> str:
    return f"edit-{weight_name.removesuffix('.weight')}.safetensors"


def base_key(
    model_key: str, ignore: Iterable[str], editable: Iterable[str], versions: Mapping[str, str], host: str
) -> str:
    """Identity of a base: the vanilla weights, the ignore list, the split, the quantizer's versions and the host
    that built it (a base is never taken over from another machine's runs folder)."""
    payload = json.dumps([model_key, sorted(ignore), sorted(editable), sorted(versions.items()), host])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a base but its key file."""
    return {f.name: _sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != KEY_FILE}


def damage(base: Path, key: str) -> str | None:
    """Why the base for `key` cannot be reused as it is on disk: None when it can, "" when there is none (absent, half
    built, another key: rebuilt without a word), else the corrupted or missing file, in a few words."""
    try:
        record = json.loads((base / KEY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    if record.get("key") != key:
        return ""
    recorded = record.get("files")
    if not recorded:
        return "it has no recorded file hashes (built by an older mtp-abliterate)"
    for name, digest in recorded.items():
        path = base / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its recorded sha256 (corrupted)"
    return None


def prepare_base(
    source: Path,
    base: Path,
    ignore: list[str],
    editable: Iterable[str],
    key: str,
    say: Callable[[str], None] = lambda line: None,
) -> Path:
    """The vanilla FP8 base under `base`, reused when its key matches and every file its recorded sha256 (a resumed
    study), else rebuilt, streamed one source shard at a time (the study process already holds the resident model:
    no second copy). `say` gets the one line naming a corrupted base before it is rebuilt."""
    problem = damage(base, key)
    if problem is None:
        return base
    if problem:
        say(f"FP8 base {base}: {problem}; rebuilding it")
    shutil.rmtree(base, ignore_errors=True)
    staging = base.with_name(base.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    editable = set(editable)
    split = lambda name, shard: _edit_file(name) if name in editable else f"base-{shard}"  # noqa: E731
    quantize_fp8_dynamic(source, staging, ignore, file_for=split)
    index = staging / INDEX
    written = set(json.loads(index.read_text())["weight_map"]) if index.is_file() else set()
    missing = editable - written
    if missing:
        shutil.rmtree(staging)
        raise Fp8BaseError(f"editable weights not in the quantized checkpoint: {sorted(missing)[:3]}")
    record = {"key": key, "source": str(source), "files": file_digests(staging)}
    (staging / KEY_FILE).write_text(json.dumps(record, indent=1))  # last: a folder without it is never reused
    staging.rename(base)
    return base


def write_candidate(base: Path, out: Path, weights: Mapping[str, torch.Tensor]) -> Path:
    """A checkpoint of the base with `weights` (full edited matrices, by parameter name) re-quantized in place."""
    weight_map = json.loads((base / INDEX).read_text())["weight_map"]
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in weights.items():
        file = weight_map.get(name)
        if file != _edit_file(name):
            raise Fp8BaseError(
                f"{name} is not split out in the FP8 base {base}; delete that folder to rebuild it for this model"
            )
        with safe_open(base / file, "pt") as f:
            vanilla = f.get_slice(name)
            if vanilla.get_shape() != list(w.shape):
                raise Fp8BaseError(f"{name}: candidate shape {list(w.shape)} != base {vanilla.get_shape()}")
            if vanilla.get_dtype() == FP8:
                # In the dtype llm-compressor quantized the base in (its scale's), whatever dtype the resident model
                # was loaded in: a float32 checkpoint or load gives the same tensors as the base, as a whole-model
                # run of the merged weights would.
                w = w.to(f.get_tensor(name + SCALE).dtype)
                q, scale = quantize_rows(w)  # on the weights' device: same IEEE operations on CPU and GPU
                files[file] = {name: q.cpu().contiguous(), name + SCALE: scale.cpu().contiguous()}
            else:  # kept unquantized by the ignore list
                files[file] = {name: w.to(f.get_tensor(name).dtype).cpu().contiguous()}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        if f.name == KEY_FILE:
            continue
        if f.name in files:
            save_file(files[f.name], out / f.name, metadata={"format": "pt"})
        elif f.suffix == ".safetensors":
            os.symlink(os.path.relpath(f.resolve(), out.resolve()), out / f.name)
        else:
            shutil.copy2(f, out / f.name)
    return out
