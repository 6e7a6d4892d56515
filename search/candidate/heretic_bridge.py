"""heretic-llm 1.4.0 used as a library: settings that read only what we pass, a log instead of its prints, the
release checkpoint's layout, and the chat tokenization vLLM serves.

heretic's `Settings` parses sys.argv, HERETIC_* variables and ./config.toml (an unknown flag of the host program
exits with status 2), and its Model/Evaluator print through a module-level rich `print`. `heretic.main` is never
imported: it may construct Settings at import time.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import heretic.evaluator
import heretic.model
from heretic.config import DatasetSpecification, RowNormalization, Settings
from heretic.model import Model
from heretic.utils import Prompt
from transformers import BatchEncoding

from mtp_abliterate.search.errors import UserError

MARKUP = re.compile(r"\[/?[a-z ]*\]")


class ModelLoadError(UserError, RuntimeError):
    """heretic could not load the model; the message carries its cause and where the whole log is."""


class LibrarySettings(Settings):
    """heretic's Settings fed by keyword arguments only."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings,)


class _HereticLog:
    """heretic's prints, as plain lines: appended to a file when one is set, the last ones kept for errors."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.recent: deque[str] = deque(maxlen=50)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        text = MARKUP.sub("", " ".join(str(a) for a in args))
        self.recent.extend(text.splitlines())
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(text + "\n")


HERETIC_LOG = _HereticLog()


class _NoProcessor:
    """Stands in for `AutoProcessor` in heretic's loader. heretic loads a multimodal model's processor only to save
    it with its own CLI; this project copies processor files byte for byte instead, and Gemma 4's processor imports
    torchvision (its video processor), which the main environment does not have."""

    @staticmethod
    def from_pretrained(*args: Any, **kwargs: Any) -> None:
        return None


def quiet_heretic(log_path: Path | None = None) -> None:
    """Send heretic's progress prints (meant for its own CLI) to `log_path` instead of the terminal."""
    heretic.model.print = heretic.evaluator.print = HERETIC_LOG
    heretic.model.AutoProcessor = _NoProcessor
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        HERETIC_LOG.path = log_path


@contextmanager
def load_errors(model: str | Path) -> Iterator[None]:
    """Turn heretic's "Failed to load model with all configured dtypes" into its per-dtype causes."""
    HERETIC_LOG.recent.clear()
    try:
        yield
    except Exception as e:
        causes = [line.strip("* ") for line in HERETIC_LOG.recent if line.lstrip("* ").startswith("Failed")]
        cause = "; ".join(causes) or f"{type(e).__name__}: {e}"
        where = f" (full log: {HERETIC_LOG.path})" if HERETIC_LOG.path else ""
        raise ModelLoadError(f"could not load {model}: {cause}{where}") from e


class ServedTokenization(Model):
    """heretic's Model, tokenizing chats exactly as vLLM's chat endpoint does: the rendered template without added
    special tokens. heretic adds them, so a template that emits `<bos>` itself (Gemma 4's) would be scored as
    `<bos><bos>…` on the HF side (module I/O, KL, HF refusals) while vLLM serves one `<bos>`."""

    def chat_token_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        """The prompt token ids this model scores for each chat (vLLM's `prompt_token_ids` for the same chat)."""
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in self.render(prompts)]

    def render(self, prompts: list[Prompt]) -> list[str]:
        """Each chat rendered by the model's template (system and user turn, generation prompt), as heretic does."""
        chats = [[{"role": "system", "content": p.system}, {"role": "user", "content": p.user}] for p in prompts]
        rendered = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        return [t + (self.settings.response_prefix or "") for t in cast(list[str], rendered)]

    def generate(self, prompts: list[Prompt], **kwargs: Any) -> tuple[BatchEncoding, Any]:
        inputs = self.tokenizer(
            self.render(prompts),
            return_tensors="pt",
            padding=True,
            return_token_type_ids=False,
            add_special_tokens=False,
        ).to(self.model.device)
        outputs = self.model.generate(
            **inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id, do_sample=False
        )  # greedy, as heretic
        return inputs, outputs


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
