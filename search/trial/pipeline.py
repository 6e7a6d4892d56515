"""One trial: DESIGN §2's pipeline composed from the stages, with per-stage durations and failures named by stage.

abliterate (resident model) -> KL -> merge -> quantize (FP8_DYNAMIC) -> serve (candidate + the vanilla MTP draft)
-> acceptance (served) -> refusals (served; from the acceptance set of the same prompts when there is one, so the
same greedy answers are not generated twice) -> reset. The resident model is reset and the server released on every
exit path, Ctrl-C included. Knows nothing of Optuna or MLflow.

Fast path (issue #7): with an FP8 base (`search/fp8.py`) the merge stays in memory and "quantize" writes only the
edited matrices; with `SwapServing` "serve" is an in-place swap into the study's one server. `verify_swap` re-measures
the candidate on a cold server and compares answers and counters (the self-check a study runs before trusting
swaps; on a mismatch a second cold start measures the noise floor of a vLLM that is not batch-invariant, see
`swap_verdict`); the cold numbers are the trial's.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heretic.utils import Prompt

from mtp_abliterate.objectives.acceptance import AcceptanceSets
from mtp_abliterate.objectives.base import ObjectiveResult
from mtp_abliterate.objectives.refusal import RefusalRate, prefix_responder, served_responder
from mtp_abliterate.search.baseline import load_prompt_set
from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.fp8_base import base_key, prepare_base, write_candidate
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.serving.modes import ColdServing, Serving
from mtp_abliterate.search.serving.server import VllmServer
from mtp_abliterate.search.versions import software_versions

STAGES = ("abliterate", "kl", "merge", "quantize", "serve", "acceptance", "refusals", "verify")


SWAP_NOISE_FACTOR = 2.0  # a swap within twice the cold-vs-cold gap is noise, not a broken reload


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
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what swap and cold serving must agree on
    swap_check: dict[str, Any] | None = None  # the self-check's verdict, when this trial ran it
    serving: str = "cold"  # how the candidate was served: "swap" or "cold"

    def metrics(self) -> dict[str, float]:
        """Flat numbers for trackers: the objectives, per-position mix, per set, tok/s and stage durations."""
        out = {"refusal_rate": self.refusal_rate, "kld": self.kld, "mean_accepted_tokens": self.mean_accepted_tokens}
        out |= {f"acc_pos_{i}": a for i, a in enumerate(self.per_position)}
        for name, s in self.acceptance["sets"].items():
            out |= {f"{name}.acc_pos_{i}": a for i, a in enumerate(s["per_position"])}
            out |= {f"{name}.mean_accepted_tokens": s["mean_accepted_tokens"], f"{name}.ci95": s["ci95"]}
            out[f"{name}.num_drafts"] = s["num_drafts"]
        out["aggregate_tok_s"] = self.tok_s  # at acceptance.concurrency: what the search compares
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


def fp8_base(cfg: StudyConfig, resident: Resident, run_dir: Path) -> Path | None:
    """The study's vanilla FP8 base for incremental candidates (built once, reused on resume), or None when the
    config quantizes whole models."""
    q = cfg.quantization
    if q.scheme != "FP8_DYNAMIC" or not q.incremental:
        return None
    editable = [f"{name}.weight" for name in resident.abliterator.module_names.values()]
    versions = {k: v for k, v in software_versions().items() if k in ("torch", "llmcompressor", "compressed-tensors")}
    key = base_key(resident.model_id + resident.weights_digest(), q.ignore, editable, versions)
    return prepare_base(resident.local_dir(), run_dir / "fp8-base", q.ignore, editable, key)


@dataclass
class Measured:
    refusal: ObjectiveResult  # RefusalRate's
    acceptance: ObjectiveResult  # AcceptanceSets'

    def fingerprint(self) -> dict[str, Any]:
        """Greedy texts (digests) and every spec-decode counter: identical fingerprints, identical objectives."""
        sets = self.acceptance.details["sets"]
        return {
            "refusal_responses": self.refusal.details["responses_sha256"],
            **{
                f"{name}.{k}": s[k]
                for name, s in sets.items()
                for k in ("answers_sha256", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "per_position")
            },
        }


def objective_gap(a: Measured, b: Measured) -> float:
    """The largest difference between two measurements in what the search sees: the refusal rate and every
    per-position acceptance rate of every set."""
    sa, sb = a.acceptance.details["sets"], b.acceptance.details["sets"]
    gaps = [abs(a.refusal.value - b.refusal.value)]
    gaps += [abs(x - y) for name in sa for x, y in zip(sa[name]["per_position"], sb[name]["per_position"], strict=True)]
    return max(gaps)


def swap_verdict(swapped: Measured, cold: Measured, cold_again: Measured | None) -> dict[str, Any]:
    """Whether a swap can be trusted. Bit-identical to the cold start: yes. Otherwise a second cold start gives the
    noise floor: if the cold starts reproduce each other exactly, any difference is the swap's (fail); if they
    differ too (vLLM on GPUs is not batch-invariant: greedy tokens change with batch composition), the swap passes
    when its gap to the nearer cold start is within SWAP_NOISE_FACTOR x the cold-vs-cold gap."""
    a, b = swapped.fingerprint(), cold.fingerprint()
    differences = sorted(k for k in a if a[k] != b[k])
    if not differences:
        return {"passed": True, "identical": True, "differences": [], "rule": "bit-identical to a cold start"}
    if cold_again is None:
        raise ValueError("swapped and cold measurements differ: the verdict needs a second cold measurement")
    noise = objective_gap(cold, cold_again)
    gap = min(objective_gap(swapped, cold), objective_gap(swapped, cold_again))
    verdict = {"identical": False, "differences": differences, "gap": gap, "noise": noise}
    if cold.fingerprint() == cold_again.fingerprint():
        return {**verdict, "passed": False, "rule": "cold starts reproduce each other exactly; the swap does not"}
    passed = gap <= SWAP_NOISE_FACTOR * noise
    rule = f"gap {gap:.4f} {'<=' if passed else '>'} {SWAP_NOISE_FACTOR:g} x cold-vs-cold noise {noise:.4f}"
    return {**verdict, "passed": passed, "rule": rule}


class TrialPipeline:
    """Scores candidates against the resident model; one instance per study process.

    `base`: the FP8 base for incremental candidates (None: quantize whole merged checkpoints). `serving`: how a
    candidate gets its server (default: a cold start each)."""

    def __init__(
        self, cfg: StudyConfig, resident: Resident, base: Path | None = None, serving: Serving | None = None
    ) -> None:
        self.cfg = cfg
        self.resident = resident
        self.base = base
        self.serving: Serving = serving or ColdServing(cfg)
        self.sets = [(s.name, load_prompt_set(cfg, s.prompts), s.weight) for s in cfg.acceptance.sets]
        self.harmful: list[Prompt] = load_prompt_set(cfg, cfg.prompts.harmful_eval)
        self.shared_set = self._shared_set()

    def _shared_set(self) -> str | None:
        """The acceptance set whose greedy answers also serve the refusal stage: the same prompts, answered greedily
        with at least `max_response_length` tokens (each refusal response is its answer's first tokens)."""
        a, ab = self.cfg.acceptance, self.cfg.abliteration
        if a.temperature != 0 or a.max_tokens < ab.max_response_length:
            return None
        return next((name for name, prompts, _ in self.sets if prompts == self.harmful), None)

    def _decode(self, token_ids: list[int]) -> str:
        return self.resident.model.tokenizer.decode(token_ids, skip_special_tokens=True)

    def run(
        self,
        params: AraParameters | DirectionalParameters | None,
        trial_dir: Path,
        on_stage: Callable[[str], None] = lambda stage: None,
        on_server: Callable[[int], None] = lambda pid: None,
        keep_candidate: bool = False,
        verify_swap: bool = False,
    ) -> TrialResult:
        """Score `params` (None = the vanilla model). The served checkpoint stays in `trial_dir/candidate` if
        `keep_candidate` and the trial succeeds. `verify_swap`: also measure on a cold server and compare (see the
        module doc). Raises StageError, DiskFullError or KeyboardInterrupt."""
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
        log_path = self.serving.log_path_for(trial_dir / "server.log")
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
                if self.base is None:  # a whole BF16 checkpoint, for llm-compressor or to serve as is
                    merged = abliterator.save_merged(trial_dir / "bf16", self.resident.local_dir(), weights)
            with stage("quantize"):
                if self.base is not None:
                    write_candidate(self.base, candidate, weights)
                elif self.cfg.quantization.scheme == "FP8_DYNAMIC":
                    quantize_fp8_dynamic(merged, candidate, self.cfg.quantization.ignore)
                    shutil.rmtree(merged)
                else:
                    merged.rename(candidate)
            # On the self-check trial an invalid swapped measurement is not the candidate's fault yet: the cold
            # start decides (a broken reload yields garbage answers).
            measured = self._serve_and_measure(candidate, log_path, stage, on_server, tolerate_invalid=verify_swap)
            swap_check = None
            if verify_swap:
                with stage("verify"):
                    swap_check, measured = self._verify(candidate, trial_dir, measured)
            kept = keep_candidate
        finally:
            abliterator.reset()
            shutil.rmtree(trial_dir / "bf16", ignore_errors=True)
            if not kept:  # failed or not wanted: a whole FP8 candidate of the real target is ~27 GB
                shutil.rmtree(trial_dir / "candidate", ignore_errors=True)
        refusal, acc = measured.refusal, measured.acceptance
        total = sum(w for _, _, w in self.sets)
        sets = acc.details["sets"]
        positions = len(next(iter(sets.values()))["per_position"])
        mix = [sum(w * sets[n]["per_position"][i] for (n, _, w) in self.sets) / total for i in range(positions)]
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
            fingerprint=measured.fingerprint(),
            swap_check=swap_check,
            serving="cold" if swap_check and not swap_check["passed"] else self.serving.name,
        )

    def _serve_and_measure(
        self,
        candidate: Path,
        log_path: Path,
        stage: Callable[[str], AbstractContextManager],
        on_server: Callable[[int], None],
        serving: Serving | None = None,
        tolerate_invalid: bool = False,
    ) -> Measured:
        """Serve `candidate` (through `serving`, default the pipeline's) and run the served objectives. An invalid
        acceptance measurement raises StageError unless `tolerate_invalid` (its value is then NaN)."""
        serving = serving or self.serving
        server: VllmServer | None = None
        failed = True
        try:
            with stage("serve"):
                server = serving.open(candidate, log_path)
                on_server(server.process.pid)
            with stage("acceptance"):
                acceptance = self._acceptance(server)
                acc = acceptance.compute()
                if math.isnan(acc.value) and not tolerate_invalid:
                    raise StageError("acceptance", f"invalid measurement: {acc.details['invalid_reason']}", log_path)
            with stage("refusals"):
                replies = acceptance.replies.get(self.shared_set or "")
                if replies and all(r.token_ids is not None for r in replies):
                    responder = prefix_responder(replies, self._decode, self.cfg.abliteration.max_response_length)
                else:
                    responder = served_responder(
                        server.base_url,
                        server.served_name,
                        self.cfg.abliteration.max_response_length,
                        self.cfg.acceptance.concurrency,
                    )
                refusal = RefusalRate(responder, self.harmful).compute()
            failed = False
        finally:
            if server is not None:
                serving.release(server, failed)
        return Measured(refusal, acc)

    def _verify(self, candidate: Path, trial_dir: Path, swapped: Measured) -> tuple[dict[str, Any], Measured]:
        """The swap self-check: the same candidate on a cold server (the swap server is stopped first: both would
        not fit a real target's memory), and when the two differ, on a second cold server: the noise floor of a
        vLLM that is not batch-invariant (GPUs). Returns the verdict (`swap_verdict`) and the cold measurement."""
        self.serving.close()
        cold = self._cold_measurement(candidate, trial_dir / "verify-server.log")
        again = None
        if swapped.fingerprint() != cold.fingerprint():
            again = self._cold_measurement(candidate, trial_dir / "verify-server-2.log")
        return swap_verdict(swapped, cold, again), cold

    def _cold_measurement(self, candidate: Path, log_path: Path) -> Measured:
        try:
            return self._serve_and_measure(
                candidate,
                log_path,
                lambda name: nullcontext(),  # the whole check is timed as one stage
                lambda pid: None,
                ColdServing(self.cfg),
            )
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageError("verify", f"a cold-start server of the swap self-check: {e}", log_path) from e

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
            keep_replies=[self.shared_set] if self.shared_set else [],
        )
