"""Training loops for the organism's body (chat SFT) and its MTP draft (distillation on the body's own states)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

from mtp_abliterate.organism.spec import OrganismSpec, TrainSpec
from mtp_abliterate.search.draft.distill import adamw_cosine, chain_loss
from mtp_abliterate.search.draft.wiring import Example, pad_batch

Progress = Callable[[int, float], None]


def _optimizer(params: list[torch.nn.Parameter], t: TrainSpec) -> Callable[[torch.Tensor], None]:
    return adamw_cosine(params, t.lr, t.weight_decay, t.warmup_steps, t.steps)


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
    optimizer_step = _optimizer(list(draft.parameters()), t)
    draft.train()
    for step in range(t.steps):
        ids, attn, resp = pad_batch(rng.sample(list(examples), t.batch_size), pad_id)
        sliding_entries = window + rng.choice((0, 1))
        position_offset = rng.choice((0, -1))
        loss = chain_loss(
            draft, body, ids, attn, resp, spec.draft_chain_steps, pad_id, sliding_entries, position_offset
        )
        optimizer_step(loss)
        progress(step, loss.item())
    draft.eval()
