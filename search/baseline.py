"""`mtp-abliterate baseline`: one model served without speculation and with MTP n = 1..N, measured in one run.

Per prompt set and n: output tok/s single-stream (one request at a time over the set's first SINGLE_STREAM_PROMPTS
prompts: what public figures for this model quote, e.g. ~108 tok/s vanilla n=4 on a DGX Spark) and aggregate
(acceptance.concurrency requests in flight), each with its speed-up over no speculation; per-position acceptance,
mean accepted tokens per draft with its 95 % CI (from the aggregate run over every prompt), and tokens per target
step implied by acceptance (1 + mean accepted), the speed-up a memory-bound GPU approaches.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mtp_abliterate.objectives.acceptance import AcceptanceSets
from mtp_abliterate.search.candidate.checkpoint import locate, read_config
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic
from mtp_abliterate.search.config import Quantization, StudyConfig
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.serving.server import VllmServer
from mtp_abliterate.search.study.storage import run_dir_of

# Single-stream tok/s settles within a few requests; one request at a time over a whole set would double a
# baseline's time for no extra information. Acceptance comes from the aggregate run over every prompt.
SINGLE_STREAM_PROMPTS = 16


@dataclass
class BaselineRow:
    n: int  # 0 = no speculation
    prompt_set: str
    single_stream_tok_s: float  # concurrency 1
    single_stream_speedup: float  # over no speculation, single-stream
    aggregate_tok_s: float  # acceptance.concurrency requests in flight
    aggregate_speedup: float
    concurrency: int  # of the aggregate figures
    per_position: list[float]
    accepted_per_step: float  # speed-true: emitted tokens per verify step - 1
    ci95: float
    vllm_mean_accepted_tokens: float  # vLLM's /metrics figure (proposals past an answer's stop counted)
    tokens_per_step: float
    num_drafts: int
    invalid_reason: str | None


def as_deployed(quantization: Quantization, model: str, out_dir: Path) -> str:
    """What to serve for `model` so it is compared as deployed: an unquantized checkpoint (a folder or a hub id in
    the offline cache) is quantized like every candidate into `out_dir/model-fp8`; a quantized one is served as is."""
    source = locate(model).path
    if quantization.scheme == "FP8_DYNAMIC" and "quantization_config" not in read_config(source):
        return str(quantize_fp8_dynamic(source, out_dir / "model-fp8", quantization.ignore).path)
    return model


def baseline_dir(cfg: StudyConfig, label: str) -> Path:
    return run_dir_of(cfg) / "baseline" / label


def baseline_server(cfg: StudyConfig, model: str, n: int, out_dir: Path) -> VllmServer:
    """The server of one row group: `model` without speculation (n = 0) or with the draft at n."""
    serving = cfg.serving.model_copy(update={"num_speculative_tokens": max(n, 1)})
    draft = cfg.model.draft if n else None
    return VllmServer(serving, model, draft, out_dir / f"server-n{n}.log", label=cfg.name)


def run_baseline(cfg: StudyConfig, model: str, n_values: list[int], out_dir: Path) -> list[BaselineRow]:
    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    a = cfg.acceptance
    rows: list[BaselineRow] = []
    no_spec: dict[tuple[str, int], float] = {}  # (set, concurrency) -> tok/s without speculation
    for n in n_values:
        with baseline_server(cfg, model, n, out_dir) as server:
            single_stream, aggregate = (
                AcceptanceSets(
                    server.base_url,
                    server.served_name,
                    sets,
                    max(n, 1),
                    a.max_tokens,
                    a.temperature,
                    a.seeds,
                    concurrency,
                    timeout=cfg.serving.request_timeout_s,
                )
                for concurrency in (1, a.concurrency)
            )
            for name, prompts, _ in sets:
                single = single_stream.measure_set(name, prompts[:SINGLE_STREAM_PROMPTS])
                m = aggregate.measure_set(name, prompts)
                if n == 0:
                    no_spec[(name, 1)], no_spec[(name, a.concurrency)] = single.tok_s, m.tok_s
                rows.append(
                    BaselineRow(
                        n,
                        name,
                        single.tok_s,
                        single.tok_s / no_spec.get((name, 1), float("nan")),
                        m.tok_s,
                        m.tok_s / no_spec.get((name, a.concurrency), float("nan")),
                        a.concurrency,
                        m.per_position if n else [],
                        m.accepted_per_step if n else 0.0,
                        m.ci95 if n else 0.0,
                        m.vllm_mean_accepted_tokens if n else 0.0,
                        1 + (m.accepted_per_step if n else 0.0),
                        m.num_drafts,
                        m.invalid_reason if n else None,
                    )
                )
    save_rows(rows, model, out_dir)
    return rows


def save_rows(rows: list[BaselineRow], model: str, out_dir: Path) -> None:
    """baseline.json and baseline.csv in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "baseline.json").write_text(json.dumps({"model": model, "rows": [asdict(r) for r in rows]}, indent=2))
    with (out_dir / "baseline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows({**asdict(r), "per_position": "/".join(f"{x:.4f}" for x in r.per_position)} for r in rows)
