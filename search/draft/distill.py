"""Self-distillation of an MTP draft on a body: the draft learns to propose the body's own greedy continuations.

The loss is the organism builder's: for every query position from the first answer token on, the sum over chained
steps of the cross-entropy against the next tokens of the body's answer and, past its end, of the body's own
continuation (`Example.tail`: vLLM scores those proposals too), teacher-forced chain inputs. `draft-tune`
feeds the draft exactly as vLLM's MTP proposer does (query at the hidden state's position, `sliding_window` KV
entries); the body is frozen and runs in its checkpoint dtype, the draft learns in float32 (saved in its own dtype).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.search.draft.wiring import (
    Example,
    body_states,
    draft_chain,
    draft_targets,
    pad_batch,
    scored_tokens,
)

VLLM_POSITION_OFFSET = -1  # vLLM's proposer queries at the position of the hidden state it was given
# Answer positions whose float32 logits exist at once in `chunked_cross_entropy` (1 GiB at a 262k vocabulary).
LOGIT_CHUNK = 1024

Progress = Callable[[int, float], None]


def adamw_cosine(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> Callable[[torch.Tensor], None]:
    """AdamW with linear warm-up, cosine decay to 0 at `total_steps` and gradient clipping; returns `step(loss)`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    return step


def _summed_cross_entropy(head: torch.nn.Module, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows), target, reduction="sum")


def chunked_cross_entropy(
    head: torch.nn.Module, rows: torch.Tensor, target: torch.Tensor, chunk: int = LOGIT_CHUNK
) -> torch.Tensor:
    """`F.cross_entropy(head(rows), target)` (the mean) without every row's logits in memory at once: `chunk` rows
    at a time, each chunk's logits recomputed in the backward pass instead of kept for it."""
    total = rows.new_zeros(())
    for i in range(0, len(rows), chunk):
        part = (rows[i : i + chunk], target[i : i + chunk])
        total = total + checkpoint(_summed_cross_entropy, head, *part, use_reentrant=False)
    return total / len(rows)


def chain_loss(
    draft: Gemma4AssistantForCausalLM,
    body: Gemma4ForCausalLM,
    ids: torch.Tensor,
    attn: torch.Tensor,
    resp: torch.Tensor,
    steps: int,
    pad_id: int,
    sliding_entries: int,
    position_offset: int,
    answer_logits_only: bool = False,
) -> torch.Tensor:
    """One batch's loss: sum over `steps` chained draft steps of the cross-entropy on the answer tokens. The body's
    states are cast to the draft's dtype (a BF16 body can teach a float32 draft). `answer_logits_only`: the draft's
    logits are computed at answer positions only, `LOGIT_CHUNK` rows at a time (the same loss, a fraction of the
    memory)."""
    dtype = draft.dtype
    _, hidden, kv = body_states(body, ids, attn)
    kv = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in kv.items()}
    embed = body.get_input_embeddings()
    teacher, has_target = draft_targets(ids, scored_tokens(attn, resp), steps, pad_id)
    chain = draft_chain(
        draft,
        lambda tokens: embed(tokens).to(dtype),
        ids,
        hidden.to(dtype),
        kv,
        steps,
        sliding_entries,
        teacher=teacher,
        position_offset=position_offset,
        rows_at=resp if answer_logits_only else None,
    )
    loss = torch.zeros((), dtype=dtype, device=ids.device)
    for j, out in enumerate(chain):
        if answer_logits_only:  # the draft's states at the answer positions
            has, target = has_target[:, :, j][resp], teacher[:, :, j][resp]
            loss = loss + chunked_cross_entropy(draft.lm_head, out[has], target[has])
        else:
            sel = resp & has_target[:, :, j]
            loss = loss + F.cross_entropy(out[sel], teacher[:, :, j][sel])
    return loss


@dataclass(frozen=True)
class Budget:
    """How long a distillation runs: at most `steps` optimiser steps and at most `max_seconds` of wall time."""

    steps: int
    max_seconds: float | None
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Distilled:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean over the last 10 steps


@torch.enable_grad()
def distil(
    draft: Gemma4AssistantForCausalLM,
    body: Gemma4ForCausalLM,
    examples: Sequence[Example],
    budget: Budget,
    chain_steps: int,
    pad_id: int,
    seed: int,
    progress: Progress,
) -> Distilled:
    """Train `draft` (in place) on `examples` (prompt + the body's own answer) with vLLM's MTP wiring. The body does
    not change."""
    if not examples:
        raise ValueError("no training examples: every answer was empty")
    rng = random.Random(seed)
    body.requires_grad_(False)
    params = list(draft.parameters())
    device = params[0].device
    optimizer_step = adamw_cosine(params, budget.lr, budget.weight_decay, budget.warmup_steps, budget.steps)
    draft.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        for step in range(budget.steps):
            if budget.max_seconds is not None and time.perf_counter() - t0 >= budget.max_seconds:
                break
            batch = rng.sample(list(examples), min(budget.batch_size, len(examples)))
            ids, attn, resp = (t.to(device) for t in pad_batch(batch, pad_id))
            window = body.config.sliding_window
            loss = chain_loss(
                draft, body, ids, attn, resp, chain_steps, pad_id, window, VLLM_POSITION_OFFSET, answer_logits_only=True
            )
            optimizer_step(loss)
            losses.append(loss.item())
            progress(step, losses[-1])
    finally:
        draft.eval()
    tail = losses[-10:]
    return Distilled(len(losses), time.perf_counter() - t0, losses[0], sum(tail) / len(tail))
