"""KL divergence from the vanilla model, exactly heretic 1.4.0's definition.

KL(vanilla || candidate) over the full vocabulary at the first generated token, averaged over the harmless
evaluation prompts (`F.kl_div(candidate_logprobs, vanilla_logprobs, reduction="batchmean", log_target=True)`), from
raw logits (processed scores carry Gemma 4's -inf suppress_tokens and make KL NaN).

The candidate is scored as deployed when a `deployed` context is given (the resident's: its merged checkpoint
weights in place of the adapters), so the value is the one heretic's `--evaluate-model` gives for the saved
checkpoint (docs/parity.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch.nn.functional as F
from heretic.model import Model
from heretic.utils import Prompt

from mtp_abliterate.objectives.base import Objective, ObjectiveResult
from mtp_abliterate.objectives.registry import KL


class KLDivergence(Objective):
    name, direction = KL.name, KL.direction

    def __init__(
        self,
        model: Model,
        prompts: Sequence[Prompt],
        deployed: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        """Construct while `model` is vanilla: the vanilla log-probabilities are taken here, once. `deployed`: the
        context in which `model` computes the candidate as deployed (default: as it is)."""
        self.model = model
        self.prompts = list(prompts)
        self.deployed = deployed
        self.vanilla_logprobs = model.get_logprobs_batched(self.prompts)

    def compute(self) -> ObjectiveResult:
        with self.deployed():
            logprobs = self.model.get_logprobs_batched(self.prompts)
        kl = F.kl_div(logprobs, self.vanilla_logprobs, reduction="batchmean", log_target=True).item()
        return ObjectiveResult(kl, {"num_prompts": len(self.prompts)})
