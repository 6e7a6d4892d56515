"""The search space: the methods `search.methods` names (ARA, heretic's directional ablation, or both: the method is
then one more dimension), each sampled as its registered `Method` says (search/candidate/methods.py, and each
method's module for its ranges), sized to the model's layer count L, with the config's overrides.

A config override fixes a parameter (`value`) or narrows its range (`low`, `high`) inside these bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import BaseModel

from mtp_abliterate.search.candidate.components import COMPONENTS
from mtp_abliterate.search.candidate.methods import DEFAULT, NAMES, method
from mtp_abliterate.search.config import Range
from mtp_abliterate.search.errors import UserError

# heretic's plain full-weight ablation (every layer, weight 1, per-layer directions) as a point of this space
FULL_WEIGHT_DIRECTIONAL: dict[str, float | str] = {
    "method": "directional",
    "direction_scope": "per layer",
    **{
        f"{c}.{name}": value
        for c in COMPONENTS
        for name, value in (("max_weight", 1.0), ("position", 0.0), ("min_weight", 1.0), ("reach", 1.0))
    },
}


class SpaceError(UserError, ValueError):
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
    """Bounds per parameter and `suggest(trial)` -> a candidate; a fixed parameter is a one-value range."""

    def __init__(
        self,
        num_layers: int,
        overrides: dict[str, Range] | None = None,
        methods: tuple[str, ...] = ("ara",),
        num_experts: int = 0,
    ) -> None:
        """`num_experts`: routed experts per layer when ARA edits experts (abliteration.experts), else 0."""
        # a fixed order: the method's categorical distribution must not change when a config lists them differently
        self.num_layers, self.methods = num_layers, tuple(m for m in NAMES if m in methods)
        self.params: dict[str, list[str]] = {}
        self.bounds: dict[str, Bounds] = {}
        problems = []
        known: set[str] = set()
        for name in self.methods:
            m = method(name)
            full = m.ranges(num_layers, num_experts)
            known |= set(full)
            self.params[name] = list(full)
            for param, (low, high) in full.items():
                r = (overrides or {}).get(param)
                if r is not None:
                    new_low, new_high = (r.value, r.value) if r.value is not None else (r.low, r.high)
                    if not (low <= new_low <= new_high <= high):
                        problems.append(f"search.space.{param}: [{new_low}, {new_high}] is not inside [{low}, {high}]")
                        continue
                    if param in m.integer and not (float(new_low).is_integer() and float(new_high).is_integer()):
                        problems.append(f"search.space.{param}: needs whole numbers")
                        continue
                    low, high = new_low, new_high
                self.bounds[param] = Bounds(low, high, param in m.integer, param in m.log)
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            problems.append(f"search.space: unknown parameter(s) {unknown}; known: {sorted(known)}")
        if problems:
            raise SpaceError("; ".join(problems) + " (fix the overrides in the config)")

    def _suggest(self, trial: optuna.Trial, name: str) -> float:
        b = self.bounds[name]
        if b.integer:
            return trial.suggest_int(name, int(b.low), int(b.high))
        return trial.suggest_float(name, b.low, b.high, log=b.log)

    def suggest(self, trial: optuna.Trial) -> BaseModel:
        """The method, then its categorical parameters, then its numeric ones in their order: Optuna's stored names
        and a seeded study's samples depend on this order."""
        name = trial.suggest_categorical("method", self.methods) if len(self.methods) > 1 else self.methods[0]
        m = method(name)
        values: dict[str, Any] = {c: trial.suggest_categorical(c, options) for c, options in m.choices.items()}
        for param in self.params[name]:
            if m.sampled(param, values):
                values[param] = self._suggest(trial, param)
        return candidate_of(values | {"method": name}, self.num_layers)

    def check_enqueued(self, params: dict[str, Any]) -> dict[str, Any]:
        """An informed first trial, completed with fixed values; raises SpaceError if it leaves the space. Entries
        without `method` are the default method's (ARA)."""
        out = dict(params)
        name = out.pop("method", DEFAULT)
        if name not in self.methods:
            raise SpaceError(
                f"search.enqueue {params}: method {name!r} is not searched (search.methods = {list(self.methods)})"
            )
        m = method(name)
        names = [n for n in self.params[name] if m.sampled(n, out)]
        problems = [f"{c} must be one of {options}" for c, options in m.choices.items() if out.get(c) not in options]
        for param in names:
            b = self.bounds[param]
            if param not in out:
                if param.startswith(m.optional):  # e.g. an informed trial that names no experts: the fewest edited
                    out[param] = b.low
                    continue
                if b.low != b.high:
                    problems.append(f"{param} is missing")
                    continue
                out[param] = b.low
            elif not b.contains(out[param]):
                problems.append(f"{param}={out[param]} is outside [{b.low}, {b.high}]")
        unknown = sorted(set(out) - set(names) - set(m.choices))
        if unknown:
            problems.append(f"unknown parameter(s) {unknown}")
        if problems:
            raise SpaceError(f"search.enqueue {params}: " + "; ".join(problems) + " (fix it in the config)")
        fixed = {n: int(out[n]) if self.bounds[n].integer else float(out[n]) for n in names}
        fixed |= {c: out[c] for c in m.choices}
        return fixed | ({"method": name} if len(self.methods) > 1 else {})


def method_of(params: dict[str, Any]) -> str:
    """A trial's method. A study of one method stores no `method`: each method's marker parameter tells."""
    if "method" in params:
        return params["method"]
    return next((n for n in NAMES if method(n).marker in params), DEFAULT)


def candidate_of(params: dict[str, Any], num_layers: int) -> BaseModel:
    """A trial's parameters (as Optuna stores them) as the candidate they describe."""
    values = {k: v for k, v in params.items() if k != "method"}
    return method(method_of(params)).candidate(values, num_layers)
