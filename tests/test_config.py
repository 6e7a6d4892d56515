"""Study TOMLs: both shipped configs validate; broken ones fail with one line per problem naming file, field, fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_abliterate.search.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ORGANISM_TOML = REPO / "configs" / "organism.toml"


def test_organism_config_resolves_to_the_committed_organism() -> None:
    cfg = load_config(ORGANISM_TOML, check_paths=False)
    assert Path(cfg.resolve(cfg.model.target)) == REPO / "organism" / "body"
    assert Path(cfg.resolve(cfg.prompts.harmful_eval.source)) == REPO / "organism" / "prompts" / "harmful_eval.txt"
    assert cfg.serving.num_speculative_tokens == 4
    assert {s.name for s in cfg.acceptance.sets} == {"harmful", "harmless"}


def test_gemma4_config_uses_hub_ids_and_the_issue_flags() -> None:
    cfg = load_config(REPO / "configs" / "gemma4-26b-a4b.toml")
    assert cfg.resolve(cfg.model.target) == "google/gemma-4-26B-A4B-it"
    assert cfg.resolve(cfg.model.draft) == "google/gemma-4-26B-A4B-it-assistant"
    args = cfg.serving.vllm_args
    for flag, value in (
        ("--kv-cache-dtype", "fp8"),
        ("--gpu-memory-utilization", "0.65"),
        ("--max-model-len", "8192"),
        ("--limit-mm-per-prompt", '{"image":0,"audio":0,"video":0}'),
    ):
        assert args[args.index(flag) + 1] == value
    assert cfg.prompts.harmful_train.column == "text"
    assert any("router" in pattern for pattern in cfg.quantization.ignore)


def _broken(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def _organism_text(**replace: str) -> str:
    text = ORGANISM_TOML.read_text().replace('"../', f'"{REPO}/')
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    ("old", "new", "field", "fix"),
    [
        ("n_trials = 6", "n_trials = 0", "search.n_trials", "fix the value"),
        ("n_trials = 6", "n_trails = 6", "search.n_trails", "unknown field"),
        ('name = "organism"', "", "name", "required field is missing"),
        ('sampler = "tpe"', 'sampler = "cmaes"', "search.sampler", "fix the value"),
        ("concurrency = 64", 'concurrency = "four"', "acceptance.concurrency", "fix the value"),
        ('"--enforce-eager"', '"--port=9", "--enforce-eager"', "serving.vllm_args", "remove it from vllm_args"),
        ("organism/body", "organism/no-such-body", "model.target", "fix the path"),
        ("harmful_eval.txt", "harmful_evil.txt", "prompts.harmful_eval.source", "fix the path"),
        ('name = "harmful"', 'name = "harmless"', "acceptance.sets", "must be unique"),
        ('acceptance_objective = "mean_accepted_tokens"', 'acceptance_objective = "acc_pos_4"', "", "num_speculative"),
        ('acceptance_objective = "mean_accepted_tokens"', 'acceptance_objective = "tok_s"', "search.acceptance", "fix"),
    ],
)
def test_broken_config_names_file_field_and_fix(tmp_path: Path, old: str, new: str, field: str, fix: str) -> None:
    message = _broken(tmp_path, _organism_text(**{old: new}))
    line = next(line for line in message.splitlines() if f": {field}" in line)
    assert line.startswith(str(tmp_path / "study.toml"))
    assert fix in line


def test_invalid_toml_syntax_is_one_line(tmp_path: Path) -> None:
    message = _broken(tmp_path, "name = \n")
    assert len(message.splitlines()) == 1 and "not valid TOML" in message


def test_missing_vllm_environment_names_the_make_target(tmp_path: Path) -> None:
    message = _broken(tmp_path, _organism_text(**{".venv-vllm/bin/python": "no-venv/bin/python"}))
    assert "serving.python" in message and "make vllm-env" in message


def test_cli_config_check_prints_plan_and_fails_cleanly(tmp_path: Path) -> None:
    exe = [sys.executable, "-c", "from search.cli import app; app()"]
    ok = subprocess.run([*exe, "config", "check", str(ORGANISM_TOML), "--no-paths"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "num_speculative_tokens=4" in ok.stdout and "FP8_DYNAMIC" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(_organism_text(**{"n_trials = 6": "n_trials = -1"}))
    res = subprocess.run([*exe, "config", "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert re.search(r"error:.*search\.n_trials", res.stdout.replace("\n", " "))
