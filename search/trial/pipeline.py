"""One trial: the stages composed, with per-stage durations and failures named by stage.

abliterate (resident model) -> kld -> merge -> quantize (FP8_DYNAMIC) -> serve (candidate + the vanilla MTP draft)
-> acceptance (served) -> refusals (served; from the acceptance set of the same prompts when there is one, so the
same greedy answers are not generated twice) [-> swap_check] -> reset. The resident model is reset and the server
released on every exit path, Ctrl-C included. Knows nothing of Optuna or MLflow; docs/architecture.md has each
stage's contract.

Fast path: with an FP8 base (`search/candidate/fp8_base.py`) the merge stays in memory and "quantize" writes only the
edited matrices; with `SwapServing` "serve" is an in-place swap into the study's one server. `swap_check` re-measures
the candidate on a cold server and compares answers and counters (`search/trial/swap_check.py`); the cold numbers are
the trial's.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from heretic.utils import Prompt

from mtp_abliterate.objectives.acceptance import AcceptanceSets, Estimate, degenerate
from mtp_abliterate.objectives.base import ObjectiveResult
from mtp_abliterate.objectives.paired import PerPrompt, paired
from mtp_abliterate.objectives.refusal import RefusalRate, Responder, prefix_responder
from mtp_abliterate.objectives.registry import BUILT_INS, objective_specs
from mtp_abliterate.objectives.served import Reply, answer_all
from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.fp8_base import base_key, prepare_base, write_candidate
from mtp_abliterate.search.candidate.quantize import quantize_fp8_dynamic
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.disk import DiskFullError
from mtp_abliterate.search.hosts import host_id
from mtp_abliterate.search.prompts import load_prompt_set
from mtp_abliterate.search.serving.modes import ColdServing, ServingMode
from mtp_abliterate.search.serving.server import VllmServer
from mtp_abliterate.search.trial.result import TrialResult, acceptance_mix, aggregate_tok_s
from mtp_abliterate.search.trial.swap_check import Measured, swap_verdict
from mtp_abliterate.search.versions import software_versions

STAGES = ("abliterate", "kld", "merge", "quantize", "serve", "acceptance", "refusals", "swap_check")


class StageError(RuntimeError):
    """A stage failed for this candidate; the study records it and goes on."""

    def __init__(self, stage: str, reason: str, log_path: Path | None = None) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.log_path = stage, reason, log_path


class ServerLost(StageError):
    """vLLM died or hung while it served a candidate (not the candidate's fault as far as anyone can tell): the
    pipeline replaces the server and measures once more; a second loss fails the trial with this reason."""


def _timed_out(e: BaseException) -> bool:
    """Whether a request timeout (serving.request_timeout_s) is anywhere in `e`'s chain of causes."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, httpx.TimeoutException):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


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


def fp8_base(
    cfg: StudyConfig, resident: Resident, run_dir: Path, say: Callable[[str], None] = lambda line: None
) -> Path | None:
    """The study's vanilla FP8 base for incremental candidates (built once, reused on resume when every file matches
    its recorded sha256; `say` gets the line naming a corrupted one), or None when the config quantizes whole
    models."""
    q = cfg.quantization
    if q.scheme != "FP8_DYNAMIC" or not q.incremental:
        return None
    editable = [f"{name}.weight" for name in resident.abliterator.module_names.values()]
    if cfg.abliteration.experts:
        editable += resident.abliterator.experts.editable()
    versions = {k: v for k, v in software_versions().items() if k in ("torch", "llmcompressor", "compressed-tensors")}
    key = base_key(resident.model_id + resident.weights_digest(), q.ignore, editable, versions, host_id())
    return prepare_base(resident.local_dir(), run_dir / "fp8-base", q.ignore, editable, key, say)


class Stages:
    """Runs a trial's stages: announces each, times it, sends library output to `stages.log`, and turns a failure
    into StageError (DiskFullError for a full disk; KeyboardInterrupt passes through)."""

    def __init__(self, trial_dir: Path, log_path: Path, on_stage: Callable[[str], None]) -> None:
        self.trial_dir, self.log_path, self.on_stage = trial_dir, log_path, on_stage
        self.durations: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.on_stage(name)
        t0 = time.perf_counter()
        try:
            with stderr_to(self.trial_dir / "stages.log"):  # library progress bars and logs, out of the display
                yield
        except (StageError, KeyboardInterrupt):
            raise
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"no space left on the disk of {self.trial_dir} during {name}; free space or move runs_dir"
                ) from e
            raise StageError(name, f"{type(e).__name__}: {e}", self.log_path) from e
        except Exception as e:  # a candidate's failure, whatever the library raised
            raise StageError(name, f"{type(e).__name__}: {e}", self.log_path) from e
        finally:
            self.durations[name] = time.perf_counter() - t0


