"""Paired comparison of two acceptance measurements on the same prompts.

Every candidate of a study is served the same prompts, so the question "is A's acceptance above B's?" is answered
by per-prompt differences, not by two intervals whose width is mostly prompt-to-prompt spread. Each set's figure is
a ratio sum(x_p) / sum(d_p) over prompts (x: accepted tokens, or steps accepted at a position; d: verify steps), so
the difference of two ratios on the prompts both measured is linearised per prompt (the delta method):

    e_p = (x_Ap - R_A d_Ap) / mean(d_A) - (x_Bp - R_B d_Bp) / mean(d_B),   se^2 = sum_p e_p^2 / (n (n - 1)),

whose spread is that of the per-prompt differences. Sets are independent: the mix's difference is the weighted sum
of the sets' differences, its variance the weighted sum of theirs. A verdict is "better" or "worse" only beyond the
95 % interval, else "matching": a candidate identical to its reference is matching, never better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.96
PerPrompt = Mapping[str, Sequence[Any]]  # one set's `per_prompt`: "index", "steps", "accepted", "at"


@dataclass(frozen=True)
class Paired:
    """A - B on the prompts both measured: the difference, its 95 % half-width, and how many prompts it rests on."""

    difference: float
    halfwidth: float
    prompts: int

    @property
    def verdict(self) -> str:
        if self.difference - self.halfwidth > 0:
            return "better"
        if self.difference + self.halfwidth < 0:
            return "worse"
        return "matching"

    @property
    def upper(self) -> float:
        return self.difference + self.halfwidth

    def __str__(self) -> str:
        return f"{self.difference:+.3f} ± {self.halfwidth:.3f} (paired, {self.prompts} prompts)"


def _numerators(per_prompt: PerPrompt, position: int | None) -> list[float]:
    return list(per_prompt["accepted"]) if position is None else [at[position] for at in per_prompt["at"]]


def _set_difference(a: PerPrompt, b: PerPrompt, position: int | None) -> tuple[float, float, int]:
    """One set's ratio difference A - B on the common prompts, its variance, and the number of prompts."""
    where_b = {index: i for i, index in enumerate(b["index"])}
    pairs = [(i, where_b[index]) for i, index in enumerate(a["index"]) if index in where_b]
    xa, xb = _numerators(a, position), _numerators(b, position)
    sa = [(xa[i], a["steps"][i]) for i, _ in pairs]
    sb = [(xb[j], b["steps"][j]) for _, j in pairs]
    n, da, db = len(pairs), sum(d for _, d in sa), sum(d for _, d in sb)
    if n == 0 or da == 0 or db == 0:
        return 0.0, math.inf, n
    ra, rb = sum(x for x, _ in sa) / da, sum(x for x, _ in sb) / db
    if n < 2:
        return ra - rb, math.inf, n
    residuals = [
        (x1 - ra * d1) / (da / n) - (x2 - rb * d2) / (db / n) for (x1, d1), (x2, d2) in zip(sa, sb, strict=True)
    ]
    return ra - rb, sum(e * e for e in residuals) / (n * (n - 1)), n


def paired(
    a: Mapping[str, PerPrompt], b: Mapping[str, PerPrompt], weights: Mapping[str, float], position: int | None = None
) -> Paired:
    """A - B over the weighted mix of prompt sets (`a`, `b`: set name -> per-prompt counts), on accepted tokens per
    step, or on one position's rate (`position`). Prompts only one side measured are left out."""
    total = sum(weights.values())
    difference = variance = 0.0
    prompts = 0
    for name, w in weights.items():
        d, v, n = _set_difference(a[name], b[name], position)
        difference += w / total * d
        variance += (w / total) ** 2 * v
        prompts += n
    return Paired(difference, Z95 * math.sqrt(variance), prompts)


def per_prompt_of(details: Mapping[str, Any]) -> dict[str, PerPrompt]:
    """Each set's per-prompt counts from an acceptance measurement's details (`AcceptanceSets.compute`)."""
    return {name: s["per_prompt"] for name, s in details["sets"].items()}
