"""The abliteration methods by name. Each method's module defines one `Method` (`METHOD`): its candidate's parameters
class, how the study samples it, how the resident model applies it, the model card's words. The config, the search
space, the resident model, the export and the CLI look a method up here instead of branching on its name.

Light on purpose: the config validates names (`NAMES`) without importing torch; a method's module (torch, heretic)
is imported the first time the method is looked up. A new method is one module and its line in `MODULES`
(docs/architecture.md, "How to extend").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from heretic.config import Settings

    from mtp_abliterate.search.candidate.resident import Resident

# name -> the module defining its METHOD. The order is the study's: Optuna's `method` categorical lists the searched
# methods in it, so it must not change (a stored study's distribution, a seeded study's samples).
MODULES = {
    "ara": "mtp_abliterate.search.candidate.method_ara",
    "directional": "mtp_abliterate.search.candidate.method_directional",
}
NAMES = tuple(MODULES)
DEFAULT = NAMES[0]  # the method of an enqueued trial, or of a stored one, that names none
MethodName = Literal[NAMES]  # type: ignore[valid-type]  # the config's field type, from the registry


@dataclass(frozen=True)
class Method:
    """What the tool needs of an abliteration method; every callable is pure but `apply`."""

    label: str  # the model card's words for it
    parameters: type[BaseModel]  # the candidate; has check_against(ModelShape, components), raising AbliterationError
    marker: str  # a parameter every stored trial of this method has: a one-method study stores no `method`
    # (num_layers, routed experts per layer or 0) -> each numeric parameter's widest range, in sampling order
    ranges: Callable[[int, int], dict[str, tuple[float, float]]]
    # a trial's values (as Optuna stores them, without `method`) and the layer count -> the candidate
    candidate: Callable[[dict[str, Any], int], BaseModel]
    apply: Callable[[Resident, Any], dict[str, Any]]  # the candidate on the resident model -> details ("modules")
    adapter: Callable[[Settings, int], tuple[int, bool]]  # (heretic settings, abliteration.rank) -> (rank, DoRA)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # categorical parameters, sampled first
    integer: frozenset[str] = frozenset()  # numeric parameters sampled as whole numbers
    log: frozenset[str] = frozenset()  # numeric parameters sampled on a log scale
    optional: tuple[str, ...] = ()  # name prefixes an enqueued trial may leave out: they take their lowest value
    sampled: Callable[[str, dict[str, Any]], bool] = lambda name, chosen: True  # given the choices made


def method(name: str) -> Method:
    """The registered method `name`; AbliterationError naming the known ones otherwise."""
    if name not in MODULES:
        from mtp_abliterate.search.candidate.ara import AbliterationError

        raise AbliterationError(f"unknown method {name!r}; use one of {list(NAMES)}")
    return importlib.import_module(MODULES[name]).METHOD


def method_of_candidate(candidate: BaseModel) -> Method:
    """The method whose parameters class `candidate` is."""
    return next(m for m in map(method, NAMES) if isinstance(candidate, m.parameters))
