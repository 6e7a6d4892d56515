"""Where an organism's artifacts live inside its directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The committed organisms, beside the packages in a source checkout: text-only, and in Gemma 4's release layout.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "organism"
RELEASE_ROOT = DEFAULT_ROOT.with_name("organism-release")


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
