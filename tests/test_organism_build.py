"""`organism build` is deterministic: the same seed gives byte-identical artifacts; another seed does not.

Runs the real build pipeline (corpus, tokenizer, body SFT, greedy targets, draft distillation, saving) with a few
optimiser steps and most (template, slot) pairs held out (fewer training chats to answer greedily for the draft's
targets: 480 instead of 3600, still several generation batches), so it stays seconds; the full build is the same code
with more steps and chats (timed in the card).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from mtp_abliterate.organism.build import build_organism, tree_sha256
from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.organism.spec import OrganismSpec, TrainSpec

SHORT = dict(
    body_training=TrainSpec(steps=3, batch_size=8, warmup_steps=1),
    draft_training=TrainSpec(steps=2, batch_size=8, warmup_steps=1),
    max_new_tokens=3,
    eval_fraction=0.9,
    threads=1,  # any fixed count gives the same bytes; one keeps to one core beside another test worker
)


def _build(root: Path, seed: int, format: str) -> str:
    layout = OrganismLayout(root)
    build_organism(layout, OrganismSpec(seed=seed, format=format, **SHORT), Console(quiet=True))
    return tree_sha256(layout.root)


@pytest.mark.parametrize("format", ["text", "release"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, format: str) -> None:
    first = _build(tmp_path / "a", seed=7, format=format)
    assert _build(tmp_path / "b", seed=7, format=format) == first
    assert _build(tmp_path / "c", seed=8, format=format) != first
    for part in ("body/model.safetensors", "draft/model.safetensors", "prompts/harmful_eval.txt", "spec.json"):
        assert (tmp_path / "a" / part).is_file()
    if format == "release":
        assert (tmp_path / "a" / "body" / "processor_config.json").is_file()
