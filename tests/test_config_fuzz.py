"""Bad input at scale: seeded mutations of every shipped config (every field: the wrong type, out of range, not one of
its choices; an unknown key, a missing required one; a missing file, a folder that is not a Gemma 4 model, an empty or
non-UTF-8 prompt file; broken TOML), each through `mtp-abliterate config check` in this process. Each must exit 2
with `error:` lines naming the file and the field, never a traceback, and write nothing. Then prompt files as
`search/prompts.py` documents them: blank lines skipped, CRLF and surrounding spaces stripped, long lines and
duplicates kept, non-UTF-8 refused by `config check` with the line."""

from __future__ import annotations

import copy
import random
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import tomlkit
from pydantic import BaseModel
from typer.testing import CliRunner

from mtp_abliterate.search.cli import app
from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.config_merge import load_merged
from tests.conftest import REPO, _absolute_paths

CONFIGS = sorted((REPO / "configs").glob("*.toml"))
PER_KIND = 70  # mutations run of each kind, drawn with a fixed seed from all of them (~1200): ~450 in all
MISSING = object()


def shipped(path: Path, tmp: Path) -> dict[str, Any]:
    """A shipped config as plain data: relative paths made absolute, its runs_dir under `tmp`, its vLLM environment
    this python (the check needs it to exist; nothing here starts a server)."""
    doc = load_merged(path).raw  # with the config it extends merged in
    _absolute_paths(doc, path.parent)
    doc["runs_dir"] = str(tmp / "runs")
    if doc.get("serving", {}).get("launcher", "python") == "python":
        doc.setdefault("serving", {})["python"] = sys.executable
    return doc


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, tuple[Any, ...], Any]]:
    """(field as `config check` names it, key path, value) of every value; lists of scalars are one value."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else key)
        if isinstance(value, dict) and value or isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for field, keys, leaf in leaves(value, name):
                yield field, (key, *keys), leaf
        else:
            yield name, (key,), value


def field_info(keys: tuple[Any, ...]):
    """The pydantic field a key path names, or None (inside a dict-typed field such as serving.env)."""
    model: Any = StudyConfig
    info = None
    for key in keys:
        if isinstance(key, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return None
        info = model.model_fields[key]
        model = info.annotation
        for _ in range(3):  # list[Section], Section | None
            if typing.get_origin(model) in (list, typing.Union, types.UnionType):
                model = next((a for a in typing.get_args(model) if a is not type(None)), None)
    return info


def wrong_type(value: Any) -> Any:
    if isinstance(value, dict):
        return 5
    if isinstance(value, list):
        return 5
    return {"x": 1}  # a table where a value belongs: wrong for every scalar type


def out_of_range(info, value: Any) -> list[Any]:
    """Values the field's own constraints refuse."""
    out = []
    if info is None:
        return out
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            out.append(m.ge - 1)
        elif isinstance(m, annotated_types.Gt):
            out.append(m.gt - 1)
        elif isinstance(m, annotated_types.Le):
            out.append(m.le + 1)
        elif isinstance(m, annotated_types.Lt):
            out.append(m.lt + 1)
        elif isinstance(m, annotated_types.MinLen):
            out.append([])
        elif getattr(m, "pattern", None):
            out.append("not a valid value!")
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
        out.append(["not-an-option"] if isinstance(value, list) else "not-an-option")
    return out


