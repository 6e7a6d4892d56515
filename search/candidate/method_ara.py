"""ARA as a registered method (search/candidate/methods.py): its parameters (search/candidate/ara.py) and how the
study samples them, sized to the model's layer count L.

start_layer_index in [0, L/2] and end_layer_index in [L/2 + 1, L]: end's low is L/2 + 1 (not L/2) so that every
sampled layer range is non-empty. steer_w is sampled on a log scale. With `abliteration.experts`, the routed experts
add `experts_per_layer` (0 to the experts per layer); an informed trial that names none edits no expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from heretic.config import RowNormalization, Settings

from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.methods import Method

if TYPE_CHECKING:
    from mtp_abliterate.search.candidate.resident import Resident


def ranges(num_layers: int, num_experts: int) -> dict[str, tuple[float, float]]:
    half = num_layers // 2
    return {
        "start_layer_index": (0, half),
        "end_layer_index": (min(half + 1, num_layers), num_layers),
        **AraParameters.RANGES,
        **({"experts_per_layer": (0, num_experts)} if num_experts else {}),
    }


def apply(resident: Resident, params: AraParameters) -> dict[str, Any]:
    """Optimised on the vanilla model's captured module I/O (captured once per study)."""
    io, _ = resident.module_io()
    with torch.enable_grad():
        return resident.abliterator.apply_ara(params, io)


def adapter(settings: Settings, rank: int) -> tuple[int, bool]:
    """Rank-`rank` adapters; DoRA with frozen magnitudes when heretic's row normalisation is "full"."""
    return rank, settings.row_normalization == RowNormalization.FULL


METHOD = Method(
    label="ARA (Arbitrary-Rank Ablation)",
    parameters=AraParameters,
    marker="start_layer_index",
    ranges=ranges,
    candidate=lambda values, num_layers: AraParameters(**values),
    apply=apply,
    adapter=adapter,
    integer=frozenset({"start_layer_index", "end_layer_index", "k", "experts_per_layer"}),
    log=frozenset({"steer_w"}),
    optional=("experts_per_layer",),
)
