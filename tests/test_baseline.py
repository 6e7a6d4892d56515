"""`baseline` in our own harness shows the seed's phenomenon on the organism: an abliterated body keeps less of the
vanilla draft's acceptance, so it gains fewer tokens per target step from n=4 than the vanilla body does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mtp_abliterate.organism.check import DIRECTIONAL_PARAMETERS
from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.resident import Resident
from tests.conftest import CLI, ORGANISM_TOML, write_study_config
from tests.conftest import ORGANISM_CONFIG as CONFIG


def _start_baseline(study: Path, label: str, model: Path | None, n: str) -> tuple[subprocess.Popen, Path]:
    """`mtp-abliterate baseline` started in the background; its stdout and stderr go to files beside the config."""
    cmd = [*CLI, "baseline", str(study), "--n", n, "--label", label]
    cmd += ["--model", str(model)] if model else []
    log = study.parent / f"baseline-{label}"
    with log.with_suffix(".stdout").open("w") as out, log.with_suffix(".stderr").open("w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err), log


def _finished(started: tuple[subprocess.Popen, Path], label: str) -> dict:
    proc, log = started
    try:
        returncode = proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = log.with_suffix(".stdout").read_text()
    assert returncode == 0, stdout[-3000:] + log.with_suffix(".stderr").read_text()[-3000:]
    assert "tok/s 1 stream" in stdout and f"tok/s {CONFIG.acceptance.concurrency} streams" in stdout
    out = log.parent / "organism" / "baseline" / label
    assert (out / "baseline.csv").is_file() and "model-fp8" in json.loads((out / "baseline.json").read_text())["model"]
    rows = json.loads((out / "baseline.json").read_text())["rows"]
    return {(r["n"], r["prompt_set"]): r for r in rows}


@pytest.mark.usefixtures("vllm_python")
def test_abliterated_body_loses_acceptance_and_mtp_gain(tmp_path: Path) -> None:
    study = write_study_config(ORGANISM_TOML, tmp_path / "study.toml", runs_dir=tmp_path)
    # The vanilla baseline (its own process, FP8 model and vLLM servers) runs while the abliterated body is made. n = 0
    # is the reference the speed-ups are over; without speculation a target step makes one token, on either body.
    vanilla_run = _start_baseline(study, "vanilla", None, n="0,4")
    try:
        cfg = CONFIG.model_copy(
            update={"abliteration": CONFIG.abliteration.model_copy(update={"method": "directional", "rank": 3})}
        )
        resident = Resident(cfg, cache_dir=None)
        resident.apply(DirectionalParameters(**DIRECTIONAL_PARAMETERS))
        assert resident.refusal.compute().value <= 0.2
        abliterated = resident.abliterator.save_merged(tmp_path / "abliterated", cfg.model.target)
        ablit = _finished(_start_baseline(study, "abliterated", abliterated, n="4"), "abliterated")
    except BaseException:
        vanilla_run[0].kill()  # its servers die with it (PR_SET_PDEATHSIG)
        raise
    vanilla = _finished(vanilla_run, "vanilla")
    for rows in (vanilla, ablit):
        assert all(r["invalid_reason"] is None for r in rows.values())
        assert all(r["single_stream_tok_s"] > 0 and r["aggregate_tok_s"] > 0 for r in rows.values())
    # Speed-ups over no speculation, single-stream and aggregate, both measured in the same run.
    assert vanilla[(0, "harmful")]["single_stream_speedup"] == 1.0 == vanilla[(0, "harmful")]["aggregate_speedup"]
    assert all(r["single_stream_speedup"] > 0 and r["aggregate_speedup"] > 0 for r in vanilla.values())
    v4, a4 = vanilla[(4, "harmful")], ablit[(4, "harmful")]
    print("harmful n=4 vanilla", v4["per_position"], "abliterated", a4["per_position"])
    assert all(a < v for a, v in zip(a4["per_position"], v4["per_position"], strict=True))
    assert vanilla[(0, "harmful")]["tokens_per_step"] == 1.0
    gain = {
        name: rows[(4, "harmful")]["tokens_per_step"] for name, rows in (("vanilla", vanilla), ("abliterated", ablit))
    }
    print("n=4 tokens per target step (1 without speculation):", gain)
    assert 1.0 < gain["abliterated"] < gain["vanilla"]
    assert ablit[(4, "harmless")]["accepted_per_step"] == pytest.approx(
        vanilla[(4, "harmless")]["accepted_per_step"], abs=0.6
    )
