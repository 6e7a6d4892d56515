"""Cost of the routed-experts ARA component at Gemma 4 26B-A4B's shapes, measured in one run (median, spread, ratios).

  python benchmarks/bench_experts.py --device cuda      e.g. on an H100/H200

Per trial the component solves one ARA problem per edited expert (down projection 2816 x 704, rank r) over the
harmful and harmless prompts routed to it, then re-quantizes each edited expert to FP8 (llm-compressor's per-row
formula). Both are timed over all 30 layers for several experts per layer, beside the o_proj + dense down_proj
component pair (60 modules) in the same run. Random weights and routed I/O: cost depends on shapes, not values.
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

from benchmarks.bench_ara import CANDIDATES, HIDDEN, LAYERS, _shape_tasks  # noqa: E402
from mtp_abliterate.search.candidate.ara import ModuleTask, edited_weight, module_seed, optimise_modules  # noqa: E402
from mtp_abliterate.search.candidate.quantize import quantize_rows  # noqa: E402

console = Console(width=120)
EXPERTS, TOP_K, MOE_FF = 128, 8, 704  # per layer: 128 routed experts, top-8, intermediate 704


def expert_tasks(device: str, per_layer: int, rows: int, gen: torch.Generator) -> list[ModuleTask]:
    """`per_layer` experts in each of the 30 layers, each with `rows` harmful and `rows` harmless routed rows."""
    tasks = []
    for layer in range(LAYERS):
        for expert in range(per_layer):
            w0 = (torch.randn(HIDDEN, MOE_FF, generator=gen) * MOE_FF**-0.5).to(torch.bfloat16).to(device)
            io = {
                "good_in": torch.randn(rows, MOE_FF, generator=gen).to(device),
                "bad_in": (torch.randn(rows, MOE_FF, generator=gen) + 0.5).to(device),
            }
            io["good_out"] = io["good_in"] @ w0.float().T
            io["bad_out"] = io["bad_in"] @ w0.float().T
            tasks.append(ModuleTask(w0, io, module_seed(0, layer, "experts.down_proj", expert), w0.float().norm(dim=1)))
    return tasks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, repeats: int, fn) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4, help="modules solved at once on a GPU (the config's)")
    parser.add_argument("--per-layer", default="1,8,32", help="comma-separated experts edited per layer")
    parser.add_argument("--prompts", type=int, default=400, help="harmful and harmless prompts each (heretic: 400)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = CANDIDATES["steer-mild"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    )
    # An expert sees the prompts routed to it: top-8 of 128 is 1/16 on average; the most-reached experts see more.
    rows = max(8, args.prompts * TOP_K // EXPERTS * 2)
    console.print(f"device: {name}; torch {torch.__version__}; rank {args.rank}; workers {args.workers}; {rows} rows")
    dense = _shape_tasks(args.device, args.prompts, gen)
    optimise_modules(dense[:2], params, args.rank, args.workers)  # once, untimed: context and kernel warm-up
    base = timed(args.device, args.repeats, lambda: optimise_modules(dense, params, args.rank, args.workers))
    table = Table(title=f"routed-experts ARA over {LAYERS} layers (2816 x 704 per expert), per trial")
    for col in ("component", "modules", "ARA s: median", "min", "max", "FP8 s: median", "vs o_proj+down_proj ARA"):
        table.add_column(col)
    dense_s = statistics.median(base)
    console.print(f"o_proj + dense down_proj: {len(dense)} modules, ARA {dense_s:.2f} s")
    table.add_row(
        "o_proj + dense down_proj",
        str(len(dense)),
        f"{dense_s:.2f}",
        f"{min(base):.2f}",
        f"{max(base):.2f}",
        "-",
        "1.00x",
    )
    for per_layer in (int(n) for n in args.per_layer.split(",")):
        tasks = expert_tasks(args.device, per_layer, rows, gen)
        ara, solved = [], []
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            solved = optimise_modules(tasks, params, args.rank, args.workers)
            _sync(args.device)
            ara.append(time.perf_counter() - t0)
        weights = [
            edited_weight(t.w0.float(), a, b, t.magnitude).to(torch.bfloat16)
            for t, (a, b, _) in zip(tasks, solved, strict=True)
        ]
        fp8 = timed(args.device, args.repeats, lambda weights=weights: [quantize_rows(w) for w in weights])
        m = statistics.median(ara)
        console.print(f"{per_layer} per layer: {len(tasks)} experts, ARA {m:.2f} s, FP8 {statistics.median(fp8):.3f} s")
        table.add_row(
            f"experts, {per_layer} per layer",
            str(len(tasks)),
            f"{m:.2f}",
            f"{min(ara):.2f}",
            f"{max(ara):.2f}",
            f"{statistics.median(fp8):.3f}",
            f"{m / dense_s:.2f}x",
        )
        del tasks, solved, weights
    console.print(table)


if __name__ == "__main__":
    main()
