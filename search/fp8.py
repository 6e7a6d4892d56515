"""Incremental FP8_DYNAMIC candidates: quantize the vanilla model once, then only the matrices a trial edits.

llm-compressor's FP8_DYNAMIC weights are a pure function of each matrix (DESIGN §5, verified bit for bit): per
output row `scale = amax(|w|) / 448` in the weight's dtype, a zero scale replaced by the dtype's eps, and
`q = clamp(w / scale + 0, -448, 448)` cast to float8_e4m3fn (the `+ 0` is oneshot's zero point: it writes +0 where
the bare division gives -0). So a candidate's checkpoint equals llm-compressor's output for the merged weights when
the edited matrices are re-quantized with that formula and every other tensor is taken from the vanilla run.

Layout. `prepare_base` runs llm-compressor once on the vanilla model and re-shards its output: each editable matrix
(with its scale) gets its own file `edit-<module>.safetensors`, everything else stays in `base-*.safetensors`.
`write_candidate` then makes a folder with the same file names and index: the edited matrices' files are written
anew, every other file is a relative symlink into the base. vLLM (and safetensors) load it as a normal checkpoint;
its disk use is the edited matrices only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from search.quantize import FP8, quantize_fp8_dynamic

FP8_MAX = 448.0
INDEX = "model.safetensors.index.json"
KEY_FILE = "base-key.json"
SCALE = "_scale"


class Fp8BaseError(RuntimeError):
    """The vanilla FP8 base cannot serve this candidate (missing tensor, stale base); the message names the fix."""


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, per-row scale) exactly as llm-compressor's FP8_DYNAMIC writes them, in `w`'s dtype."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = amax / torch.tensor(FP8_MAX, dtype=w.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
    q = torch.clamp(w / scale + torch.zeros((), dtype=w.dtype), -FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def _edit_file(weight_name: str) -> str:
    return f"edit-{weight_name.removesuffix('.weight')}.safetensors"


def base_key(model_key: str, ignore: Iterable[str], editable: Iterable[str], versions: Mapping[str, str]) -> str:
    """Identity of a base: the vanilla weights, the ignore list, the split and the quantizer's versions."""
    payload = json.dumps([model_key, sorted(ignore), sorted(editable), sorted(versions.items())])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def prepare_base(source: Path, base: Path, ignore: list[str], editable: Iterable[str], key: str) -> Path:
    """The vanilla FP8 base under `base`, reused when its key matches (a resumed study), else rebuilt."""
    key_file = base / KEY_FILE
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        return base
    shutil.rmtree(base, ignore_errors=True)
    staging = base.with_name(base.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    quantize_fp8_dynamic(source, staging, ignore)
    _reshard(staging, base, set(editable))
    shutil.rmtree(staging)
    key_file.write_text(json.dumps({"key": key, "source": str(source)}))
    return base


def _reshard(src: Path, out: Path, editable: set[str]) -> None:
    """Copy `src` into `out`, moving each editable matrix (and its scale) into its own file."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    edits: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(src.glob("*.safetensors")):
        rest = {}
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                owner = name.removesuffix(SCALE) if name.endswith(".weight" + SCALE) else name
                if owner in editable:
                    edits.setdefault(owner, {})[name] = f.get_tensor(name)
                    weight_map[name] = _edit_file(owner)
                else:
                    rest[name] = f.get_tensor(name)
                    weight_map[name] = f"base-{shard.name}"
        if rest:
            save_file(rest, tmp / f"base-{shard.name}", metadata={"format": "pt"})
    missing = editable - edits.keys()
    if missing:
        raise Fp8BaseError(f"editable weights not in the quantized checkpoint: {sorted(missing)[:3]}")
    for owner, tensors in edits.items():
        save_file(tensors, tmp / _edit_file(owner), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != INDEX:
            shutil.copy2(f, tmp / f.name)
    total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


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
