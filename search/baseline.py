"""`mtp-abliterate baseline`: one model served without speculation and with MTP n = 1..N, measured in one run.

Per prompt set and n: output tok/s, speed-up over no speculation, per-position acceptance, mean accepted tokens per
draft with its 95 % CI, and tokens per target step implied by acceptance (1 + mean accepted), which is the speed-up
a memory-bound GPU approaches and is free of this machine's timing noise.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from heretic.utils import Prompt, load_prompts

from objectives.acceptance import AcceptanceSets
from search.checkpoint import locate, read_config
from search.config import PromptSet, StudyConfig
from search.heretic_bridge import LibrarySettings, prompt_spec
from search.quantize import quantize_fp8_dynamic
from search.serve import VllmServer


@dataclass
class BaselineRow:
    n: int  # 0 = no speculation
    prompt_set: str
    tok_s: float
    speedup: float
    per_position: list[float]
    mean_accepted_tokens: float
    ci95: float
    tokens_per_step: float
    num_drafts: int
    invalid_reason: str | None


def load_prompt_set(cfg: StudyConfig, ps: PromptSet) -> list[Prompt]:
    """heretic's loader (text file or dataset, split, column), with the study's system prompt."""
    settings = LibrarySettings(model=cfg.resolve(cfg.model.target), system_prompt=cfg.model.system_prompt)
    spec = prompt_spec(cfg.resolve(ps.source), ps.split).model_copy(update={"column": ps.column})
    return load_prompts(settings, spec)


def as_deployed(cfg: StudyConfig, model: str, out_dir: Path) -> str:
    """What to serve for `model` so it is compared as deployed: an unquantized checkpoint (a folder or a hub id in
    the offline cache) is quantized like every candidate into `out_dir/model-fp8`; a quantized one is served as is."""
    source = locate(model).path
    if cfg.quantization.scheme == "FP8_DYNAMIC" and "quantization_config" not in read_config(source):
        return str(quantize_fp8_dynamic(source, out_dir / "model-fp8", cfg.quantization.ignore).path)
    return model


def run_baseline(cfg: StudyConfig, model: str, n_values: list[int], out_dir: Path) -> list[BaselineRow]:
    sets = [(s.name, load_prompt_set(cfg, s.prompts), s.weight) for s in cfg.acceptance.sets]
    a = cfg.acceptance
    rows: list[BaselineRow] = []
    no_spec: dict[str, float] = {}
    for n in n_values:
        serving = cfg.serving.model_copy(update={"num_speculative_tokens": max(n, 1)})
        draft = cfg.resolve(cfg.model.draft) if n else None
        server = VllmServer(serving, model, draft, out_dir / f"server-n{n}.log", resolve=cfg.resolve, label=cfg.name)
        with server:
            objective = AcceptanceSets(
                server.base_url,
                server.served_name,
                sets,
                max(n, 1),
                a.max_tokens,
                a.temperature,
                a.seeds,
                a.concurrency,
            )
            for name, prompts, _ in sets:
                m = objective.measure_set(name, prompts)
                if n == 0:
                    no_spec[name] = m.tok_s
                rows.append(
                    BaselineRow(
                        n,
                        name,
                        m.tok_s,
                        m.tok_s / no_spec[name] if name in no_spec else float("nan"),
                        m.per_position if n else [],
                        m.mean_accepted_tokens if n else 0.0,
                        m.ci95 if n else 0.0,
                        1 + (m.mean_accepted_tokens if n else 0.0),
                        m.num_drafts,
                        m.invalid_reason if n else None,
                    )
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "baseline.json").write_text(json.dumps({"model": model, "rows": [asdict(r) for r in rows]}, indent=2))
    with (out_dir / "baseline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows({**asdict(r), "per_position": "/".join(f"{x:.4f}" for x in r.per_position)} for r in rows)
    return rows
