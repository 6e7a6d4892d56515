"""The search space: ARA's parameters, and heretic's directional ablation beside them when `search.methods` names
both (the method is then one more dimension), sized to the model's layer count L, with the config's overrides.

ARA: start_layer_index in [0, L/2] and end_layer_index in [L/2 + 1, L]: end's low is L/2 + 1 (not L/2) so that every
sampled layer range is non-empty. steer_w is sampled on a log scale.

Directional: heretic 1.4.0's own parametrisation (direction scope and index, and per component a weight kernel over
layers), with positions and distances as fractions of the last layer index so that one informed candidate fits every
model. Two ranges are wider than heretic's: max_weight reaches down to 0 (heretic: 0.8; gentler ablations keep
more draft acceptance, which heretic does not measure) and the kernel's position and reach cover every layer
(heretic: the upper 40 %), so heretic's plain full-weight ablation is a point of the space.

With `abliteration.experts`, the routed experts add their own dimensions: ARA's `experts_per_layer` (0 to the experts
per layer) and the directional method's own kernel (`experts.down_proj.*`). An informed trial that names none of
them takes their lowest values: the experts stay vanilla.

A config override fixes a parameter (`value`) or narrows its range (`low`, `high`) inside these bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import COMPONENTS, AraParameters
from mtp_abliterate.search.candidate.experts import COMPONENT as EXPERTS
from mtp_abliterate.search.config import Range
from mtp_abliterate.search.errors import UserError

INTEGER = {"start_layer_index", "end_layer_index", "k", "experts_per_layer"}
EXPERTS_PARAMETERS = ("experts_per_layer", f"{EXPERTS}.")  # the routed experts' dimensions
LOG = {"steer_w"}
SCOPES = ("global", "per layer")
METHODS = ("ara", "directional")
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


def full_ranges(method: str, num_layers: int, num_experts: int = 0) -> dict[str, tuple[float, float]]:
    """Each method's parameters and their widest ranges for a model of `num_layers` layers; the routed experts'
    dimensions when `num_experts` (per layer) is given (ARA: how many per layer; directional: a kernel of their own)."""
    if method == "ara":
        half = num_layers // 2
        return {
            "start_layer_index": (0, half),
            "end_layer_index": (min(half + 1, num_layers), num_layers),
            **AraParameters.RANGES,
            **({"experts_per_layer": (0, num_experts)} if num_experts else {}),
        }
    last = max(num_layers - 1, 1)
    per_component = {
        "max_weight": (0.0, 1.5),
        "position": (0.0, 1.0),
        "min_weight": (0.0, 1.0),
        "reach": (1 / last, 1.0),
    }
    components = (*COMPONENTS, *([EXPERTS] if num_experts else []))
    return {"direction_index": (0.4, 0.9)} | {
        f"{c}.{name}": bounds for c in components for name, bounds in per_component.items()
    }


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
        self.num_layers, self.methods = num_layers, tuple(m for m in METHODS if m in methods)
        self.params: dict[str, list[str]] = {}
        self.bounds: dict[str, Bounds] = {}
        problems = []
        known: set[str] = set()
        for method in self.methods:
            full = full_ranges(method, num_layers, num_experts)
            known |= set(full)
            self.params[method] = list(full)
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

    def suggest(self, trial: optuna.Trial) -> AraParameters | DirectionalParameters:
        method = trial.suggest_categorical("method", self.methods) if len(self.methods) > 1 else self.methods[0]
        values: dict[str, Any] = {}
        if method == "directional":
            values["direction_scope"] = trial.suggest_categorical("direction_scope", SCOPES)
        for name in self.params[method]:
            if name != "direction_index" or values.get("direction_scope") == "global":
                values[name] = self._suggest(trial, name)
        return candidate_of(values | {"method": method}, self.num_layers)

    def check_enqueued(self, params: dict[str, Any]) -> dict[str, Any]:
        """An informed first trial, completed with fixed values; raises SpaceError if it leaves the space. Entries
        without `method` are ARA's."""
        out = dict(params)
        method = out.pop("method", "ara")
        if method not in self.methods:
            raise SpaceError(
                f"search.enqueue {params}: method {method!r} is not searched (search.methods = {list(self.methods)})"
            )
        names = [n for n in self.params[method] if n != "direction_index" or out.get("direction_scope") == "global"]
        problems = []
        if method == "directional" and out.get("direction_scope") not in SCOPES:
            problems.append(f"direction_scope must be one of {SCOPES}")
        for name in names:
            b = self.bounds[name]
            if name not in out:
                if name.startswith(EXPERTS_PARAMETERS):  # an informed trial that names no experts: the fewest edited
                    out[name] = b.low
                    continue
                if b.low != b.high:
                    problems.append(f"{name} is missing")
                    continue
                out[name] = b.low
            elif not b.contains(out[name]):
                problems.append(f"{name}={out[name]} is outside [{b.low}, {b.high}]")
        categorical = {"direction_scope"} if method == "directional" else set()
        unknown = sorted(set(out) - set(names) - categorical)
        if unknown:
            problems.append(f"unknown parameter(s) {unknown}")
        if problems:
            raise SpaceError(f"search.enqueue {params}: " + "; ".join(problems) + " (fix it in the config)")
        fixed = {n: int(out[n]) if self.bounds[n].integer else float(out[n]) for n in names}
        fixed |= {n: out[n] for n in categorical}
        return fixed | ({"method": method} if len(self.methods) > 1 else {})


def method_of(params: dict[str, Any]) -> str:
    """A trial's method. A study of one method stores no `method`: directional parameters have a scope."""
    return params.get("method", "directional" if "direction_scope" in params else "ara")


def candidate_of(params: dict[str, Any], num_layers: int) -> AraParameters | DirectionalParameters:
    """A trial's parameters (as Optuna stores them) as the candidate they describe."""
    values = {k: v for k, v in params.items() if k != "method"}
    if method_of(params) == "ara":
        return AraParameters(**values)
    last = max(num_layers - 1, 1)
    kernels = {}
    for c in (*COMPONENTS, EXPERTS):
        if f"{c}.max_weight" in values:
            top = values[f"{c}.max_weight"]
            kernels[c] = {
                "max_weight": top,
                "max_weight_position": values[f"{c}.position"] * last,
                "min_weight": values[f"{c}.min_weight"] * top,  # heretic samples it as a fraction of max_weight
                "min_weight_distance": values[f"{c}.reach"] * last,
            }
    index = values["direction_index"] * last if values["direction_scope"] == "global" else None
    return DirectionalParameters(direction_index=index, parameters=kernels)
