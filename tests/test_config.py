"""Study TOMLs: both shipped configs validate; broken ones fail with one line per problem naming file, field, fix;
`extends` merges a base config under a file's own fields."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from mtp_abliterate.search.cli import app
from mtp_abliterate.search.config import ConfigError, LocalPath, StudyConfig, load_config
from mtp_abliterate.search.config_merge import PATH_FIELDS, load_merged, standalone_text
from tests.conftest import CLI, GEMMA4_TOML, ORGANISM_CONFIG, ORGANISM_TOML, REPO, write_study_config

N = ORGANISM_CONFIG.serving.num_speculative_tokens


def test_relative_paths_resolve_from_the_config_files_folder(tmp_path: Path) -> None:
    cfg = load_config(ORGANISM_TOML, check_paths=False)
    assert Path(cfg.model.target) == REPO / "organism" / "body"
    assert Path(cfg.prompts.harmful_eval.source) == REPO / "organism" / "prompts" / "harmful_eval.txt"
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    shutil.copy(ORGANISM_TOML, elsewhere / "study.toml")  # the same relative paths, from another folder
    moved = load_config(elsewhere / "study.toml", check_paths=False)
    assert Path(moved.model.target) == tmp_path / "a" / "organism" / "body"
    with pytest.raises(ConfigError, match="model.target: .* does not exist; fix the path"):
        load_config(elsewhere / "study.toml")


def test_hub_ids_are_kept_as_they_are_and_not_checked_as_paths() -> None:
    cfg = load_config(GEMMA4_TOML)  # paths checked: hub ids pass
    written = load_merged(GEMMA4_TOML).raw
    hub_ids = (cfg.model.target, cfg.model.draft, cfg.prompts.harmful_eval.source)
    assert hub_ids == (
        written["model"]["target"],
        written["model"]["draft"],
        written["prompts"]["harmful_eval"]["source"],
    )
    for hub_id in hub_ids:
        assert "/" in hub_id and not Path(hub_id).is_absolute() and not hub_id.startswith(".")
    assert cfg.serving.python == str(GEMMA4_TOML.parent / ".venv-vllm" / "bin" / "python")  # a default resolves too


def _broken(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def _organism(tmp_path: Path, **edits) -> Path:
    return write_study_config(ORGANISM_TOML, tmp_path / "study.toml", **edits)


DUPLICATE_SETS = [
    {"name": "harmless", "prompts": {"source": s.prompts.source}, "weight": s.weight}
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


def test_a_config_extends_a_base_in_another_folder_tables_merged_arrays_replaced(tmp_path: Path) -> None:
    base = write_study_config(
        ORGANISM_TOML,
        tmp_path / "base" / "base.toml",
        runs_dir="runs",
        prompts={"harmful_eval": {"source": "harmful.txt"}},
        serving={"python": sys.executable},
    )
    (base.parent / "harmful.txt").write_text("a harmful prompt\n")
    child = tmp_path / "child" / "study.toml"
    child.parent.mkdir()
    (child.parent / "mine.txt").write_text("a prompt of mine\n")
    child.write_text(
        'extends = "../base/base.toml"\nname = "child"\n'
        '[search]\nn_trials = 2\nmethods = ["ara"]\nenqueue = []\nconstraints = { max_kl = 0.5 }\n'
        '[serving.env]\nEXTRA = "1"\n'
        '[[acceptance.sets]]\nname = "mine"\nprompts = { source = "mine.txt" }\n'
    )
    cfg = load_config(child)  # paths checked: each relative path resolves from the folder of the file that wrote it
    assert (cfg.name, cfg.search.n_trials, cfg.search.sampler) == ("child", 2, ORGANISM_CONFIG.search.sampler)
    organism = ORGANISM_CONFIG.search.constraints.max_refusal_rate
    assert (cfg.search.constraints.max_refusal_rate, cfg.search.constraints.max_kl) == (organism, 0.5)
    assert cfg.serving.env == {**ORGANISM_CONFIG.serving.env, "EXTRA": "1"}
    assert (cfg.search.methods, cfg.search.enqueue, [s.name for s in cfg.acceptance.sets]) == (["ara"], [], ["mine"])
    assert cfg.acceptance.sets[0].prompts.source == str(child.parent / "mine.txt")
    assert cfg.prompts.harmful_eval.source == str(base.parent / "harmful.txt")
    assert cfg.runs_dir == str(base.parent / "runs")

    out = CliRunner().invoke(app, ["config", "check", str(child)]).output
    assert re.search(r"\n +search\.n_trials +study\.toml +2 *\n", out), out
    assert re.search(r"\n +search\.constraints\.max_refusal_rate +\.\./base/base\.toml +0\.5 *\n", out), out
    assert re.search(r"\n +search\.constraints +default +max_kl *\n", out) is None  # the child set it
    assert re.search(r"\n +draft_tune +default +max_minutes *\n", out), out

    # What the study folder keeps: readable without the base (the child's own relative paths, as before, resolve from
    # the folder the copy is in: here the child's)
    copy = child.parent / "config.toml"
    copy.write_text(standalone_text(child))
    assert load_config(copy, check_paths=False).model_dump() == cfg.model_dump()


def test_extends_cycles_missing_bases_and_a_base_s_bad_field_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    assert _broken(
        tmp_path / "a.toml"
    ) == f"{tmp_path / 'b.toml'}: extends: a.toml -> b.toml -> a.toml is a cycle; " + ("remove one of these `extends`")
    (tmp_path / "c.toml").write_text('extends = "nowhere/base.toml"\n')
    assert _broken(tmp_path / "c.toml") == (
        f"{tmp_path / 'c.toml'}: extends: {tmp_path / 'nowhere' / 'base.toml'} does not exist; fix the path "
        f"(relative to {tmp_path})"
    )
    base = write_study_config(ORGANISM_TOML, tmp_path / "base.toml", search={"n_trails": 3})
    (tmp_path / "d.toml").write_text('extends = "base.toml"\nname = "d"\nsearch.seed = "one"\n')
    lines = _broken(tmp_path / "d.toml").splitlines()
    assert lines[0].startswith(f"{tmp_path / 'd.toml'}: search.seed: ") and lines[0].endswith("fix the value")
    assert lines[1] == f"{base}: search.n_trails: unknown field; remove it or fix its spelling", lines


def test_the_cli_and_its_study_tables_load_without_torch() -> None:
    """`config check`, `study status` and `--help` answer in a fraction of a second: the CLI module and the tables it
    prints import no torch (1.4 s on its own), which only the commands that load a model pull in."""
    modules = "mtp_abliterate.search.cli, mtp_abliterate.search.study.records"
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def _local_path_fields(model: type[BaseModel], keys: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Key paths of every `LocalPath` field under `model` ("*": each item of a list)."""
    out: set[tuple[str, ...]] = set()
    for name, info in model.model_fields.items():
        here = (*keys, name)
        if any(getattr(m, "func", None) is LocalPath.__metadata__[0].func for m in info.metadata):
            out.add(here)
        union = get_origin(info.annotation) in (Union, UnionType)  # `X | None`: look at X
        for arg in get_args(info.annotation) if union else [info.annotation]:
            inner = get_args(arg)[0] if get_origin(arg) is list else arg
            suffix = ("*",) if get_origin(arg) is list else ()
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                out |= _local_path_fields(inner, (*here, *suffix))
    return out


def test_every_local_path_field_is_rebased_when_a_base_is_merged():
    """config_merge.PATH_FIELDS (a base's relative paths rebased onto the extending file) lists exactly the fields
    that load_config makes absolute: a new path field added to one list only would resolve from the wrong folder."""
    assert _local_path_fields(StudyConfig) == set(PATH_FIELDS)
