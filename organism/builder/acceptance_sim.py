"""Greedy speculative decoding simulated with transformers forward passes, scored with vLLM's counters.

Greedy speculative decoding emits exactly the body's greedy text, so a round structure can be replayed over that
text: at a round whose last emitted token sits at position p the draft proposes tokens p+1..p+n, the body accepts
the longest matching prefix (k tokens) and adds one token of its own, and the next round starts at p+k+1. Proposals
past the end of the answer count as rejected; vLLM scores them against the body's own continuation past its stop
token (tests/test_acceptance.py), so the replay can under-count an answer's last round. Not HF assisted generation:
its Gemma 4 candidate generator uses the wrong hidden state on the first round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.search.draft.wiring import Example, body_states, draft_chain, pad_batch


@dataclass
class AcceptanceCounts:
    """vLLM's spec-decode counters: drafts, and per position the drafts whose first i+1 tokens were all accepted."""

    num_drafts: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.accepted_per_pos]

    @property
    def mean_accepted_tokens(self) -> float:
        return sum(self.rates)


def replay_rounds(tokens: Sequence[int], prompt_len: int, proposals: Sequence[Sequence[int]], counts: AcceptanceCounts):
    """Add one sequence's rounds to `counts`; `proposals[p]` are the draft's n tokens for a query at position p."""
    last = len(tokens) - 1
    p = prompt_len
    while p < last:
        k = 0
        for j, d in enumerate(proposals[p]):
            if p + 1 + j > last or d != tokens[p + 1 + j]:
                break
            k += 1
        counts.num_drafts += 1
        for i in range(k):
            counts.accepted_per_pos[i] += 1
        p += k + 1


@torch.no_grad()
def simulate_acceptance(
    body: Gemma4ForCausalLM,
    draft: Gemma4AssistantForCausalLM,
    examples: Sequence[Example],
    steps: int,
    pad_id: int,
    batch_size: int = 32,
) -> AcceptanceCounts:
    """Counters over `examples` (prompt + the body's own greedy response), with HF's sliding-window convention."""
    counts = AcceptanceCounts(accepted_per_pos=[0] * steps)
    sliding_entries = body.config.sliding_window + 1
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, attn, _ = pad_batch(chunk, pad_id)
        _, hidden, kv = body_states(body, ids, attn)
        chain = draft_chain(draft, body.get_input_embeddings(), ids, hidden, kv, steps, sliding_entries)
        proposals = torch.stack([logits.argmax(-1) for logits in chain], dim=-1)  # [B, T, steps]
        for i, ex in enumerate(chunk):
            replay_rounds(ex.ids, ex.prompt_len, proposals[i].tolist(), counts)
    return counts
