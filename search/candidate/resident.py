"""The resident model of a study: loaded once, edited and reset per candidate, scored by KL and HF refusals.

Composes heretic's loading, the abliteration stage, the module-I/O cache and the objectives; knows nothing of
Optuna or MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from heretic.config import DatasetSpecification, RowNormalization
from heretic.utils import Prompt, load_prompts
from pydantic import BaseModel, ValidationError
from transformers import AutoConfig

from mtp_abliterate.objectives.base import ObjectiveResult
from mtp_abliterate.objectives.kld import KLDivergence
from mtp_abliterate.objectives.refusal import RefusalRate
from mtp_abliterate.search.candidate.abliterator import Abliterator, load_adapter_model, refusal_directions
from mtp_abliterate.search.candidate.ara import COMPONENTS, AbliterationError, ModelShape
from mtp_abliterate.search.candidate.checkpoint import locate
from mtp_abliterate.search.candidate.heretic_bridge import heretic_settings, quiet_heretic
from mtp_abliterate.search.candidate.methods import method, method_of_candidate
from mtp_abliterate.search.candidate.module_io import ModuleIO, cache_key, load_or_capture
from mtp_abliterate.search.config import PromptSet, StudyConfig
from mtp_abliterate.search.hosts import host_id


def parse_parameters(name: str, raw: dict[str, Any], shape: ModelShape) -> BaseModel:
    """Validate a candidate's parameters against the method's ranges and the model's shape (no loading)."""
    try:
        params = method(name).parameters(**raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise AbliterationError(f"{name} parameters: {problems}") from None
    params.check_against(shape, list(COMPONENTS))
    return params


def shape_of(model: str) -> ModelShape:
    """Decoder layers and routed experts of a model (a folder or a cached hub id), from its config alone."""
    config = AutoConfig.from_pretrained(locate(model).path).get_text_config()
    experts = config.num_experts if getattr(config, "enable_moe_block", False) else 0
    return ModelShape(config.num_hidden_layers, experts or 0)


def _spec(ps: PromptSet) -> DatasetSpecification:
    return DatasetSpecification(dataset=ps.source, split=ps.split, column=ps.column)


class Resident:
    """The vanilla model in memory with revertible candidates, and its two HF-side objectives."""

    def __init__(self, cfg: StudyConfig, cache_dir: Path | None) -> None:
        """heretic's log goes to `cache_dir`'s study folder (`heretic.log`); raises CheckpointError for a model that
        cannot be found and ModelLoadError, with heretic's cause, for one that cannot be loaded."""
        quiet_heretic(cache_dir.parent / "heretic.log" if cache_dir else None)
        self.model_id = cfg.model.target
        self.checkpoint = locate(self.model_id)  # hub ids: the offline cache's snapshot, loaded by path
        ab = cfg.abliteration
        self.settings = heretic_settings(
            self.checkpoint.path,
            good=_spec(cfg.prompts.harmless_train),
            bad=_spec(cfg.prompts.harmful_train),
            good_eval=_spec(cfg.prompts.harmless_eval),
            bad_eval=_spec(cfg.prompts.harmful_eval),
            system_prompt=cfg.model.system_prompt,
            batch_size=ab.batch_size,
            max_response_length=ab.max_response_length,
            seed=cfg.search.seed,
            dtype=cfg.model.dtype,
            row_normalization=RowNormalization(ab.row_normalization),
            lora_rank=ab.rank,
        )
        self.model = load_adapter_model(self.settings, ab.method, ab.rank)
        self.abliterator = Abliterator(self.model, seed=cfg.search.seed, workers=ab.workers)
        self.cache_dir = cache_dir
        self._io: ModuleIO | None = None
        self.io_key: str | None = None  # identity of the captured module I/O (model, prompts, batch)
        self._directions: torch.Tensor | None = None
        # scored as deployed: the merged checkpoint weights, not the adapters' BF16 forward (docs/parity.md)
        self.kld = KLDivergence(self.model, self.prompts("good_evaluation_prompts"), self.abliterator.deployed)
        self.refusal = RefusalRate(self.respond, self.prompts("bad_evaluation_prompts"))

    def prompts(self, field: str) -> list[Prompt]:
        return load_prompts(self.settings, getattr(self.settings, field))

    def respond(self, prompts: list[Prompt]) -> list[str]:
        with self.abliterator.deployed():
            return self.model.get_responses_batched(prompts, skip_special_tokens=True)

    def module_io(self) -> tuple[ModuleIO, bool]:
        """Captured once (vanilla), then from memory or the on-disk cache. Returns (io, from disk cache)."""
        if self._io is not None:
            return self._io, True
        self.abliterator.reset()
        good, bad = self.prompts("good_prompts"), self.prompts("bad_prompts")
        key = cache_key(self.model_id, self.weights_digest(), good, bad, self.settings.batch_size, host_id())
        self.io_key = key
        self._io, hit = load_or_capture(self.model, self.abliterator.experts.experts, good, bad, self.cache_dir, key)
        return self._io, hit

    def local_dir(self) -> Path:
        """The target's folder on disk (a hub id's snapshot in the local HF cache, never downloaded)."""
        return self.checkpoint.path

    def weights_digest(self) -> str:
        """Identity of the loaded weights: a hub id's snapshot commit, or the local weight files' sizes+mtimes."""
        return self.checkpoint.identity

    def directions(self) -> torch.Tensor:
        if self._directions is None:
            self.abliterator.reset()
            self._directions = refusal_directions(self.model, self.settings)
        return self._directions

    def apply(self, params: BaseModel) -> dict[str, Any]:
        """The candidate on the model, as its method applies it (search/candidate/methods.py); returns details."""
        return method_of_candidate(params).apply(self, params)

    def evaluate(self) -> dict[str, ObjectiveResult]:
        return {"kld": self.kld.compute(), "refusal_rate": self.refusal.compute()}
