"""The study's prompt sets, loaded by heretic's loader (text file or dataset, split, column) with its system prompt."""

from __future__ import annotations

from heretic.utils import Prompt, load_prompts

from mtp_abliterate.search.candidate.heretic_bridge import LibrarySettings, prompt_spec
from mtp_abliterate.search.config import PromptSet, StudyConfig


def load_prompt_set(cfg: StudyConfig, ps: PromptSet) -> list[Prompt]:
    settings = LibrarySettings(model=cfg.resolve(cfg.model.target), system_prompt=cfg.model.system_prompt)
    spec = prompt_spec(cfg.resolve(ps.source), ps.split).model_copy(update={"column": ps.column})
    return load_prompts(settings, spec)
