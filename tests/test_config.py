"""Study TOMLs: both shipped configs validate; broken ones fail with one line per problem naming file, field, fix."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_abliterate.search.config import ConfigError, load_config
from tests.conftest import CLI, GEMMA4_TOML, ORGANISM_CONFIG, ORGANISM_TOML, REPO, write_study_config

N = ORGANISM_CONFIG.serving.num_speculative_tokens


def test_relative_paths_resolve_from_the_config_files_folder(tmp_path: Path) -> None:
    cfg = load_config(ORGANISM_TOML, check_paths=False)
    assert Path(cfg.resolve(cfg.model.target)) == REPO / "organism" / "body"
    assert Path(cfg.resolve(cfg.prompts.harmful_eval.source)) == REPO / "organism" / "prompts" / "harmful_eval.txt"
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    shutil.copy(ORGANISM_TOML, elsewhere / "study.toml")  # the same relative paths, from another folder
    moved = load_config(elsewhere / "study.toml", check_paths=False)
    assert Path(moved.resolve(moved.model.target)) == tmp_path / "a" / "organism" / "body"
    with pytest.raises(ConfigError, match="model.target: .* does not exist; fix the path"):
        load_config(elsewhere / "study.toml")


def test_hub_ids_are_kept_as_they_are_and_not_checked_as_paths() -> None:
    cfg = load_config(GEMMA4_TOML)  # paths checked: hub ids pass
    for hub_id in (cfg.model.target, cfg.model.draft):
        assert "/" in hub_id and not Path(hub_id).is_absolute() and not hub_id.startswith(".")
        assert cfg.resolve(hub_id) == hub_id


def _broken(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def _organism(tmp_path: Path, **edits) -> Path:
    return write_study_config(ORGANISM_TOML, tmp_path / "study.toml", **edits)


DUPLICATE_SETS = [
    {"name": "harmless", "prompts": {"source": ORGANISM_CONFIG.resolve(s.prompts.source)}, "weight": s.weight}
    for s in ORGANISM_CONFIG.acceptance.sets
]


@pytest.mark.parametrize(
    ("edits", "field", "fix"),
    [
        ({"search": {"n_trials": 0}}, "search.n_trials", "fix the value"),
        ({"search": {"n_trials": None, "n_trails": 6}}, "search.n_trails", "unknown field"),
        ({"name": None}, "name", "required field is missing"),
        ({"search": {"sampler": "cmaes"}}, "search.sampler", "fix the value"),
        ({"acceptance": {"concurrency": "four"}}, "acceptance.concurrency", "fix the value"),
        (
            {"serving": {"vllm_args": ["--port=9", *ORGANISM_CONFIG.serving.vllm_args]}},
            "serving.vllm_args",
            "remove it from vllm_args",
        ),
        ({"model": {"target": REPO / "organism" / "no-such-body"}}, "model.target", "fix the path"),
        (
            {"prompts": {"harmful_eval": {"source": REPO / "organism" / "prompts" / "harmful_evil.txt"}}},
            "prompts.harmful_eval.source",
            "fix the path",
        ),
        ({"acceptance": {"sets": DUPLICATE_SETS}}, "acceptance.sets", "must be unique"),
        ({"search": {"acceptance_objective": f"acc_pos_{N}"}}, "", "num_speculative"),
        ({"search": {"acceptance_objective": "tok_s"}}, "search.acceptance", "fix"),
    ],
)
def test_broken_config_names_file_field_and_fix(tmp_path: Path, edits: dict, field: str, fix: str) -> None:
    message = _broken(_organism(tmp_path, **edits))
    line = next(line for line in message.splitlines() if f": {field}" in line)
    assert line.startswith(str(tmp_path / "study.toml"))
    assert fix in line


def test_invalid_toml_syntax_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text("name = \n")  # not TOML: the one file written as text
    message = _broken(tmp_path / "study.toml")
    assert len(message.splitlines()) == 1 and "not valid TOML" in message


def test_missing_vllm_environment_names_the_make_target(tmp_path: Path) -> None:
    message = _broken(_organism(tmp_path, serving={"python": REPO / "no-venv" / "bin" / "python"}))
    assert "serving.python" in message and "make vllm-env" in message


def test_cli_config_check_prints_plan_and_fails_cleanly(tmp_path: Path) -> None:
    ok = subprocess.run([*CLI, "config", "check", str(ORGANISM_TOML), "--no-paths"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"num_speculative_tokens={N}" in ok.stdout and ORGANISM_CONFIG.quantization.scheme in ok.stdout
    bad = _organism(tmp_path, search={"n_trials": -1})
    res = subprocess.run([*CLI, "config", "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert re.search(r"error:.*search\.n_trials", res.stdout.replace("\n", " "))


def test_the_cli_and_its_study_tables_load_without_torch() -> None:
    """`config check`, `study status` and `--help` answer in a fraction of a second: the CLI module and the tables it
    prints import no torch (1.4 s on its own), which only the commands that load a model pull in."""
    modules = "mtp_abliterate.search.cli, mtp_abliterate.search.study.records"
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
