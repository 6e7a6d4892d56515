"""The objectives a study can optimise, by metric name, and the list a config optimises (`objective_specs`).

The three built-ins come first, in this order: refusal rate (min), KL divergence (min) and the acceptance objective
(max; `search.acceptance_objective`). Constraints, adaptive measurement, the winner and the paired comparisons know
them by that position. `search.extra_objectives` adds more after them: a module registers its spec (with a `measure`
that reads what the trial has) when imported, and the config names it `module:name` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from mtp_abliterate.objectives.base import Direction, ObjectiveSpec
from mtp_abliterate.search.metrics import ACCEPTED_PER_STEP, KLD, REFUSAL_RATE

if TYPE_CHECKING:
    from mtp_abliterate.search.config import StudyConfig

REGISTRY: dict[str, ObjectiveSpec] = {}
BUILT_INS = 3  # refusal rate, KL, acceptance: the first values of every trial


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    REGISTRY[spec.name] = spec
    return spec


# worst: the hypervolume's reference, just past a refusal rate of 1 so that such trials still count
REFUSAL = register(
    ObjectiveSpec(
        REFUSAL_RATE, Direction.MINIMIZE, "refusal rate", worst=1.01, short="refusal", fmt=".2f", unmeasured=1.0
    )
)
KL = register(ObjectiveSpec(KLD, Direction.MINIMIZE, "KL divergence", short="KL", fmt=".3g"))  # always measured
ACCEPTANCE = register(
    ObjectiveSpec(
        ACCEPTED_PER_STEP,
        Direction.MAXIMIZE,
        "accepted tokens / verify step",
        worst=0.0,
        short="acc/step",
        unmeasured=0.0,
    )
)
_BUILT_IN = re.compile(rf"^({REFUSAL_RATE}|{KLD}|{ACCEPTED_PER_STEP}|acc_pos_[0-9]+)$")


def acceptance(scalar: str, n: int) -> ObjectiveSpec:
    """The acceptance objective at n draft tokens: accepted per step, or one position's rate (`acc_pos_<i>`)."""
    if scalar == ACCEPTED_PER_STEP:
        return replace(ACCEPTANCE, label=f"{ACCEPTANCE.label} (n={n})")
    return replace(ACCEPTANCE, name=scalar, label=f"{scalar} (n={n})", short="")


def lookup(entry: str) -> ObjectiveSpec:
    """A measured objective beyond the built-ins: `name` if registered, or `module:name` (the module is imported
    first, and registers it). Raises ValueError naming the fix."""
    module, _, name = entry.rpartition(":")
    if _BUILT_IN.match(name):
        raise ValueError(f"{name} is a built-in objective, always optimised; remove it from extra_objectives")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(
                f"objective {entry}: {module} cannot be imported ({e}); fix the module path or put its folder on "
                "PYTHONPATH"
            ) from None
    spec = REGISTRY.get(name)
    if spec is None:
        known = ", ".join(n for n in REGISTRY if not _BUILT_IN.match(n)) or "none"
        raise ValueError(
            f"objective {entry}: no such objective (registered beyond the built-ins: {known}); name a module that "
            "registers it as `module:name`"
        )
    if spec.measure is None:
        raise ValueError(f"objective {entry} has no `measure`; give its ObjectiveSpec one")
    return spec


def objective_specs(cfg: StudyConfig) -> list[ObjectiveSpec]:
    """The study's objectives in Optuna's value order: the built-ins, then `search.extra_objectives`."""
    built_ins = [REFUSAL, KL, acceptance(cfg.search.acceptance_objective, cfg.serving.num_speculative_tokens)]
    return [*built_ins, *(lookup(entry) for entry in cfg.search.extra_objectives)]
