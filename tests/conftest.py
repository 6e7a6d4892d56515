"""What the test files share: the repository, the organism study configs, the vLLM environment, the resident models,
and study TOMLs edited as data (tomlkit), never as text."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from mtp_abliterate.search.config import StudyConfig, load_config
from mtp_abliterate.search.config_merge import load_merged

REPO = Path(__file__).resolve().parents[1]
ORGANISM_TOML = REPO / "configs" / "organism.toml"
RELEASE_TOML = REPO / "configs" / "organism-release.toml"
GEMMA4_TOML = REPO / "configs" / "gemma4-26b-a4b.toml"  # the real model's study (a DGX Spark, docker, hub ids)
# Paths unchecked here: collecting the tests that never serve must not need the vLLM environment (`serving.python`).
# The tests that serve ask for `vllm_python`, which fails with the fix when it is missing.
ORGANISM_CONFIG = load_config(ORGANISM_TOML, check_paths=False)
RELEASE_CONFIG = load_config(RELEASE_TOML, check_paths=False)
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CLI = [str(Path(sys.executable).parent / "mtp-abliterate")]

# `make test` runs the files on two pytest-xdist workers (`-n 2 --dist loadfile`): most of the suite waits on vLLM
# start-ups (python processes importing vLLM one after another, ~27 s on one core), so a second worker uses the
# second core. Each worker keeps to one thread: torch and OpenMP at one thread in it and in its child processes (the
# CLI, vLLM, which inherit the environment); threads spinning for a core the other worker holds slow both down many
# times over.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # the organism build and check tests run their specs at one thread too


# The files that take a minute or more, longest first (`--durations=0` of a full run: 1165 s for test_study down to
# about 100 s), handed out in this order (`make test` keeps it with `--no-loadscope-reorder`): the worker that ends
# last ends on short files, not on a long one started late.
LONGEST_FIRST = [
    "test_study",
    "test_release_format",
    "test_distributed",
    "test_experts_organism",
    "test_fast_path",
    "test_study_at_n2",
    "test_baseline",
    "test_abliterate",
    "test_organism",
    "test_faults_vllm",
    "test_adaptive",
    "test_docker_launcher",
    "test_faults_stores",
    "test_acceptance",
    "test_heretic_parity",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM environment's python; a test that serves fails (never skips) without it, naming the fix."""
    if not (VLLM_PYTHON.is_file() and os.access(VLLM_PYTHON, os.X_OK)):
        pytest.fail(f"{VLLM_PYTHON} is missing: the vLLM environment is not built; run `make vllm-env`", pytrace=False)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def resident(tmp_path_factory: pytest.TempPathFactory):
    """The organism (configs/organism.toml) in memory with revertible candidates, shared by every test file: each
    test applies the candidate it needs (or resets) first."""
    from mtp_abliterate.search.candidate.resident import Resident

    return Resident(ORGANISM_CONFIG, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def release_resident(tmp_path_factory: pytest.TempPathFactory):
    """The release-format organism (configs/organism-release.toml) in memory."""
    from mtp_abliterate.search.candidate.resident import Resident

    return Resident(RELEASE_CONFIG, cache_dir=tmp_path_factory.mktemp("release-cache"))


def group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` is running (zombies do not count), as `ps` sees it: the tests'
    own view of what is left, independent of the product's bookkeeping."""
    out = subprocess.run(["ps", "-A", "-o", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return any(int(g) == pgid and not stat.startswith("Z") for g, stat in (line.split() for line in out.splitlines()))


def _absolute_paths(node: Any, base: Path) -> None:
    """Relative paths (`../x`, `./x`) resolve from the config file's own folder: make them absolute, so the edited
    copy means the same wherever it is written."""
    keys = list(node.keys()) if isinstance(node, MutableMapping) else range(len(node))
    for key in keys:
        value = node[key]
        if isinstance(value, str):
            if value.startswith(("../", "./")):
                node[key] = os.path.normpath(base / value)
        elif isinstance(value, MutableMapping | MutableSequence):
            _absolute_paths(value, base)


def _apply_edits(table: MutableMapping, edits: Mapping[str, Any]) -> None:
    for key, value in edits.items():
        if value is None:  # TOML has no null: None removes the key (a table, an array of tables, a value)
            del table[key]
        elif isinstance(value, Mapping) and isinstance(table.get(key), MutableMapping):
            _apply_edits(table[key], value)
        else:
            table[key] = str(value) if isinstance(value, Path) else value


def write_study_config(src: Path, dst: Path, **edits: Any) -> Path:
    """`src` (a study TOML, merged with those it extends) written to `dst` with its relative paths made absolute and
    `edits` applied as data: top-level keys as keywords, a dict edits that table key by key (nested), None removes a
    key, a Path is written as its string, a list of dicts is an array of tables. E.g. `write_study_config(src, dst,
    name="demo", search={"n_trials": 3, "enqueue": None}, serving={"mode": "cold"})`."""
    doc = load_merged(src).raw  # the configs it extends merged in: `edits` (None included) act on the whole config
    _absolute_paths(doc, src.resolve().parent)
    _apply_edits(doc, edits)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(tomlkit.dumps(doc))
    return dst


def assert_serves_as_recorded(
    cfg: StudyConfig,
    checkpoint: Path,
    draft: str,
    recorded: Mapping[str, float],
    vllm_python: Path,
    log: Path,
    then: Callable[[Any], None] = lambda server: None,
) -> None:
    """`checkpoint` served by vLLM with `draft` gives the acceptance the study recorded for it: the same counts for
    the sets it measured in full (greedy on CPU), a full figure inside the recorded interval for a set it stopped
    early. `then(server)` runs more checks on the same server."""
    from mtp_abliterate.objectives.acceptance import AcceptanceSets
    from mtp_abliterate.search.prompts import load_prompt_set
    from mtp_abliterate.search.serving.server import VllmServer

    sets = [(s.name, load_prompt_set(cfg.model, s.prompts), s.weight) for s in cfg.acceptance.sets]
    serving = cfg.serving.model_copy(update={"python": str(vllm_python)})
    a = cfg.acceptance
    with VllmServer(serving, str(checkpoint), draft, log) as server:
        n = cfg.serving.num_speculative_tokens
        measured = AcceptanceSets(
            server.base_url, server.served_name, sets, n, a.max_tokens, a.temperature, a.seeds, a.concurrency
        )
        details = measured.compute().details["sets"]
        then(server)
    full = [name for name, m in details.items() if recorded[f"{name}.num_prompts"] == m["num_prompts"]]
    assert full  # the harmful set is measured in full from the refusal answers
    for name in full:
        assert details[name]["accepted_per_step"] == recorded[f"{name}.accepted_per_step"]
    for name in set(details) - set(full):
        m = details[name]
        assert abs(m["accepted_per_step"] - recorded[f"{name}.accepted_per_step"]) <= recorded[f"{name}.ci95"]
