"""A study's folder and its stored config, without loading a model: a config edited between runs (a field that changes
what a trial means is refused with the diff, a budget field is accepted), two `study run` of one study in one folder
(the second refused before anything loads), and commands given a study folder write under that folder, wherever
`study run --runs-dir` put it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import tomlkit
from pydantic import BaseModel
from typer.testing import CliRunner

from mtp_abliterate.search.cli import app
from mtp_abliterate.search.config import (
    OPERATIONAL,
    TRIAL_MEANING,
    StudyConfig,
    _class_of,
    load_config,
    meaning_changes,
    trial_meaning,
)
from mtp_abliterate.search.config_merge import load_merged
from mtp_abliterate.search.study.errors import StudyError
from mtp_abliterate.search.study.storage import (
    LOCK,
    load_study_config,
    open_storage,
    open_study,
    run_dir_of,
    study_lock,
    write_pointer,
)
from tests.conftest import CLI, ORGANISM_TOML, REPO, write_study_config


def organism(tmp: Path, file: str = "study.toml", **edits) -> Path:
    """The organism study on SQLite under `tmp`, its vLLM environment this python (nothing here starts a server)."""
    edits.setdefault("serving", {})["python"] = sys.executable
    return write_study_config(ORGANISM_TOML, tmp / file, runs_dir=tmp / "runs", **edits)


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _paths(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_config_field_is_classified_as_changing_what_a_trial_means_or_not() -> None:
    fields = _paths(StudyConfig)
    assert {"serving.num_speculative_tokens", "search.n_trials", "retention.keep"} <= set(fields)
    classes = {f: _class_of(f) for f in fields}  # KeyError for a field in neither list
    assert classes["serving.num_speculative_tokens"] and classes["prompts.harmful_eval.source"]
    assert not classes["search.n_trials"] and not classes["serving.startup_timeout_s"]
    assert not set(TRIAL_MEANING) & set(OPERATIONAL)


def test_a_config_edited_between_runs_is_refused_with_the_diff_unless_only_budget_fields_changed(
    tmp_path: Path,
) -> None:
    first = load_config(organism(tmp_path))
    storage = open_storage(first)
    study, created = open_study(first, storage)
    assert created and study.user_attrs["config_meaning"]["serving.num_speculative_tokens"] == 4

    # Budget and operation: accepted.
    budget = organism(
        tmp_path,
        "budget.toml",
        search={"n_trials": 40, "max_consecutive_failures": 9},
        retention={"keep": "all"},
        serving={"startup_timeout_s": 30},
        tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'elsewhere.db'}"},
        storage={"heartbeat_s": 5, "grace_s": 20},
    )
    _, created = open_study(load_config(budget), storage)
    assert not created

    # What a trial means: refused, one line with each field's old and new value and the fix.
    changed = load_config(
        organism(tmp_path, "changed.toml", serving={"num_speculative_tokens": 3}, abliteration={"rank": 4})
    )
    with pytest.raises(StudyError) as refused:
        open_study(changed, storage)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert "serving.num_speculative_tokens: 4 -> 3" in message and "abliteration.rank: 8 -> 4" in message
    assert "search.n_trials" not in message and "new `name`" in message

    # The command refuses it before any model loads.
    proc = subprocess.run(
        [*CLI, "study", "run", str(tmp_path / "changed.toml")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "serving.num_speculative_tokens: 4 -> 3" in errors[0], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir_of(first) / "cache").exists()  # the module I/O capture is the first thing a model load writes


def test_a_study_that_recorded_its_paths_as_written_resumes_with_them_resolved_at_load(tmp_path: Path) -> None:
    """Before paths were resolved when the config loads, a study recorded them as its TOML wrote them
    (`../organism/body`); the same TOML, loaded now (every path absolute), resumes it with no reported change."""
    raw = {**load_merged(ORGANISM_TOML).raw, "runs_dir": str(tmp_path / "runs")}
    toml = tmp_path / "configs" / "study.toml"
    toml.parent.mkdir()
    toml.write_text(tomlkit.dumps(raw))
    as_written = StudyConfig.model_validate(raw)  # validated as load_config did then: the paths kept as written
    current = load_config(toml, check_paths=False)
    assert as_written.model.target == "../organism/body"
    assert current.model.target == str(tmp_path / "organism" / "body")
    storage = open_storage(current)
    study, created = open_study(as_written, storage)
    assert created and study.user_attrs["config_meaning"]["model.target"] == "../organism/body"
    assert meaning_changes(study.user_attrs["config_meaning"], trial_meaning(current)) == []
    _, created = open_study(current, storage)  # a reported change raises StudyError
    assert not created


def test_a_second_study_run_of_one_study_folder_is_refused_before_anything_loads(tmp_path: Path) -> None:
    config = organism(tmp_path)
    cfg = load_config(config)
    holder = subprocess.Popen(  # a first `study run`, as far as the folder can tell
        [
            sys.executable,
            "-c",
            "import sys, time; from mtp_abliterate.search.config import load_config\n"
            "from mtp_abliterate.search.study.storage import study_lock\n"
            "with study_lock(load_config(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n",
            str(config),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(app, ["study", "run", str(config)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
        assert "already running" in errors[0] and f"pid {holder.pid}" in errors[0] and "several hosts" in errors[0]
        assert not (run_dir_of(cfg) / "optuna.db").exists()  # refused before the stores were opened
        assert not (run_dir_of(cfg) / "cache").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # A killed holder leaves no stale lock: the kernel released it with the process.
    assert (run_dir_of(cfg) / LOCK).is_file()
    with study_lock(cfg):
        pass


def test_a_study_folder_given_to_a_command_is_where_it_writes(tmp_path: Path) -> None:
    """`study run --runs-dir D` then `draft-tune D/<study>`, `export D/<study>`, `materialize D/<study>`: the FP8
    candidate, the module I/O cache (and heretic.log beside it), exports, the draft-tune folder are under D/<study>,
    not under the config's own runs_dir."""
    from mtp_abliterate.search.draft.run import work_dir
    from mtp_abliterate.search.release.export import default_export_dir

    config = organism(tmp_path)
    cfg = load_config(config)
    elsewhere = tmp_path / "D"
    moved = cfg.model_copy(update={"runs_dir": str(elsewhere)})  # what `study run --runs-dir D` does
    open_study(moved, open_storage(moved))
    write_pointer(moved, config, config.read_text())
    folder = elsewhere / cfg.name

    given = load_study_config(folder)
    assert run_dir_of(given) == folder != run_dir_of(cfg)
    # materialize and draft-tune load the resident model with this cache (heretic.log goes to its parent)
    assert (run_dir_of(given) / "cache").parent == folder
    assert work_dir(given, 3).is_relative_to(folder)  # draft-tune's FP8 and BF16 candidates and tuned draft
    assert default_export_dir(given, 3, "fp8").is_relative_to(folder)
    assert given.storage.optuna_url == f"sqlite:///{folder / 'optuna.db'}"  # the study it ran, not a new one
    assert not (tmp_path / "runs").exists()  # nothing under the config's own runs_dir