@dataclass
class Candidate:
    """The edited model as the stages before serving leave it."""

    kld: float
    adapter_digest: str
    merged_digest: str
    path: Path  # the checkpoint to serve


def _texts(replies: Sequence[Reply]) -> Responder:
    """The refusal stage's responder for answers already served, in the harmful prompts' order."""
    return lambda prompts: [r.text for r in replies]


def _screened(acc: ObjectiveResult, refusal_answers: Sequence[Reply]) -> ObjectiveResult:
    """Adaptive measurement may stop before a set's end; its validity also covers the refusal answers (every
    harmful prompt, at refusal length): a degenerate one makes it invalid, as a full measurement would be."""
    bad = [r.text for r in refusal_answers if degenerate(r.text)]
    if not bad:
        return acc
    reason = f"refusals: {len(bad)} degenerate answer(s), e.g. {bad[0][:60]!r}"
    prior = acc.details["invalid_reason"]
    return ObjectiveResult(acc.value, {**acc.details, "invalid_reason": f"{prior}; {reason}" if prior else reason})


FrontPoint = tuple[Sequence[float], Mapping[str, PerPrompt]]  # (refusal, KL, acceptance, ...) and per-prompt counts


class Decisions:
    """What a trial's decision needs, from the study's constraints and its feasible Pareto front (values and
    per-prompt counts): a candidate over `max_kl` is not served; with adaptive measurement (refusals first) one over
    `max_refusal_rate` is not measured for acceptance; and acceptance stops once the paired difference to a front
    point at least as good on refusal and KL is below zero beyond its 95 % interval (`objectives/paired.py`).
    Such a candidate is infeasible or dominated whatever the values it was not measured for; the skipped values are
    recorded as not measured (the study gives Optuna the worst values for them). Validity (degenerate answers) is
    judged on the answers served: every harmful prompt's, and the acceptance prompts served before a stop."""

    def __init__(self, cfg: StudyConfig, front: Sequence[FrontPoint], kld: float) -> None:
        self.constraints, self.kld = cfg.search.constraints, kld
        self.front = [(tuple(v), counts) for v, counts in front]
        self.weights = {s.name: s.weight for s in cfg.acceptance.sets}
        self.position = cfg.search.acceptance_position

    def out_before_serving(self) -> str | None:
        limit = self.constraints.max_kl
        if limit is not None and self.kld > limit:
            return f"KL {self.kld:.4g} > max_kl {limit:g}: infeasible, not served"
        return None

    def out_after_refusals(self, refusal: float) -> str | None:
        limit = self.constraints.max_refusal_rate
        if limit is not None and refusal > limit:
            return f"refusal rate {refusal:.3f} > max_refusal_rate {limit:g}: infeasible, acceptance not measured"
        return None

    def stop_rule(self, refusal: float) -> Callable[[Estimate], str | None]:
        """Stop when a front point is at least as good on refusal and KL and better on acceptance beyond the paired
        interval, on the prompts served so far."""

        def cannot_reach(estimate: Estimate) -> str | None:
            mine = {name: m.per_prompt for name, m in estimate.sets.items()}
            for (r, k, *_), theirs in self.front:
                if r <= refusal and k <= self.kld and set(theirs) >= set(self.weights):
                    difference = paired(mine, theirs, self.weights, self.position)
                    if difference.upper < 0:
                        return (
                            f"cannot reach the front: {difference} against a front point with refusal {r:.3f} and "
                            f"KL {k:.4g}"
                        )
            return None

        return cannot_reach


