"""ARA cost, measured in one run: a table of medians, spreads and ratios.

  python benchmarks/bench_ara.py organism          per-trial stages (ARA, KL, refusals, reset) on the organism, CPU
  python benchmarks/bench_ara.py shapes --device cuda
                                                   ARA over all 30 layers x both components at Gemma 4 26B-A4B's
                                                   module shapes (random weights and module I/O), e.g. on an H100

Numbers from shared 2-core machines are noise in absolute terms; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_abliterate.search.candidate.ara import AraParameters, ModuleTask, module_seed, optimise_modules  # noqa: E402

console = Console(width=120)

# Gemma 4 26B-A4B text stack: 30 layers, 5 sliding : 1 full; o_proj takes 16 heads x 256 (sliding) or
# x 512 (full); the dense MLP's down_proj takes 2112; all write the 2816-wide residual.
HIDDEN, HEADS, SLIDING_HEAD, FULL_HEAD, DENSE_FF, LAYERS = 2816, 16, 256, 512, 2112, 30
CANDIDATES = {
    "steer-strong": AraParameters(
        start_layer_index=0, end_layer_index=30, preserve_w=1.0, steer_w=0.05, overcorrect_w=1.0, k=5
    ),
    "steer-mild": AraParameters(
        start_layer_index=0, end_layer_index=30, preserve_w=0.5, steer_w=0.01, overcorrect_w=0.3, k=10
    ),
}


def _stats(values: list[float]) -> tuple[str, str, str]:
    return f"{statistics.median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}"


def _shape_tasks(device: str, prompts: int, gen: torch.Generator) -> list[ModuleTask]:
    """Random weights and module I/O at the real shapes: every layer's o_proj (sliding or full) and down_proj."""
    tasks = []
    for layer in range(LAYERS):
        full = (layer + 1) % 6 == 0
        for component, d_in in (
            ("attn.o_proj", HEADS * (FULL_HEAD if full else SLIDING_HEAD)),
            ("mlp.down_proj", DENSE_FF),
        ):
            w0 = (torch.randn(HIDDEN, d_in, generator=gen) * d_in**-0.5).to(torch.bfloat16).to(device)
            io = {
                "good_in": torch.randn(prompts, d_in, generator=gen),
                "bad_in": torch.randn(prompts, d_in, generator=gen) + 0.5,
            }
            io = {k: v.to(device) for k, v in io.items()}
            io["good_out"] = io["good_in"] @ w0.float().T
            io["bad_out"] = io["bad_in"] @ w0.float().T
            tasks.append(ModuleTask(w0, io, module_seed(0, layer, component, 0), w0.float().norm(dim=1)))
    return tasks


def bench_shapes(device: str, rank: int, prompts: int, repeats: int, workers: list[int], candidates: list[str]) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    console.print(f"device: {name}; torch {torch.__version__}; rank {rank}; {prompts} good + {prompts} bad prompts")
    tasks = _shape_tasks(device, prompts, gen)
    # Once, untimed: CUDA context, kernels and allocator warm-up are a once-per-process cost.
    optimise_modules(tasks[:2], CANDIDATES["steer-mild"], rank, max(workers))
    modes = [("eager", 1)] + [("graph", n) for n in workers]
    table = Table(title=f"ARA at Gemma 4 26B-A4B module shapes ({len(tasks)} modules: 30 layers x o_proj + down_proj)")
    for col in ("candidate", "loss+grad", "workers", "all-layer ARA s: median", "min", "max", "vs eager", "vs 20 s"):
        table.add_column(col)
    for label in candidates:
        params = CANDIDATES[label]
        reference: list | None = None
        eager_median = 0.0
        for mode, n in modes:
            totals = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                results = optimise_modules(tasks, params, rank, n, graph=mode == "graph")
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                totals.append(time.perf_counter() - t0)
            # Neither graphs nor threads may change any module's result.
            reference = reference or results
            same = all(
                torch.equal(r[0], q[0]) and torch.equal(r[1], q[1]) for r, q in zip(results, reference, strict=True)
            )
            median = statistics.median(totals)
            eager_median = eager_median or median
            table.add_row(
                label,
                mode,
                f"{n}{'' if same else ' (results differ!)'}",
                *_stats(totals),
                f"{eager_median / median:.2f}x",
                f"{median / 20.0:.2f}x",
            )
    console.print(table)


def bench_organism(repeats: int) -> None:
    from mtp_abliterate.search.candidate.resident import Resident
    from mtp_abliterate.search.config import load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "organism.toml")
    t0 = time.perf_counter()
    resident = Resident(cfg, cache_dir=None)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    resident.module_io()
    capture_s = time.perf_counter() - t0
    base = AraParameters(**cfg.search.enqueue[0])
    stages: dict[str, list[float]] = {"ARA": [], "KL": [], "refusals": [], "reset": []}
    for i in range(repeats):
        params = base.model_copy(update={"steer_w": base.steer_w * (1 + 0.1 * i)})
        t = time.perf_counter()
        resident.apply(params)
        stages["ARA"].append(time.perf_counter() - t)
        t = time.perf_counter()
        resident.kld.compute()
        stages["KL"].append(time.perf_counter() - t)
        t = time.perf_counter()
        resident.refusal.compute()
        stages["refusals"].append(time.perf_counter() - t)
        t = time.perf_counter()
        resident.abliterator.reset()
        stages["reset"].append(time.perf_counter() - t)
    trial = [sum(v[i] for v in stages.values()) for i in range(repeats)]
    table = Table(title=f"organism trial stages, CPU ({torch.get_num_threads()} threads), {repeats} trials")
    for col in ("stage", "median s", "min s", "max s", "share of trial"):
        table.add_column(col)
    for name, values in stages.items():
        table.add_row(name, *_stats(values), f"{statistics.median(values) / statistics.median(trial):.1%}")
    table.add_row("trial", *_stats(trial), "100%")
    console.print(table)
    console.print(f"once per study: load {load_s:.1f} s, module I/O capture {capture_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["organism", "shapes"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=400, help="good and bad prompts each (heretic: 400)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help="comma-separated, from " + ", ".join(CANDIDATES)
    )
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated concurrent modules to compare (GPU)")
    args = parser.parse_args()
    if args.what == "shapes":
        workers = [int(w) for w in args.workers.split(",")]
        bench_shapes(args.device, args.rank, args.prompts, args.repeats, workers, args.candidates.split(","))
    else:
        bench_organism(args.repeats)


if __name__ == "__main__":
    main()
