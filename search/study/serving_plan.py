"""How the study serves its candidates: swaps into one server when they can be trusted, else a cold start each.

The swap self-check's verdict is kept in the study, keyed by what it holds for (serving settings, draft, FP8 base):
a resumed run reuses it, a changed setup checks again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp_abliterate.search.candidate.fp8_base import KEY_FILE
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.serving.modes import ColdServing, ServingMode, SwapServing, beside_resident
from mtp_abliterate.search.serving.server import VllmServer
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.storage import run_dir_of


def swap_key(cfg: StudyConfig, base: Path | None) -> str:
    """What a swap self-check verdict holds for: the serving settings (but how the check itself is run), the draft
    and the base checkpoint. Paths as the TOML wrote them: the key verdicts were recorded under before paths resolved
    at load."""
    written = cfg.as_written()
    base_id = (base / KEY_FILE).read_text() if base else written["model"]["target"]
    serving = {k: v for k, v in written["serving"].items() if k != "self_check_beside"}
    payload = json.dumps([serving, written["model"]["draft"], base_id], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class ServingPlan:
    mode: ServingMode
    check_pending: bool  # the next candidate runs the swap self-check
    note: str | None  # what to tell the user about the choice


def plan_serving(
    cfg: StudyConfig, base: Path | None, unquantized: Path, verdict: dict[str, Any] | None, run_dir: Path
) -> ServingPlan:
    """Swap serving unless the config or an earlier failed self-check (for the same setup) says cold.
    `base`: the FP8 base (None when candidates are quantized whole); `unquantized`: the vanilla checkpoint, the
    swap server's first model when the study does not quantize."""
    mode = cfg.serving.mode
    cold = ColdServing(cfg.serving, cfg.model.draft, cfg.name)
    if mode == "cold":
        return ServingPlan(cold, False, None)
    initial = base if base else (None if cfg.quantization.scheme == "FP8_DYNAMIC" else unquantized)
    if initial is None:
        if mode == "swap":
            raise StudyError(
                "serving.mode = 'swap' needs FP8 candidates built incrementally: set "
                "quantization.incremental = true (or serving.mode = 'auto')"
            )
        return ServingPlan(cold, False, "serving: cold starts (swapping needs quantization.incremental = true)")
    same_setup = bool(verdict) and verdict["key"] == swap_key(cfg, base)
    if mode == "auto" and same_setup and not verdict.get("passed", verdict["identical"]):
        note = f"serving: cold starts (the swap self-check failed on trial {verdict['trial']})"
        return ServingPlan(cold, False, note)
    swap = SwapServing(cfg.serving, cfg.model.draft, cfg.name, initial, run_dir / "server.log")
    return ServingPlan(swap, mode == "auto" and not same_setup, None)


def study_servers(cfg: StudyConfig) -> list[tuple[str, VllmServer]]:
    """The servers a study starts, unstarted (for `study run --dry-run`): the swap server on the FP8 base and a
    cold server for a candidate."""
    run_dir = run_dir_of(cfg)
    servers = []
    if cfg.serving.mode != "cold":
        servers.append(("study server (swaps)", run_dir / "fp8-base", True, (run_dir,)))
    candidate = run_dir / "trials" / "0" / "candidate"
    servers.append(("cold server (a candidate; the swap self-check)", candidate, False, (candidate.parent,)))
    return [
        (
            title,
            VllmServer(
                beside_resident(cfg.serving),
                str(model),
                cfg.model.draft,
                run_dir / "server.log",
                swappable=swappable,
                mounts=mounts,
                label=cfg.name,
            ),
        )
        for title, model, swappable, mounts in servers
    ]
