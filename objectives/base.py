"""The objective interface: a name, a direction, and `compute() -> ObjectiveResult`.

An objective object holds what it measures with (a model, a prompt set, a generation backend) and its baseline, so
the trial pipeline only asks it for a value; swapping the backend (HF generation today, a vLLM server later) does
not change the objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar


class Direction(StrEnum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


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
