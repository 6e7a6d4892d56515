"""The objective interfaces: what an objective declares to the study (`ObjectiveSpec`), and how a measured one is
computed (`Objective.compute() -> ObjectiveResult`).

An objective object holds what it measures with (a model, a prompt set, a generation backend) and its baseline, so
the trial pipeline only asks it for a value; swapping the backend (HF generation today, a vLLM server later) does
not change the objective. The study builds its Optuna directions, trial records, tables, plots, model card rows and
MLflow metrics from the configured specs (`objectives/registry.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from mtp_abliterate.search.trial.result import TrialResult


class Direction(StrEnum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective as the study sees it. Values are compared as losses (a maximised value negated)."""

    name: str  # the Optuna and MLflow metric name (search/metrics.py for the built-ins)
    direction: Direction
    label: str  # plot axes and the model card's column
    worst: float | None = None  # hypervolume reference in loss space; None: 1.1 x the largest loss seen
    short: str = ""  # table column header; "" = the name
    fmt: str = ".3f"  # format spec of a value in tables, the progress line and the card
    unmeasured: float | None = None  # what a trial that stopped before measuring it records; None: always measured
    # The value, from what a trial has measured (None: not measured); None for the built-ins, whose values the
    # trial's own stages record (`TrialResult.metrics`).
    measure: Callable[[TrialResult], float | None] | None = None

    @property
    def header(self) -> str:
        return self.short or self.name

    def loss(self, value: float) -> float:
        return value if self.direction == Direction.MINIMIZE else -value

    def reference(self, losses: np.ndarray) -> float:
        if self.worst is not None:
            return self.worst
        return max(float(losses.max()) * 1.1, 1e-9)

    def recorded(self, metrics: Mapping[str, float]) -> float:
        """The value Optuna gets: the measured one, else `unmeasured`."""
        return metrics[self.name] if self.unmeasured is None else metrics.get(self.name, self.unmeasured)


@dataclass(frozen=True)
class ObjectiveResult:
    value: float
    details: dict[str, Any] = field(default_factory=dict)


class Objective(ABC):
    name: ClassVar[str]
    direction: ClassVar[Direction]

    @abstractmethod
    def compute(self) -> ObjectiveResult:
        """Measure the model as it is now."""
