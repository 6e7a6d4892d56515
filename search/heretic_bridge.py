"""heretic-llm 1.4.0 used as a library: settings that read only what we pass, and quiet model/evaluator.

heretic's `Settings` parses sys.argv, HERETIC_* variables and ./config.toml (an unknown flag of the host program
exits with status 2), and its Model/Evaluator print through a module-level rich `print`. `heretic.main` is never
imported: it may construct Settings at import time.
"""

from __future__ import annotations

from pathlib import Path

import heretic.evaluator
import heretic.model
from heretic.config import DatasetSpecification, RowNormalization, Settings


class LibrarySettings(Settings):
    """heretic's Settings fed by keyword arguments only."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings,)


def quiet_heretic() -> None:
    """Silence heretic's progress prints (they are for its own CLI)."""
    heretic.model.print = heretic.evaluator.print = lambda *args, **kwargs: None


def prompt_spec(source: str | Path, split: str | None = None) -> DatasetSpecification:
    """A local text file (one prompt per line) or a dataset id, in heretic's conventions."""
    return DatasetSpecification(dataset=str(source), split=split)


def heretic_settings(
    model: str | Path,
    *,
    good: DatasetSpecification,
    bad: DatasetSpecification,
    good_eval: DatasetSpecification,
    bad_eval: DatasetSpecification,
    system_prompt: str,
    batch_size: int,
    max_response_length: int,
    seed: int,
    dtype: str = "auto",
    row_normalization: RowNormalization = RowNormalization.FULL,
    lora_rank: int = 3,
) -> LibrarySettings:
    """Explicit batch size, response prefix and seed: their defaults only work inside heretic's own CLI."""
    return LibrarySettings(
        model=str(model),
        dtypes=[dtype],
        batch_size=batch_size,
        max_response_length=max_response_length,
        response_prefix="",
        seed=seed,
        system_prompt=system_prompt,
        row_normalization=row_normalization,
        full_normalization_lora_rank=lora_rank,
        good_prompts=good,
        bad_prompts=bad,
        good_evaluation_prompts=good_eval,
        bad_evaluation_prompts=bad_eval,
    )