class TrialPipeline:
    """Scores candidates against the resident model; one instance per study process.

    `base`: the FP8 base for incremental candidates (None: quantize whole merged checkpoints). `serving`: how a
    candidate gets its server (default: a cold start each)."""

    def __init__(
        self, cfg: StudyConfig, resident: Resident, base: Path | None = None, serving: ServingMode | None = None
    ) -> None:
        self.cfg = cfg
        self.resident = resident
        self.base = base
        self.serving: ServingMode = serving or self._cold_serving()
        self.sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
        self.harmful: list[Prompt] = load_prompt_set(cfg.model, cfg.prompts.harmful_eval)
        self.shared_set = self._shared_set()
        a = cfg.acceptance
        same_length = a.max_tokens == cfg.abliteration.max_response_length and len(a.seeds) == 1
        self.answered_set = self.shared_set if same_length else None  # adaptive: refusal answers = its answers
        self.extra = objective_specs(cfg)[BUILT_INS:]  # measured from the result, once the stages have run

    def _shared_set(self) -> str | None:
        """The acceptance set whose greedy answers also serve the refusal stage: the same prompts, answered greedily
        with at least `max_response_length` tokens (each refusal response is its answer's first tokens)."""
        a, ab = self.cfg.acceptance, self.cfg.abliteration
        if a.temperature != 0 or a.max_tokens < ab.max_response_length:
            return None
        return next((name for name, prompts, _ in self.sets if prompts == self.harmful), None)

    def _decode(self, token_ids: list[int]) -> str:
        return self.resident.model.tokenizer.decode(token_ids, skip_special_tokens=True)

    def use_cold_starts(self) -> None:
        """From now on a cold start per candidate (the swap self-check failed): the study server is stopped."""
        self.serving.close()
        self.serving = self._cold_serving()

    def _cold_serving(self) -> ColdServing:
        return ColdServing(self.cfg.serving, self.cfg.model.draft, self.cfg.name)

    def run(
        self,
        params: AraParameters | DirectionalParameters | None,
        trial_dir: Path,
        on_stage: Callable[[str], None] = lambda stage: None,
        on_server: Callable[[int], None] = lambda pid: None,
        keep_candidate: bool = False,
        swap_check: bool = False,
        front: Sequence[FrontPoint] | None = None,
    ) -> TrialResult:
        """Score `params` (None = the vanilla model, always measured in full). The served checkpoint stays in
        `trial_dir/candidate` if `keep_candidate` and the trial succeeds. `swap_check`: also measure on a cold server
        and compare (see the module doc). `front`: the study's feasible Pareto front as (refusal, KL, acceptance
        scalar, extra objectives) values with their per-prompt counts; given, the trial measures only what its
        decision needs (`Decisions`). Raises StageError, DiskFullError or KeyboardInterrupt."""
        trial_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.serving.log_path_for(trial_dir / "server.log")
        stage = Stages(trial_dir, log_path, on_stage)
        kept, measured, verdict = False, None, None
        try:
            candidate = self._build(params, trial_dir, stage)
            decide = front is not None and params is not None and not swap_check  # the self-check measures in full
            decisions = Decisions(self.cfg, front, candidate.kld) if decide else None
            if decisions is None or not (out := decisions.out_before_serving()):
                # The vanilla model validates the harness: its measurement must be valid. A candidate's invalid
                # measurement (degenerate answers, nothing accepted) is a result, recorded with its reason.
                measure = partial(
                    self._serve_and_measure,
                    candidate.path,
                    log_path,
                    stage,
                    on_server,
                    require_valid=params is None,
                    decisions=decisions,
                )
                try:
                    measured = measure()
                except ServerLost as lost:  # vLLM died or hung: a fresh server measures the candidate again, once
                    note = f"{lost.reason}; a fresh server measures the candidate again"
                    for log in {trial_dir / "stages.log", log_path}:
                        with log.open("a") as f:
                            f.write(f"# mtp-abliterate: {note}\n")
                    if not swap_check:
                        measured = measure()
                    else:  # the study's first swap took its server down: that is the self-check's verdict
                        with stage("swap_check"):
                            verdict, measured = self._swap_lost(candidate.path, trial_dir, lost)
                if swap_check and verdict is None:
                    with stage("swap_check"):
                        verdict, measured = self._swap_check(candidate.path, trial_dir, measured)
                kept = keep_candidate
            else:
                measured = Measured(None, None, out)  # KL alone decides: not served
        finally:
            self.resident.abliterator.reset()
            shutil.rmtree(trial_dir / "bf16", ignore_errors=True)
            if not kept:  # failed or not wanted: a whole FP8 candidate of the real target is ~27 GB
                shutil.rmtree(trial_dir / "candidate", ignore_errors=True)
        return self._result(candidate, measured, stage.durations, log_path, verdict, kept)

    def _build(self, params: AraParameters | DirectionalParameters | None, trial_dir: Path, stage: Stages) -> Candidate:
        """abliterate -> kld -> merge -> quantize: the candidate checkpoint in `trial_dir/candidate`."""
        abliterator = self.resident.abliterator
        with stage("abliterate"):
            if params is None:
                abliterator.reset()
            else:
                self.resident.apply(params)
            digest = abliterator.adapter_digest()
        with stage("kld"):
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
        return Candidate(kld, digest, merged_digest, candidate)

    def _result(
        self,
        candidate: Candidate,
        measured: Measured,
        durations: dict[str, float],
        log_path: Path,
        verdict: dict[str, Any] | None,
        kept: bool,
    ) -> TrialResult:
        acc, refusal = measured.acceptance, measured.refusal
        sets = acc.details["sets"] if acc else {}
        result = TrialResult(
            refusal_rate=refusal.value if refusal else None,
            kld=candidate.kld,
            acceptance=acc.details if acc else {"sets": {}},
            accepted_per_step=acc.value if acc else None,
            per_position=acceptance_mix(sets, [(n, w) for n, _, w in self.sets]) if acc else [],
            tok_s=aggregate_tok_s(acc.details) if acc else 0.0,
            durations=durations,
            adapter_digest=candidate.adapter_digest,
            merged_digest=candidate.merged_digest,
            candidate=candidate.path if kept else None,
            refusal_samples=refusal.details["samples"] if refusal else [],
            log_path=log_path,
            fingerprint=measured.fingerprint(),
            swap_check=verdict,
            serving_mode="cold" if verdict and not verdict["passed"] else self.serving.name,
            invalid_reason=acc.details["invalid_reason"] if acc else None,
            not_measured=measured.not_measured,
            generated_tokens=measured.tokens,
        )
        result.extra = {o.name: v for o in self.extra if (v := o.measure(result)) is not None}
        return result

    def _serve_and_measure(
        self,
        candidate: Path,
        log_path: Path,
        stage: Callable[[str], AbstractContextManager],
        on_server: Callable[[int], None],
        serving: ServingMode | None = None,
        require_valid: bool = False,
        decisions: Decisions | None = None,
    ) -> Measured:
        """Serve `candidate` (through `serving`, default the pipeline's) and run the served objectives. With
        `require_valid` (the vanilla model), every prompt is served and an invalid acceptance measurement raises
        StageError. Adaptive measurement asks for the refusals first: they can make acceptance unnecessary
        (`decisions`) and they bound what acceptance can change."""
        serving = serving or self.serving
        adaptive = self.cfg.acceptance.target_halfwidth > 0 and not require_valid
        server: VllmServer | None = None
        failed = True
        try:
            with stage("serve"):
                server = serving.open(candidate, log_path)
                on_server(server.process.pid)
            acc, refusal, not_measured, answered, tokens = None, None, None, {}, 0
            if adaptive:
                with stage("refusals"):
                    harmful = self._answer_harmful(server)
                    refusal = RefusalRate(_texts(harmful), self.harmful).compute()
                tokens += sum(r.completion_tokens for r in harmful)
                if self.answered_set:  # the same greedy answers at the same length: that set is measured already
                    answered = {self.answered_set: harmful}
                not_measured = decisions.out_after_refusals(refusal.value) if decisions else None
            if not not_measured:
                with stage("acceptance"):
                    acceptance = self._acceptance(server, adaptive)
                    stop = decisions.stop_rule(refusal.value) if decisions and refusal else lambda e: None
                    acc = acceptance.compute(stop, answered)
                    if require_valid and acc.details["invalid_reason"]:
                        raise StageError(
                            "acceptance", f"invalid measurement: {acc.details['invalid_reason']}", log_path
                        )
                tokens += acc.details["output_tokens"]
                if adaptive and not answered:
                    acc = _screened(acc, harmful)
            if refusal is None:
                with stage("refusals"):
                    refusal, served = self._refusals_after(server, acceptance)
                tokens += served
            failed = False
        except StageError as e:
            if server is not None and (lost := self._lost(server, e)):
                raise ServerLost(e.stage, lost, e.log_path) from e
            raise
        finally:
            if server is not None:
                serving.release(server, failed)
        return Measured(refusal, acc, not_measured, tokens)

    def _refusals_after(self, server: VllmServer, acceptance: AcceptanceSets) -> tuple[ObjectiveResult, int]:
        """The refusal rate once acceptance is measured: cut from the shared set's answers where that set is the
        harmful prompts at the refusal length (no tokens served), else served now (its completion tokens)."""
        shared = acceptance.replies.get(self.shared_set or "")
        if shared and all(r.token_ids is not None for r in shared):
            limit = self.cfg.abliteration.max_response_length
            return RefusalRate(prefix_responder(shared, self._decode, limit), self.harmful).compute(), 0
        harmful = self._answer_harmful(server)
        return RefusalRate(_texts(harmful), self.harmful).compute(), sum(r.completion_tokens for r in harmful)

    def _lost(self, server: VllmServer, e: StageError) -> str | None:
        """Why the server is gone (it is stopped here when it hung), or None when the failure was not the server's."""
        if _timed_out(e):
            server.stop(grace_s=5.0)
            timeout = self.cfg.serving.request_timeout_s
            return (
                f"vLLM hung: no answer within {timeout:g} s (serving.request_timeout_s) during {e.stage}; "
                "the server was stopped"
            )
        if server.process is None:
            return None
        try:
            code = server.process.wait(timeout=2.0)  # a killed server's requests fail as it dies
        except subprocess.TimeoutExpired:
            return None  # alive: the failure was not the server's
        if code is not None:
            how = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
            return f"vLLM died during {e.stage} ({how})"
        return None

    def _answer_harmful(self, server: VllmServer) -> list[Reply]:
        """Every harmful eval prompt answered greedily at `max_response_length` tokens (the refusal responses)."""
        limit, concurrency = self.cfg.abliteration.max_response_length, self.cfg.acceptance.concurrency
        timeout = self.cfg.serving.request_timeout_s
        return answer_all(server.base_url, server.served_name, self.harmful, limit, concurrency, timeout)

    def _swap_check(self, candidate: Path, trial_dir: Path, swapped: Measured) -> tuple[dict[str, Any], Measured]:
        """The swap self-check: the same candidate on a cold server (the swap server is stopped first, as both
        would not fit a real target's memory, unless `serving.self_check_beside`), and when the two differ, on a
        second cold server: the noise floor of a vLLM that is not batch-invariant (GPUs). Returns the verdict
        (`swap_verdict`) and the cold measurement."""
        if not self.cfg.serving.self_check_beside:
            self.serving.close()
        cold = self._cold_measurement(candidate, trial_dir / "swap-check-server.log")
        again = None
        if swapped.fingerprint() != cold.fingerprint():
            again = self._cold_measurement(candidate, trial_dir / "swap-check-server-2.log")
        return swap_verdict(swapped, cold, again), cold

    def _swap_lost(self, candidate: Path, trial_dir: Path, lost: ServerLost) -> tuple[dict[str, Any], Measured]:
        """The verdict when the swapped server died or hung (e.g. FP8 experts under CUDA graphs on a vLLM without
        the plugin's `prepare_reload`): failed, and the candidate measured on a cold start instead."""
        self.serving.close()
        cold = self._cold_measurement(candidate, trial_dir / "swap-check-server.log")
        rule = f"the swapped server was lost ({lost.reason}); a cold start served the candidate"
        return {"passed": False, "identical": False, "differences": ["server lost after the swap"], "rule": rule}, cold

    def _cold_measurement(self, candidate: Path, log_path: Path) -> Measured:
        try:
            return self._serve_and_measure(
                candidate,
                log_path,
                lambda name: nullcontext(),  # the whole check is timed as one stage
                lambda pid: None,
                self._cold_serving(),
            )
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageError("swap_check", f"a cold-start server of the swap self-check: {e}", log_path) from e

    def _acceptance(self, server: VllmServer, adaptive: bool) -> AcceptanceSets:
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
            keep_replies=[self.shared_set] if self.shared_set and not adaptive else [],
            target_halfwidth=a.target_halfwidth if adaptive else 0.0,
            round_size=a.round_size,
            timeout=self.cfg.serving.request_timeout_s,
        )
