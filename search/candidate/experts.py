"""Gemma 4's routed experts as an ARA component: each expert's down projection, a slice of the fused parameter.

transformers stores a layer's experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]), so
heretic's module discovery and PEFT adapters never see them. This module finds them, turns the routed inputs that
the module I/O capture recorded into each expert's own I/O, and edits experts in place in the resident model: the
vanilla slice of every edited expert is kept, so a reset writes it back bit for bit.

Which experts: per layer, those that the harmful prompts' last tokens are routed to most (ties: lower index), as
many as the candidate's `experts_per_layer`; an expert no harmful prompt reaches is never edited (nothing to steer).
An expert's harmless I/O are the harmless prompts routed to it; one that no harmless prompt reaches is preserved on
every harmless prompt instead (its own outputs for them: it has no harmless behaviour of its own to keep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COMPONENT = "experts.down_proj"
ROUTED = "experts.routed"  # module I/O key component of a layer's routed last-token inputs


@dataclass(frozen=True)
class FusedExperts:
    """One layer's fused experts module (transformers' `Gemma4TextExperts`) and its name in the base model."""

    module: nn.Module
    name: str

    @property
    def num_experts(self) -> int:
        return int(self.module.down_proj.shape[0])

    def weight_name(self, expert: int) -> str:
        """The expert's down projection as llm-compressor's per-expert Linear names it (the FP8 checkpoint's name)."""
        return f"{self.name}.{expert}.down_proj.weight"

    def io(self, x: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of the expert's down projection, its output) for rows `x` [N, H], with the forward's own ops."""
        gate, up = F.linear(x, self.module.gate_up_proj[expert]).chunk(2, dim=-1)
        inner = self.module.act_fn(gate) * up
        return inner, F.linear(inner, self.module.down_proj[expert])


def find_experts(base: nn.Module, layers: list[nn.Module]) -> dict[int, FusedExperts]:
    """Every layer's fused experts (empty for a dense model). Experts stored transposed are refused: their down
    projection would be (in, out)."""
    names = {id(m): n for n, m in base.named_modules()}
    out = {}
    for index, layer in enumerate(layers):
        experts = getattr(layer, "experts", None)
        down = getattr(experts, "down_proj", None)
        if not isinstance(down, nn.Parameter) or down.dim() != 3:
            continue
        if getattr(experts, "is_transposed", False):
            raise NotImplementedError(f"{names[id(experts)]}: transposed fused experts are not supported")
        out[index] = FusedExperts(experts, names[id(experts)])
    return out


def routed_counts(topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many rows are routed to each expert ([E])."""
    return torch.bincount(topk.reshape(-1).long(), minlength=num_experts)


def chosen_experts(routed: dict[str, torch.Tensor], num_experts: int, n: int) -> list[int]:
    """The `n` experts the harmful prompts are routed to most, leaving out any they never reach."""
    counts = routed_counts(routed["bad_topk"], num_experts)
    order = sorted(range(num_experts), key=lambda e: (-int(counts[e]), e))
    return [e for e in order[:n] if counts[e] > 0]


@torch.no_grad()
def expert_io(fused: FusedExperts, routed: dict[str, torch.Tensor], expert: int) -> dict[str, torch.Tensor]:
    """ARA's I/O of one expert from its layer's routed last-token inputs (vanilla weights)."""
    io = {}
    for side in ("good", "bad"):
        x, topk = routed[f"{side}_x"], routed[f"{side}_topk"]
        mask = (topk == expert).any(dim=1)
        if side == "good" and not mask.any():
            mask = torch.ones_like(mask)  # reached by no harmless prompt: keep its outputs on all of them
        x = x[mask].to(device=fused.module.down_proj.device, dtype=fused.module.down_proj.dtype)
        io[f"{side}_in"], io[f"{side}_out"] = fused.io(x, expert)
    return io


def layer_direction(directions: torch.Tensor, direction_index: float | None, layer: int) -> torch.Tensor:
    """heretic 1.4.0's refusal direction for `layer`: its own (per layer), or the global one interpolated at
    `direction_index` (row 0 of `directions` is the embeddings')."""
    if direction_index is None:
        return directions[layer + 1]
    weight, index = math.modf(direction_index + 1)
    return F.normalize(directions[int(index)].lerp(directions[int(index) + 1], weight), p=2, dim=0)


def directional_weight(w0: torch.Tensor, v: torch.Tensor, weight: float, keep_norms: bool) -> torch.Tensor:
    """heretic's directional edit of one matrix, W - weight v (v^T W); with `keep_norms` (row normalisation
    'full') on the row-normalised W, the vanilla row norms restored after. Exact, where heretic deploys a rank-r
    approximation of the same delta: an expert is written in place, not through an adapter."""
    w = w0.float()
    v = v.to(w.device, torch.float32)
    if not keep_norms:
        return w - weight * torch.outer(v, v @ w)
    norms = w.norm(p=2, dim=1, keepdim=True)
    w = F.normalize(w, p=2, dim=1)
    return F.normalize(w - weight * torch.outer(v, v @ w), p=2, dim=1) * norms


class ExpertEdits:
    """In-place edits of experts' down projections in the resident model, exactly revertible."""

    def __init__(self, experts: dict[int, FusedExperts]) -> None:
        self.experts = experts
        self.vanilla: dict[tuple[int, int], torch.Tensor] = {}  # (layer, expert) -> its vanilla slice
        # what determines each edit: ARA's (A, B), or the directional method's (direction, weight)
        self.factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_experts(self) -> int:
        """Experts per layer (0 for a dense model)."""
        return min((f.num_experts for f in self.experts.values()), default=0)

    @torch.no_grad()
    def write(self, layer: int, expert: int, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        param = self.experts[layer].module.down_proj
        self.vanilla.setdefault((layer, expert), param[expert].clone())
        param[expert].copy_(weight.to(param.dtype))
        self.factors[(layer, expert)] = (a.detach().cpu(), b.detach().cpu())

    @torch.no_grad()
    def reset(self) -> None:
        for (layer, expert), w0 in self.vanilla.items():
            self.experts[layer].module.down_proj[expert].copy_(w0)
        self.vanilla.clear()
        self.factors.clear()

    def edited(self) -> list[tuple[int, int]]:
        return sorted(self.vanilla)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Each edited expert's deployed down projection [H, I] under its per-expert checkpoint name."""
        return {
            self.experts[layer].weight_name(expert): self.experts[layer].module.down_proj[expert].detach().clone()
            for layer, expert in self.edited()
        }

    def editable(self) -> list[str]:
        """Every expert's down projection name: the matrices a candidate may edit."""
        return [f.weight_name(e) for f in self.experts.values() for e in range(f.num_experts)]
