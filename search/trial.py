"""One trial: DESIGN §2's pipeline composed from the stages, with per-stage durations and failures named by stage.

abliterate (resident model) -> KL -> merge (BF16 checkpoint) -> quantize (FP8_DYNAMIC) -> serve (candidate + the
vanilla MTP draft) -> refusals (served) -> acceptance (served) -> reset. The resident model is reset and the server
stopped on every exit path, Ctrl-C included. Knows nothing of Optuna or MLflow.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heretic.utils import Prompt

from objectives.acceptance import AcceptanceSets
from objectives.refusal import RefusalRate, served_responder
from search.abliterate import DirectionalParameters
from search.ara import AraParameters
from search.baseline import load_prompt_set
from search.config import StudyConfig
from search.quantize import quantize_fp8_dynamic
from search.resident import Resident
from search.serve import VllmServer

STAGES = ("abliterate", "kl", "merge", "quantize", "serve", "refusals", "acceptance")


class StageError(RuntimeError):
    """A stage failed for this candidate; the study records it and goes on."""

    def __init__(self, stage: str, reason: str, log_path: Path | None = None) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.log_path = stage, reason, log_path


class DiskFullError(RuntimeError):
    """No space left under the study's folder: the study must stop, not fail trial after trial."""


@dataclass
class TrialResult:
    refusal_rate: float
    kld: float
    acceptance: dict[str, Any]  # AcceptanceSets details: per set per-position rates, CI, tok/s, samples
    mean_accepted_tokens: float  # the configured mix over the acceptance sets
    per_position: list[float]  # the same mix, per position
    tok_s: float
    durations: dict[str, float] = field(default_factory=dict)
    adapter_digest: str = ""
    merged_digest: str = ""  # sha256 of the edited matrices as deployed (BF16), for re-materialisation
    candidate: Path | None = None  # the served checkpoint, when kept
    refusal_samples: list[dict[str, Any]] = field(default_factory=list)
    log_path: Path | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numbers for trackers: the objectives, per-position mix, per set, tok/s and stage durations."""
        out = {"refusal_rate": self.refusal_rate, "kld": self.kld, "mean_accepted_tokens": self.mean_accepted_tokens}
        out |= {f"acc_pos_{i}": a for i, a in enumerate(self.per_position)}
        for name, s in self.acceptance["sets"].items():
            out |= {f"{name}.acc_pos_{i}": a for i, a in enumerate(s["per_position"])}
            out |= {f"{name}.mean_accepted_tokens": s["mean_accepted_tokens"], f"{name}.ci95": s["ci95"]}
            out[f"{name}.num_drafts"] = s["num_drafts"]
        out["tok_s"] = self.tok_s
        out |= {f"stage_{k}_s": v for k, v in self.durations.items()}
        out["trial_s"] = sum(self.durations.values())
        return out


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (tqdm bars, loguru, warnings, C libraries) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class TrialPipeline:
    """Scores candidates against the resident model; one instance per study process."""

    def __init__(self, cfg: StudyConfig, resident: Resident) -> None:
        self.cfg = cfg
        self.resident = resident
        self.sets = [(s.name, load_prompt_set(cfg, s.prompts), s.weight) for s in cfg.acceptance.sets]
        self.harmful: list[Prompt] = load_prompt_set(cfg, cfg.prompts.harmful_eval)

    def run(
        self,
        params: AraParameters | DirectionalParameters | None,
        trial_dir: Path,
        on_stage: Callable[[str], None] = lambda stage: None,
        on_server: Callable[[int], None] = lambda pid: None,
        keep_candidate: bool = False,
    ) -> TrialResult:
        """Score `params` (None = the vanilla model). The served checkpoint stays in `trial_dir/candidate` if
        `keep_candidate` and the trial succeeds. Raises StageError, DiskFullError or KeyboardInterrupt."""
        durations: dict[str, float] = {}

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            on_stage(name)
            t0 = time.perf_counter()
            try:
                with stderr_to(trial_dir / "stages.log"):  # library progress bars and logs, kept out of the display
                    yield
            except (StageError, KeyboardInterrupt):
                raise
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(
                        f"no space left on the disk of {trial_dir} during {name}; free space or move runs_dir"
                    ) from e
                raise StageError(name, f"{type(e).__name__}: {e}", log_path) from e
            except Exception as e:  # a candidate's failure, whatever the library raised
                raise StageError(name, f"{type(e).__name__}: {e}", log_path) from e
            finally:
                durations[name] = time.perf_counter() - t0

        trial_dir.mkdir(parents=True, exist_ok=True)
        log_path = trial_dir / "server.log"
        abliterator = self.resident.abliterator
        kept = False
        try:
            with stage("abliterate"):
                if params is None:
                    abliterator.reset()
                else:
                    self.resident.apply(params)
                digest = abliterator.adapter_digest()
            with stage("kl"):
                kld = self.resident.kld.compute().value
            candidate = trial_dir / "candidate"
            with stage("merge"):
                weights = abliterator.merged_weights()
                merged_digest = abliterator.merged_digest(weights)
                merged = abliterator.save_merged(trial_dir / "bf16", self.cfg.resolve(self.cfg.model.target), weights)
            with stage("quantize"):
                if self.cfg.quantization.scheme == "FP8_DYNAMIC":
                    quantize_fp8_dynamic(merged, candidate, self.cfg.quantization.ignore)
                    shutil.rmtree(merged)
                else:
                    merged.rename(candidate)
            model = candidate
            server = VllmServer(
                self.cfg.serving, str(model), self.cfg.resolve(self.cfg.model.draft), log_path, resolve=self.cfg.resolve
            )
            try:
                with stage("serve"):
                    server.start()
                    on_server(server.process.pid)
                with stage("refusals"):
                    responder = served_responder(
                        server.base_url,
                        server.served_name,
                        self.cfg.abliteration.max_response_length,
                        self.cfg.acceptance.concurrency,
                    )
                    refusal = RefusalRate(responder, self.harmful).compute()
                with stage("acceptance"):
                    acc = self._acceptance(server).compute()
                    if math.isnan(acc.value):
                        raise StageError(
                            "acceptance", f"invalid measurement: {acc.details['invalid_reason']}", log_path
                        )
            finally:
                server.stop()
            kept = keep_candidate
        finally:
            abliterator.reset()
            shutil.rmtree(trial_dir / "bf16", ignore_errors=True)
            if not kept:  # failed or not wanted: an FP8 candidate of the real target is ~27 GB
                shutil.rmtree(trial_dir / "candidate", ignore_errors=True)
        weights = [w for _, _, w in self.sets]
        sets = acc.details["sets"]
        positions = len(next(iter(sets.values()))["per_position"])
        mix = [sum(w * sets[n]["per_position"][i] for (n, _, w) in self.sets) / sum(weights) for i in range(positions)]
        tokens = sum(s["output_tokens"] for s in sets.values())
        seconds = sum(s["seconds"] for s in sets.values())
        return TrialResult(
            refusal_rate=refusal.value,
            kld=kld,
            acceptance=acc.details,
            mean_accepted_tokens=acc.value,
            per_position=mix,
            tok_s=tokens / seconds if seconds else 0.0,
            durations=durations,
            adapter_digest=digest,
            merged_digest=merged_digest,
            candidate=candidate if keep_candidate else None,
            refusal_samples=refusal.details["samples"],
            log_path=log_path,
        )

    def _acceptance(self, server: VllmServer) -> AcceptanceSets:
        a = self.cfg.acceptance
        return AcceptanceSets(
            server.base_url,
            server.served_name,
            self.sets,
            self.cfg.serving.num_speculative_tokens,
            a.max_tokens,
            a.temperature,
            a.seeds,
            a.concurrency,
        )
