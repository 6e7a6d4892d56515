"""The ARA search space: the ranges below, sized to the model's layer count L, with the config's overrides.

start_layer_index in [0, L/2] and end_layer_index in [L/2 + 1, L]: end's low is L/2 + 1 (not L/2) so
that every sampled layer range is non-empty (start = end = L/2 would edit nothing). steer_w is sampled on a log
scale. A config override fixes a parameter (`value`) or narrows its range (`low`, `high`) inside these bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.config import Range

INTEGER = {"start_layer_index", "end_layer_index", "k"}
LOG = {"steer_w"}


class SpaceError(ValueError):
    """An override or an enqueued trial that does not fit the space; the message names the fix."""


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float
    integer: bool
    log: bool

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())


class SearchSpace:
    """Bounds per parameter and `suggest(trial) -> AraParameters`; a fixed parameter is a one-value range."""

    def __init__(self, num_layers: int, overrides: dict[str, Range] | None = None) -> None:
        half = num_layers // 2
        full: dict[str, tuple[float, float]] = {
            "start_layer_index": (0, half),
            "end_layer_index": (min(half + 1, num_layers), num_layers),
            **AraParameters.RANGES,
        }
        problems = []
        self.bounds: dict[str, Bounds] = {}
        for name, (low, high) in full.items():
            r = (overrides or {}).get(name)
            if r is not None:
                new_low, new_high = (r.value, r.value) if r.value is not None else (r.low, r.high)
                if not (low <= new_low <= new_high <= high):
                    problems.append(f"search.space.{name}: [{new_low}, {new_high}] is not inside [{low}, {high}]")
                    continue
                if name in INTEGER and not (float(new_low).is_integer() and float(new_high).is_integer()):
                    problems.append(f"search.space.{name}: needs whole numbers")
                    continue
                low, high = new_low, new_high
            self.bounds[name] = Bounds(low, high, name in INTEGER, name in LOG)
        unknown = sorted(set(overrides or {}) - set(full))
        if unknown:
            problems.append(f"search.space: unknown parameter(s) {unknown}; known: {sorted(full)}")
        if problems:
            raise SpaceError("; ".join(problems) + " (fix the overrides in the config)")

    def suggest(self, trial: optuna.Trial) -> AraParameters:
        values: dict[str, Any] = {}
        for name, b in self.bounds.items():
            if b.integer:
                values[name] = trial.suggest_int(name, int(b.low), int(b.high))
            else:
                values[name] = trial.suggest_float(name, b.low, b.high, log=b.log)
        return AraParameters(**values)

    def check_enqueued(self, params: dict[str, float]) -> dict[str, float]:
        """An informed first trial, completed with fixed values; raises SpaceError if it leaves the space."""
        out = dict(params)
        problems = []
        for name, b in self.bounds.items():
            if name not in out:
                if b.low != b.high:
                    problems.append(f"{name} is missing")
                    continue
                out[name] = b.low
            elif not b.contains(out[name]):
                problems.append(f"{name}={out[name]} is outside [{b.low}, {b.high}]")
        unknown = sorted(set(out) - set(self.bounds))
        if unknown:
            problems.append(f"unknown parameter(s) {unknown}")
        if problems:
            raise SpaceError(f"search.enqueue {params}: " + "; ".join(problems) + " (fix it in the config)")
        return {n: int(v) if self.bounds[n].integer else float(v) for n, v in out.items()}
