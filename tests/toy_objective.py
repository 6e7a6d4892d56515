"""A toy fourth objective, registered on import: a study names it `tests.toy_objective:mean_answer_tokens` in
`search.extra_objectives` (tests/test_study_at_n2.py). It reads what a trial measured already: the acceptance
answers' mean length in tokens."""

from __future__ import annotations

from mtp_abliterate.objectives.base import Direction, ObjectiveSpec
from mtp_abliterate.objectives.registry import register
from mtp_abliterate.search.trial.result import TrialResult

MEAN_ANSWER_TOKENS = "mean_answer_tokens"


def mean_answer_tokens(result: TrialResult) -> float | None:
    """Output tokens per acceptance prompt served, over every set; None when acceptance was not measured."""
    sets = result.acceptance["sets"].values()
    prompts = sum(s["num_prompts"] for s in sets)
    return sum(s["output_tokens"] for s in sets) / prompts if prompts else None


SPEC = register(
    ObjectiveSpec(
        MEAN_ANSWER_TOKENS,
        Direction.MAXIMIZE,
        "mean answer length (tokens)",
        worst=0.0,
        short="len",
        fmt=".1f",
        unmeasured=0.0,
        measure=mean_answer_tokens,
    )
)
