"""The study's prompt sets, loaded by heretic's loader (text file or dataset, split, column) with its system prompt.

A text file is read as UTF-8, one prompt per line: blank lines (spaces only) are skipped, CRLF line ends and the
spaces around each line are stripped, a line of any length is one prompt (a prompt longer than the server's context,
`--max-model-len`, fails the stage that serves it), duplicates are kept (each is served and counted), and a `split`
such as "[:100]" counts prompts, not lines. `config check` (search/config.py) refuses a file that is not UTF-8,
naming the first bad line, and one with no prompt.
"""

from __future__ import annotations

from heretic.utils import Prompt, load_prompts

from mtp_abliterate.search.candidate.heretic_bridge import LibrarySettings, prompt_spec
from mtp_abliterate.search.config import ModelSource, PromptSet


def load_prompt_set(model: ModelSource, ps: PromptSet) -> list[Prompt]:
    """`ps` as chats with `model`'s system prompt (heretic reads the target's chat template)."""
    settings = LibrarySettings(model=model.target, system_prompt=model.system_prompt)
    spec = prompt_spec(ps.source, ps.split).model_copy(update={"column": ps.column})
    return load_prompts(settings, spec)
