"""A draft-tune as a record (JSON, kept in the study and logged to MLflow) and as the before/after table.

Per acceptance set: the candidate's acceptance with the vanilla draft and with the tuned draft (per position,
speed-true accepted tokens per step with its 95 % CI, prompts as the unit), the tuned draft's paired gain on the
same prompts (`objectives/paired.py`), the vanilla body's figure from the study, and the share of the candidate's
loss against the vanilla body that the tuned draft recovers, from paired differences on the prompts all three
measured: (tuned - vanilla draft) / (vanilla body - vanilla draft).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from rich import box
from rich.table import Table

from mtp_abliterate.objectives.paired import paired, per_prompt_of
from mtp_abliterate.search import metrics as names
from mtp_abliterate.search.draft.distill import Budget
from mtp_abliterate.search.draft.tune import Served, Tuned

ACC = "accepted_per_step"
KEPT = ("per_position", "per_position_ci95", ACC, "vllm_mean_accepted_tokens", "ci95", "num_prompts", "num_drafts")


def _figures(served: Served, name: str) -> dict[str, Any]:
    return {k: served.details["sets"][name][k] for k in KEPT}


def recovered(body: float | None, before: float, after: float) -> float | None:
    """The share of the loss (body - before) the tuned draft wins back; None without a loss to recover."""
    if body is None or not body > before:
        return None
    return (after - before) / (body - before)


def tune_record(
    tuned: Tuned, vanilla_body: dict[str, float] | None, body_counts: dict[str, Any], budget: Budget
) -> dict[str, Any]:
    """`vanilla_body`: the study's vanilla metrics; `body_counts`: its per-prompt acceptance counts by set."""
    sets = {}
    before_counts, after_counts = per_prompt_of(tuned.vanilla.details), per_prompt_of(tuned.tuned.details)
    for name in tuned.vanilla.details["sets"]:
        before, after = _figures(tuned.vanilla, name), _figures(tuned.tuned, name)
        body = (vanilla_body or {}).get(names.set_metric(name, names.ACCEPTED_PER_STEP))
        gain = paired({name: after_counts[name]}, {name: before_counts[name]}, {name: 1.0})
        share = None
        if name in body_counts:  # paired on the same prompts: the body's loss and the tuned draft's gain
            loss = paired({name: body_counts[name]}, {name: before_counts[name]}, {name: 1.0})
            share = gain.difference / loss.difference if loss.difference > 0 else None
        sets[name] = {
            "vanilla_draft": before,
            "tuned_draft": after,
            "vanilla_body": body,
            "gain": gain.difference,
            "gain_ci95": gain.halfwidth,
            "recovered": share if name in body_counts else recovered(body, before[ACC], after[ACC]),
            "differing_answers": tuned.differing[name],
        }
    return {
        "draft": str(tuned.draft_dir),
        "examples": tuned.examples,
        "training": asdict(tuned.training),
        "budget": asdict(budget),
        "sets": sets,
        "identical": not any(tuned.differing.values()),
    }


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as flat metric names (MLflow)."""
    out: dict[str, float] = {f"training.{k}": float(v) for k, v in record["training"].items()}
    out["examples"] = float(record["examples"])
    for name, s in record["sets"].items():
        for draft in ("vanilla_draft", "tuned_draft"):
            f = s[draft]
            out[f"{name}.{draft}.{names.ACCEPTED_PER_STEP}"] = f["accepted_per_step"]
            out[f"{name}.{draft}.{names.CI95}"] = f["ci95"]
            for i, a in enumerate(f["per_position"]):
                out[f"{name}.{draft}.{names.acc_pos(i)}"] = a
        if s["recovered"] is not None:
            out[f"{name}.recovered"] = s["recovered"]
        out[f"{name}.gain"], out[f"{name}.gain_ci95"] = s["gain"], s["gain_ci95"]
        out[f"{name}.differing_answers"] = float(s["differing_answers"])
    return out


def _mean(f: dict[str, Any]) -> str:
    return f"{f['accepted_per_step']:.3f} ± {f['ci95']:.3f}"


def tune_table(record: dict[str, Any], title: str) -> Table:
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD)
    columns = ("set", "draft", "acceptance per position", "accepted/step ± 95% CI", "steps", "vanilla body")
    for col in (*columns, "gain (paired)", "recovered"):
        table.add_column(col, overflow="fold")
    for name, s in record["sets"].items():
        body = "-" if s["vanilla_body"] is None else f"{s['vanilla_body']:.3f}"
        share = "-" if s["recovered"] is None or math.isnan(s["recovered"]) else f"{100 * s['recovered']:.0f} %"
        for draft, label in (("vanilla_draft", "vanilla"), ("tuned_draft", "tuned")):
            f = s[draft]
            tuned = draft == "tuned_draft"
            table.add_row(
                name if not tuned else "",
                label,
                " / ".join(f"{a:.3f}" for a in f["per_position"]),
                _mean(f),
                str(f["num_drafts"]),
                body if not tuned else "",
                f"{s['gain']:+.3f} ± {s['gain_ci95']:.3f}" if tuned else "",
                share if tuned else "",
            )
    return table


def identity_line(record: dict[str, Any]) -> str:
    counts = {name: s["differing_answers"] for name, s in record["sets"].items()}
    total = {name: s["tuned_draft"]["num_prompts"] for name, s in record["sets"].items()}
    if record["identical"]:
        return "greedy answers identical with either draft: " + ", ".join(f"{n} {total[n]}/{total[n]}" for n in total)
    return "greedy answers DIFFER between the drafts: " + ", ".join(
        f"{n} {counts[n]} of {total[n]}" for n in counts if counts[n]
    )
