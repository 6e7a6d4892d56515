"""The organism's two transformers models and the forward passes that wire the MTP draft to the body.

The wiring mirrors Gemma 4's assistant (and vLLM's `gemma4_mtp`): for a query at position p the draft reads
cat(body's scaled input embedding of token p, body's final normed hidden state at p-1), attends to the body's KV of
positions < p (the last sliding and last full layer's, RoPE'd and k-normed), keeps position p for every chained
step, and feeds its own `post_projection` output as the next step's state. Every position p is drafted in one
batched pass, so training and measurement cost a handful of forwards per batch, not one per round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM, PreTrainedModel

FULL, SLIDING = "full_attention", "sliding_attention"
KVStates = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Example:
    """A tokenized chat: prompt (with generation prompt) followed by the response and its end-of-turn token.

    `tail`: the body's greedy tokens after the response's last token. A server never emits them, but vLLM scores the
    last round's proposals past the stop token against them (acceptance is counted before the stop is applied), so a
    draft that is to be accepted there must learn them.
    """

    ids: list[int]
    prompt_len: int
    tail: tuple[int, ...] = ()


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (each example's tail after its response), attention mask, and a mask of response positions
    (the tokens the model must produce; the tail is not one of them)."""
    width = max(len(e.ids) + len(e.tail) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids) + len(e.tail)] = torch.tensor([*e.ids, *e.tail])
        attn[i, : len(e.ids) + len(e.tail)] = 1
        resp[i, e.prompt_len : len(e.ids)] = True
    return ids, attn, resp


def scored_tokens(attn: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """The tokens a proposal is compared with: the response and the tail after it (`pad_batch`'s masks)."""
    return attn.bool() & (resp.cumsum(dim=1) > 0)


def text_body(model: PreTrainedModel) -> Gemma4ForCausalLM:
    """A Gemma4ForCausalLM over `model`'s own language model modules (a release model's, or `model` itself)."""
    if isinstance(model, Gemma4ForCausalLM):
        return model
    with torch.device("meta"):  # no second copy of the weights: both modules are replaced by the model's own
        body = Gemma4ForCausalLM(model.config.get_text_config())
    body.model = model.model.language_model
    body.lm_head = model.lm_head
    return body.eval()


@torch.no_grad()
def body_states(body: Gemma4ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
    """Right-padded sequences -> (logits, final normed hidden states, shared KV of the last sliding/full layers)."""
    out = body.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_shared_kv_states=True)
    logits = body.lm_head(out.last_hidden_state)
    cap = body.config.final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, out.last_hidden_state, dict(out.shared_kv_states)


def draft_masks(batch: int, length: int, sliding_entries: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Boolean masks (True = attend) for queries at every position p over the body's KV.

    Full layers see kv < p; sliding layers the last `sliding_entries` of those (HF's assistant uses
    sliding_window + 1). Position 0 has nothing to attend to; it sees kv 0 so that no row is empty (an all-masked
    row gives NaN), and it is never scored.
    """
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    full = k < q
    sliding = full & (k >= q - sliding_entries)
    full[0, 0] = sliding[0, 0] = True
    return {
        FULL: full.expand(batch, 1, length, length),
        SLIDING: sliding.expand(batch, 1, length, length),
    }


def draft_chain(
    draft: Gemma4AssistantForCausalLM,
    embed: torch.nn.Module,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    kv: KVStates,
    steps: int,
    sliding_entries: int,
    teacher: torch.Tensor | None = None,
    position_offset: int = 0,
    rows_at: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Chained draft logits for a query at every position: element j is [B, T, V], the prediction of token p+1+j;
    with `rows_at` (a [B, T] mask; training, `teacher` given) the draft's final states at those positions instead,
    [N, H], for a loss that applies `draft.lm_head` itself a chunk at a time: a 262k vocabulary at every position of
    every step is what fills a GPU at real shapes.

    Step 0's state is the body's hidden state at p-1. Later steps take the draft's own projected state and, as
    input token, `teacher[:, :, j-1]` when given (training) or the previous step's argmax (measurement).
    The query's RoPE position is p + position_offset: HF's assistant uses p (the new token's position), vLLM's
    proposer p - 1 (the position of the hidden state it was given).
    """
    batch, length = input_ids.shape
    masks = draft_masks(batch, length, sliding_entries, input_ids.device)
    positions = (torch.arange(length, device=input_ids.device) + position_offset).clamp(min=0)
    position_ids = positions.expand(batch, length)
    state = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    tokens = input_ids
    per_step = []
    for j in range(steps):
        x = draft.pre_projection(torch.cat([embed(tokens), state], dim=-1))
        out = draft.model(
            inputs_embeds=x, attention_mask=masks, position_ids=position_ids, shared_kv_states=kv, use_cache=False
        )
        last = out.last_hidden_state
        per_step.append(draft.lm_head(last) if rows_at is None else last[rows_at])
        state = draft.post_projection(out.last_hidden_state)
        tokens = teacher[:, :, j] if teacher is not None else per_step[-1].argmax(-1)
    return per_step


def draft_targets(ids: torch.Tensor, valid: torch.Tensor, steps: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher[b, p, j] = ids[b, p+1+j] and whether that token exists (past the sequence end counts as missing)."""
    width, device = ids.shape[1], ids.device
    ext = torch.cat([ids, torch.full((ids.shape[0], steps), pad_id, device=device)], dim=1)
    ext_valid = torch.cat([valid, torch.zeros(ids.shape[0], steps, dtype=torch.bool, device=device)], dim=1)
    idx = torch.arange(width, device=device)[:, None] + 1 + torch.arange(steps, device=device)[None, :]
    return ext[:, idx], ext_valid[:, idx]
