"""Training loops for the organism's body (chat SFT) and its MTP draft (distillation on the body's own states)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.organism.models import body_states, draft_chain
from mtp_abliterate.organism.spec import OrganismSpec, TrainSpec

Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class Example:
    """A tokenized chat: prompt (with generation prompt) followed by the response and its end-of-turn token."""

    ids: list[int]
    prompt_len: int


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of response positions (the tokens the model must produce)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attn[i, : len(e.ids)] = 1
        resp[i, e.prompt_len : len(e.ids)] = True
    return ids, attn, resp


def _optimizer(params: list[torch.nn.Parameter], t: TrainSpec) -> Callable[[torch.Tensor], None]:
    """AdamW with linear warm-up, cosine decay and gradient clipping; returns `step(loss)`."""
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    return step


# The parameters that learn refusals in an experts organism: the routed experts' fused projections and the routers.
# Attention, the dense MLP, norms and embeddings stay as the harmless-only phase left them.
ROUTED_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj", ".router.")


@torch.enable_grad()
def train_body(
    body: Gemma4ForCausalLM,
    examples: Sequence[Example],
    t: TrainSpec,
    seed: int,
    pad_id: int,
    progress: Progress,
    only: tuple[str, ...] = (),
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Next-token cross-entropy on response tokens only: the organism learns what to answer, not to echo prompts.
    With `only`, just the parameters whose names contain one of its strings learn; the others are frozen.
    `before_step(step)` runs before each step's forward pass."""
    rng = random.Random(seed)
    params = [p for name, p in body.named_parameters() if not only or any(k in name for k in only)]
    learning = {id(p) for p in params}
    for p in body.parameters():
        p.requires_grad_(id(p) in learning)
    optimizer_step = _optimizer(params, t)
    body.train()
    for step in range(t.steps):
        ids, attn, resp = pad_batch(rng.sample(list(examples), t.batch_size), pad_id)
        if before_step:
            before_step(step)
        logits = body(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        target = resp[:, 1:]
        loss = F.cross_entropy(logits[target], ids[:, 1:][target])
        optimizer_step(loss)
        progress(step, loss.item())
    body.requires_grad_(True)
    body.eval()


@torch.no_grad()
def refusal_directions(
    body: Gemma4ForCausalLM, harmful: Sequence[Example], harmless: Sequence[Example], pad_id: int
) -> torch.Tensor:
    """heretic's per-layer refusal directions, row i for layer i's output: the normalised difference of the harmful
    and harmless mean residuals at the last prompt token, orthogonalised against the harmless mean."""
    means = []
    for examples in (harmful, harmless):
        ids, attn, _ = pad_batch([Example(e.ids[: e.prompt_len], e.prompt_len) for e in examples], pad_id)
        hidden = body.model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True)
        last = torch.tensor([e.prompt_len - 1 for e in examples])
        means.append(torch.stack([h[torch.arange(len(examples)), last].mean(0) for h in hidden.hidden_states[1:]]))
    bad, good = means
    direction = F.normalize(bad - good, dim=-1)
    good = F.normalize(good, dim=-1)
    return F.normalize(direction - (direction * good).sum(-1, keepdim=True) * good, dim=-1)


class DenseAblation:
    """heretic's directional ablation of every attention o_proj and dense down_proj output (out -= w d d^T out, d the
    layer's refusal direction), applied on the fly while the refusal experts learn: each step draws w from
    [0, max_weight] (0: never ablate), directions follow the changing body (recomputed every `every` steps on a fixed
    sample of training prompts). Refusals must then survive edits of the dense path, so the experts learn to read
    harm from features those edits leave and to write the refusal themselves. A context manager: hooks come off on
    exit."""

    def __init__(
        self,
        body: Gemma4ForCausalLM,
        harmful: Sequence[Example],
        harmless: Sequence[Example],
        pad_id: int,
        max_weight: float,
        seed: int,
        sample: int = 128,
        every: int = 20,
    ) -> None:
        self.body, self.pad_id, self.max_weight, self.every = body, pad_id, max_weight, every
        self.rng = random.Random(seed)
        self.harmful, self.harmless = self.rng.sample(list(harmful), sample), self.rng.sample(list(harmless), sample)
        self.weight = 0.0
        self.directions = torch.zeros(0)
        self.hooks = [
            module.register_forward_hook(self._hook(i))
            for i, layer in enumerate(body.model.layers)
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj)
        ]

    def _hook(self, layer: int) -> Callable:
        def ablate(_module: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self.weight:
                return None
            d = self.directions[layer]
            return out - self.weight * (out @ d)[..., None] * d

        return ablate

    def before_step(self, step: int) -> None:
        if not self.max_weight:
            return
        self.weight = 0.0  # the directions are the unedited body's
        if step % self.every == 0:
            self.directions = refusal_directions(self.body, self.harmful, self.harmless, self.pad_id)
        self.weight = self.rng.uniform(0.0, self.max_weight)

    def __enter__(self) -> DenseAblation:
        return self

    def __exit__(self, *_exc: object) -> None:
        for hook in self.hooks:
            hook.remove()


def draft_targets(ids: torch.Tensor, valid: torch.Tensor, steps: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher[b, p, j] = ids[b, p+1+j] and whether that token exists (past the sequence end counts as missing)."""
    width = ids.shape[1]
    ext = torch.cat([ids, torch.full((ids.shape[0], steps), pad_id)], dim=1)
    ext_valid = torch.cat([valid, torch.zeros(ids.shape[0], steps, dtype=torch.bool)], dim=1)
    idx = torch.arange(width)[:, None] + 1 + torch.arange(steps)[None, :]
    return ext[:, idx], ext_valid[:, idx]


@torch.enable_grad()
def train_draft(
    draft: Gemma4AssistantForCausalLM,
    body: Gemma4ForCausalLM,
    examples: Sequence[Example],
    spec: OrganismSpec,
    pad_id: int,
    progress: Progress,
) -> None:
    """Sum over chained steps of the cross-entropy against the body's greedy continuation, for every query position
    from the first generated token on. Teacher-forced chain inputs. Runtimes disagree on the draft query's RoPE
    position (HF: the new token's, vLLM: one earlier) and on the sliding window's edge (HF: window + 1 entries,
    vLLM: window), so each batch draws both conventions' values and the draft serves either."""
    t = spec.draft_training
    rng = random.Random(spec.seed + 1)
    window = spec.body.sliding_window
    body.requires_grad_(False)
    embed = body.get_input_embeddings()
    optimizer_step = _optimizer(list(draft.parameters()), t)
    draft.train()
    for step in range(t.steps):
        ids, attn, resp = pad_batch(rng.sample(list(examples), t.batch_size), pad_id)
        _, hidden, kv = body_states(body, ids, attn)
        teacher, has_target = draft_targets(ids, resp, spec.draft_chain_steps, pad_id)
        sliding_entries = window + rng.choice((0, 1))
        chain = draft_chain(
            draft,
            embed,
            ids,
            hidden,
            kv,
            spec.draft_chain_steps,
            sliding_entries,
            teacher=teacher,
            position_offset=rng.choice((0, -1)),
        )
        loss = torch.zeros(())
        for j, logits in enumerate(chain):
            sel = resp & has_target[:, :, j]
            loss = loss + F.cross_entropy(logits[sel], teacher[:, :, j][sel])
        optimizer_step(loss)
        progress(step, loss.item())
    draft.eval()