def put(doc: dict[str, Any], keys: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if value is MISSING:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


class Fixtures:
    """Files the mutations point at, made once."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "inputs"
        self.root.mkdir()
        self.llama = self.root / "llama"
        self.llama.mkdir()
        (self.llama / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
        self.no_config = self.root / "no-config"
        self.no_config.mkdir()
        self.empty = self.root / "empty.txt"
        self.empty.write_text("")
        self.blank = self.root / "blank.txt"
        self.blank.write_text("\n  \r\n\t\n")
        self.latin1 = self.root / "latin1.txt"
        self.latin1.write_bytes("first prompt\nsecond caf\xe9 prompt\n".encode("latin-1"))


def mutations(tmp: Path, fx: Fixtures) -> list[tuple[str, Path, dict[str, Any] | bytes, str]]:
    """(case, kind, mutated data or raw bytes, the field the error must name)."""
    cases = []
    for path in CONFIGS:
        doc = shipped(path, tmp)
        cases.append((f"{path.name}: unknown top-level key", "unknown key", {**doc, "colour": "blue"}, "colour"))
        cases.append((f"{path.name}: TOML syntax", "syntax", b"name = \n[model\n", "not valid TOML"))
        cases.append((f"{path.name}: not UTF-8", "syntax", b'name = "caf\xe9"\n', "not UTF-8"))
        for field, keys, value in leaves(doc):
            info = field_info(keys)
            if field == "runs_dir":
                continue  # any folder name is valid
            if info is None and "serving.env" not in field and ".enqueue" not in field:
                continue
            cases.append((f"{path.name}: {field}: wrong type", "wrong type", put(doc, keys, wrong_type(value)), field))
            for bad in out_of_range(info, value):
                cases.append((f"{path.name}: {field} = {bad!r}", "out of range", put(doc, keys, bad), field))
            if info is not None and info.is_required():
                cases.append((f"{path.name}: {field} missing", "missing key", put(doc, keys, MISSING), field))
            if len(keys) > 1 and isinstance(keys[-2], str) and info is not None:
                unknown = (*keys[:-1], keys[-1] + "_typo")
                cases.append((f"{path.name}: {field}_typo", "unknown key", put(doc, unknown, value), field + "_typo"))
            is_local = isinstance(value, str) and value.startswith("/") and not field.startswith("runs_dir")
            if is_local:
                missing = value + ".missing"
                cases.append((f"{path.name}: {field}: missing file", "missing file", put(doc, keys, missing), field))
            if field in ("model.target", "model.draft") and is_local:
                for folder in (fx.llama, fx.no_config):
                    cases.append(
                        (
                            f"{path.name}: {field}: {folder.name}",
                            "not a Gemma 4 model",
                            put(doc, keys, str(folder)),
                            field,
                        )
                    )
                other = doc["model"]["draft" if field == "model.target" else "target"]
                cases.append(
                    (f"{path.name}: {field}: the other model", "not a Gemma 4 model", put(doc, keys, other), field)
                )
            if field.endswith("source") and is_local and value.endswith(".txt"):
                for bad_file in (fx.empty, fx.blank, fx.latin1):
                    case = f"{path.name}: {field}: {bad_file.name}"
                    cases.append((case, "bad prompt file", put(doc, keys, str(bad_file)), field))
        # the validators across fields
        n = doc.get("serving", {}).get("num_speculative_tokens", 4)
        across = [
            ("grace <= heartbeat", ("storage",), {"heartbeat_s": 9, "grace_s": 9}, "storage"),
            ("range low > high", ("search", "space"), {"k": {"low": 9, "high": 1}}, "search.space.k"),
            ("owned vLLM flag", ("serving", "vllm_args"), ["--port=1"], "serving.vllm_args"),
            ("unset ${VAR}", ("storage", "optuna_url"), "postgresql://u:${MTP_NO_SUCH_VAR}@h/db", "storage.optuna_url"),
            ("acc_pos_n", ("search", "acceptance_objective"), f"acc_pos_{n}", "acceptance_objective"),
        ]
        if len(doc.get("search", {}).get("methods", ["ara", "directional"])) > 1:
            across.append(("gp, two methods", ("search", "sampler"), "gp", "search"))
        for case, keys, value, field in across:
            cases.append((f"{path.name}: {case}", "across fields", put(doc, keys, value), field))
    return cases


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def check(path: Path, runner: CliRunner) -> Any:
    return runner.invoke(app, ["config", "check", str(path)])


def test_the_shipped_configs_pass_as_the_fuzzer_writes_them(tmp_path: Path) -> None:
    runner = CliRunner()
    for source in CONFIGS:
        path = tmp_path / source.name
        path.write_text(tomlkit.dumps(shipped(source, tmp_path)))
        result = check(path, runner)
        assert result.exit_code == 0, (source.name, result.output)
        load_config(path)


def test_seeded_config_mutations_each_exit_2_naming_file_and_field_and_write_nothing(tmp_path: Path) -> None:
    fx = Fixtures(tmp_path)
    everything = mutations(tmp_path, fx)
    by_kind: dict[str, list] = {}
    for case in everything:
        by_kind.setdefault(case[1], []).append(case)
    assert len(by_kind) == 9, sorted(by_kind)
    rng = random.Random(38)
    chosen = [case for cases in by_kind.values() for case in rng.sample(cases, min(PER_KIND, len(cases)))]
    assert len(chosen) > 300
    runner = CliRunner()
    before = files_under(tmp_path)
    for i, (case, _, data, field) in enumerate(chosen):
        path = tmp_path / f"case-{i:03d}.toml"
        path.write_bytes(data if isinstance(data, bytes) else tomlkit.dumps(data).encode())
        result = check(path, runner)
        out = result.output
        assert result.exit_code == 2, (case, out, result.exception)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), case
        assert "Traceback" not in out, (case, out)
        errors = [line for line in out.splitlines() if line.startswith("error:") or line.startswith(str(path))]
        assert errors and out.startswith("error:"), (case, out)
        assert all(str(path) in line for line in errors), (case, out)
        assert any(field in line for line in errors), (case, field, out)
        path.unlink()
    assert files_under(tmp_path) == before  # nothing written: no runs folder, no cache
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    long = "x" * 10_000
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_bytes(f"  first prompt \r\n\r\n\nsecond\r\n{long}\nsecond\n   \n".encode())
    return path, long


def test_prompt_files_skip_blank_lines_strip_crlf_and_keep_long_lines_and_duplicates(prompt_file) -> None:
    from mtp_abliterate.search.prompts import load_prompt_set
    from tests.conftest import ORGANISM_CONFIG

    path, long = prompt_file
    ps = ORGANISM_CONFIG.prompts.harmful_eval.model_copy(update={"source": str(path), "split": None})
    prompts = [p.user for p in load_prompt_set(ORGANISM_CONFIG.model, ps)]
    assert prompts == ["first prompt", "second", long, "second"]
    sliced = ps.model_copy(update={"split": "[:2]"})  # a split counts prompts, not lines
    assert [p.user for p in load_prompt_set(ORGANISM_CONFIG.model, sliced)] == ["first prompt", "second"]


def test_a_prompt_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok\n\nstill ok\ncaf\xe9\n".encode("latin-1"))
    doc = shipped(REPO / "configs" / "organism.toml", tmp_path)
    config = tmp_path / "study.toml"
    config.write_text(tomlkit.dumps(put(doc, ("prompts", "harmful_eval", "source"), str(bad))))
    result = check(config, CliRunner())
    assert result.exit_code == 2
    assert f"prompts.harmful_eval.source: {bad} line 4 is not UTF-8" in result.output