def test_a_study_written_with_another_acceptance_objective_is_refused_in_one_line(tmp_path: Path) -> None:
    """A study measured before the speed-true objective optimised vLLM's raw `mean_accepted_tokens`: its values are
    not comparable with `accepted_per_step`, so resuming it is refused, naming both and the fix."""
    cfg = load_config(organism(tmp_path))
    storage = open_storage(cfg)
    old = optuna.create_study(study_name=cfg.name, storage=storage, directions=["minimize", "minimize", "maximize"])
    old.set_metric_names(["refusal_rate", "kld", "mean_accepted_tokens"])
    with pytest.raises(StudyError) as refused:
        open_study(cfg, storage)
    message = str(refused.value)
    assert "\n" not in message and "'mean_accepted_tokens'" in message and "'accepted_per_step'" in message
    assert "give the config a new `name`" in message


def test_commands_on_a_study_that_never_ran_say_so_in_one_line_and_create_nothing(tmp_path: Path) -> None:
    """`study status` / `study show` before the first `study run`: one line naming the fix, no traceback, and no
    empty study database or folder left behind (opening the SQLite URL would create one, or fail on the folder)."""
    config = organism(tmp_path)
    for words in (["study", "status", str(config)], ["study", "show", str(config), "0"]):
        result = CliRunner().invoke(app, words)
        assert result.exit_code != 0, result.output
        assert "start it with `mtp-abliterate study run CONFIG`" in result.output
        assert "Traceback" not in result.output and "OperationalError" not in result.output
    assert not run_dir_of(load_config(config)).exists()
