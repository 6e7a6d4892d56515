"""Where the experts organism's refusals can be removed from: the same ARA grid with and without the routed-experts
component, and heretic's directional method with and without the experts' kernel, measured in one run.

  python benchmarks/bench_experts_organism.py [--config configs/organism-experts.toml]

Every candidate is applied to the resident model and scored on the held-out prompts exactly as a study scores it
(refusal rate over `max_response_length` greedy tokens, heretic's first-token KL on the harmless set); nothing is
served, so acceptance is not in this table (the study's enqueued trials measure it). Prints each grid's Pareto
front (refusal, KL) and the lowest refusal rate each reaches under a few KL bounds: the component matters where the
bound is tight.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_abliterate.search.candidate.ara import AraParameters  # noqa: E402
from mtp_abliterate.search.candidate.resident import Resident  # noqa: E402
from mtp_abliterate.search.config import load_config  # noqa: E402
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, candidate_of  # noqa: E402

console = Console(width=130)
KL_BOUNDS = (0.003, 0.01, 0.03, 0.1)
EXPERTS_PER_LAYER = (0, 1, 2, 4)


def ara_grid(num_layers: int) -> list[dict]:
    """Layer ranges inside the space's bounds (start <= L/2 <= end) crossed with the ARA weights, preserve_w 1."""
    half = num_layers // 2
    ranges = [(0, num_layers), (1, num_layers - 1), (half, half + 1), (0, half + 1), (half, num_layers)]
    return [
        dict(start_layer_index=s, end_layer_index=e, preserve_w=1.0, steer_w=sw, overcorrect_w=oc, k=5)
        for (s, e), sw, oc in itertools.product(ranges, (0.01, 0.05, 0.2), (0.0, 1.0))
    ]


def directional(space: SearchSpace, weight: float, experts: bool, num_layers: int):
    kernel = {"max_weight": weight, "position": 0.0, "min_weight": 1.0, "reach": 1.0}
    raw = dict(FULL_WEIGHT_DIRECTIONAL)
    for component in ("attn.o_proj", "mlp.down_proj") + (("experts.down_proj",) if experts else ()):
        raw |= {f"{component}.{k}": v for k, v in kernel.items()}
    return candidate_of(space.check_enqueued(raw), num_layers)


def front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    def dominated(p: tuple, q: tuple) -> bool:
        return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])

    return sorted({p for p in points if not any(dominated(p, q) for q in points)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/organism-experts.toml"))
    args = parser.parse_args()
    cfg = load_config(args.config, check_paths=False)
    resident = Resident(cfg, cache_dir=None)
    ab = resident.abliterator
    space = SearchSpace(ab.num_layers, None, ("ara", "directional"), ab.num_experts)
    arms: dict[str, list] = {f"ARA, {n} experts/layer": [] for n in EXPERTS_PER_LAYER}
    arms |= {"directional, dense only": [], "directional + experts": []}
    jobs = [
        (f"ARA, {n} experts/layer", AraParameters(**g, experts_per_layer=n), g)
        for n in EXPERTS_PER_LAYER
        for g in ara_grid(ab.num_layers)
    ]
    for w in (0.5, 1.0, 1.5):  # the space's max_weight range ends at 1.5
        jobs.append(("directional, dense only", directional(space, w, False, ab.num_layers), {"weight": w}))
        jobs.append(("directional + experts", directional(space, w, True, ab.num_layers), {"weight": w}))
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("candidates", total=len(jobs))
        for arm, params, label in jobs:
            resident.apply(params)
            scores = resident.evaluate()
            arms[arm].append((scores["refusal_rate"].value, scores["kld"].value, str(label)))
            progress.advance(task)
    ab.reset()
    vanilla = resident.evaluate()["refusal_rate"].value
    console.print(
        f"{args.config}: {len(jobs)} candidates in {time.perf_counter() - t0:.0f} s; vanilla refusal "
        f"rate {vanilla:.2f} on {len(resident.refusal.prompts)} held-out harmful prompts"
    )

    best = Table(title="lowest refusal rate reached with KL <= bound (candidates in the arm)")
    best.add_column("arm")
    best.add_column("n", justify="right")
    for bound in KL_BOUNDS:
        best.add_column(f"KL <= {bound}", justify="right")
    for arm, points in arms.items():
        cells = [min((r for r, kl, _ in points if kl <= bound), default=None) for bound in KL_BOUNDS]
        best.add_row(arm, str(len(points)), *("-" if c is None else f"{c:.2f}" for c in cells))
    console.print(best)

    fronts = Table(title="Pareto front (refusal, KL) of each arm")
    for column in ("arm", "refusal", "KL", "candidate"):
        fronts.add_column(column)
    for arm, points in arms.items():
        for refusal, kl, label in front(points):
            fronts.add_row(arm, f"{refusal:.2f}", f"{kl:.4f}", label)
    console.print(fronts)


if __name__ == "__main__":
    main()
