"""Where an organism's artifacts live inside its directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The committed organism, beside the packages in a source checkout.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "organism"


@dataclass(frozen=True)
class OrganismLayout:
    root: Path = DEFAULT_ROOT

    @property
    def body(self) -> Path:
        return self.root / "body"

    @property
    def draft(self) -> Path:
        return self.root / "draft"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts"

    @property
    def card(self) -> Path:
        return self.root / "card.json"

    def prompt_file(self, kind: str, split: str) -> Path:
        """kind: harmful | harmless; split: train | eval."""
        return self.prompts / f"{kind}_{split}.txt"
