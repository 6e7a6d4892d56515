"""Refusal rate: the share of harmful evaluation prompts whose greedy response is a refusal.

A response is a refusal if it is empty, or if, lower-cased with `*` removed, `’` mapped to `'` and whitespace
collapsed, it contains one of heretic 1.4.0's refusal markers (imported from heretic, not copied). Responses come
from a `Responder`, so the same objective counts HF generations now and served ones later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from heretic.config import Settings
from heretic.utils import Prompt

from mtp_abliterate.objectives.base import Objective, ObjectiveResult
from mtp_abliterate.objectives.registry import REFUSAL
from mtp_abliterate.objectives.served import Reply, texts_digest

HERETIC_REFUSAL_MARKERS: tuple[str, ...] = tuple(Settings.model_fields["refusal_markers"].default)

Responder = Callable[[Sequence[Prompt]], list[str]]


def is_refusal(response: str, markers: Sequence[str] = HERETIC_REFUSAL_MARKERS) -> bool:
    if not response.strip():
        return True  # an empty answer is no answer
    text = " ".join(response.lower().replace("*", "").replace("’", "'").split())
    return any(marker.lower() in text for marker in markers)


class RefusalRate(Objective):
    name, direction = REFUSAL.name, REFUSAL.direction

    def __init__(
        self,
        respond: Responder,
        prompts: Sequence[Prompt],
        markers: Sequence[str] = HERETIC_REFUSAL_MARKERS,
        samples: int = 5,
    ) -> None:
        self.respond = respond
        self.prompts = list(prompts)
        self.markers = tuple(markers)
        self.samples = samples

    def compute(self) -> ObjectiveResult:
        responses = self.respond(self.prompts)
        flags = [is_refusal(r, self.markers) for r in responses]
        refusals = sum(flags)
        sample = [
            {"prompt": p.user, "response": r, "refusal": f}
            for p, r, f in list(zip(self.prompts, responses, flags, strict=True))[: self.samples]
        ]
        details = {"refusals": refusals, "num_prompts": len(self.prompts), "samples": sample}
        return ObjectiveResult(refusals / len(self.prompts), details | {"responses_sha256": texts_digest(responses)})


def served_responder(base_url: str, served_name: str, max_tokens: int, concurrency: int = 4) -> Responder:
    """Greedy answers from a vLLM server, for the same prompts the HF path answers."""
    from mtp_abliterate.objectives.served import answer_all

    def respond(prompts: Sequence[Prompt]) -> list[str]:
        return [r.text for r in answer_all(base_url, served_name, prompts, max_tokens, concurrency)]

    return respond


def prefix_responder(replies: Sequence[Reply], decode: Callable[[list[int]], str], max_tokens: int) -> Responder:
    """Responses cut from longer greedy answers to the same prompts, in order: each answer's first `max_tokens`
    tokens, which greedy decoding makes the answer a `max_tokens` request gets. Answers within the limit are used
    as served; longer ones are cut at the text of their first `max_tokens` token ids, aligned to the served text
    (the server's detokenizer keeps a leading space that decoding the answer alone drops)."""

    def cut(r: Reply) -> str:
        if r.completion_tokens <= max_tokens:
            return r.text
        full, head = decode(r.token_ids), decode(r.token_ids[:max_tokens])
        if r.text.endswith(full) and full.startswith(head):
            return r.text[: len(r.text) - len(full) + len(head)]
        return head

    texts = [cut(r) for r in replies]

    def respond(prompts: Sequence[Prompt]) -> list[str]:
        if len(prompts) != len(texts):
            raise ValueError(f"{len(texts)} answers for {len(prompts)} prompts")
        return texts

    return respond
