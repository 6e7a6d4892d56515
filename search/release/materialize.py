"""Rebuild a trial's candidate from its recorded parameters and the cached module I/O, and prove it is the same.

ARA is deterministic (per-module seeds, fixed optimiser), so the edited matrices can be recomputed instead of kept.
The sha256 of the edited matrices as deployed was recorded at trial time; a rebuild that does not reproduce it is
an error that names what differs (software versions, module I/O inputs), never a silently different model.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtp_abliterate.search.candidate.checkpoint import CheckpointError
from mtp_abliterate.search.candidate.heretic_bridge import ModelLoadError
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.errors import UserError
from mtp_abliterate.search.release.fused_experts import fuse_unquantized_experts
from mtp_abliterate.search.study.records import TrialRecord, records
from mtp_abliterate.search.study.space import candidate_of
from mtp_abliterate.search.study.storage import run_dir_of
from mtp_abliterate.search.versions import software_versions


class MaterializeError(UserError, RuntimeError):
    """The trial cannot be rebuilt as recorded; the message says what differs and what to do."""


@dataclass
class Materialized:
    path: Path
    merged_digest: str
    precision: str


def recorded_trial(study, number: int) -> TrialRecord:
    """The record of a scored trial; raises MaterializeError naming the fix."""
    found = {r.number: r for r in records(study)}
    if number not in found:
        raise MaterializeError(f"study {study.study_name} has no trial {number}; see `mtp-abliterate study status`")
    r = found[number]
    if not r.scored:
        raise MaterializeError(f"trial {number} is {r.state.name.lower()}, not a scored candidate; pick a complete one")
    return r


def _differences(t: TrialRecord, io_key: str | None) -> str:
    recorded, now = t.versions, software_versions()
    diffs = [f"{k} {recorded[k]} -> {now.get(k)}" for k in sorted(recorded) if recorded[k] != now.get(k)]
    if t.module_io_key != io_key:
        diffs.append("module I/O inputs (model files, train prompts or batch size) changed")
    return "; ".join(diffs) or "same software versions and inputs (a nondeterministic kernel on this machine?)"


def materialize(
    cfg: StudyConfig, t: TrialRecord, out: Path, precision: str = "fp8", fuse_experts: bool = False
) -> Materialized:
    """Write the trial's candidate to `out` (FP8 as served, or BF16) after checking its edited tensors' hash.
    `fuse_experts`: unquantized routed experts in transformers' fused layout (an export), not llm-compressor's split
    one (what was served)."""
    from mtp_abliterate.search.candidate.resident import Resident

    if precision not in ("fp8", "bf16"):
        raise MaterializeError(f"precision {precision!r} is not one of fp8, bf16")
    try:
        resident = Resident(cfg, cache_dir=run_dir_of(cfg) / "cache")
    except (CheckpointError, ModelLoadError) as e:
        raise MaterializeError(str(e)) from None
    resident.apply(candidate_of(t.params, resident.abliterator.num_layers))
    weights = resident.abliterator.merged_weights()
    digest = resident.abliterator.merged_digest(weights)
    if digest != t.merged_digest:
        raise MaterializeError(
            f"trial {t.number}'s rebuilt edited tensors differ from the recorded ones (sha256 {digest[:12]} vs "
            f"{t.merged_digest[:12]}): {_differences(t, resident.io_key)}; rebuild with the recorded "
            "versions and inputs"
        )
    if out.exists() and any(out.iterdir()):
        raise MaterializeError(f"{out} is not empty; pass a new folder")
    if out.exists():
        out.rmdir()
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        merged = resident.abliterator.save_merged(Path(tmp) / "bf16", resident.local_dir(), weights)
        if precision == "fp8":
            quantize_fp8_dynamic(merged, out, cfg.quantization.ignore)
            if fuse_experts:
                fuse_unquantized_experts(out, merged)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(merged), out)
    return Materialized(out, digest, precision)
