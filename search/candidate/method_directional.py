"""heretic 1.4.0's directional ablation as a registered method (search/candidate/methods.py): its parameters
(`DirectionalParameters`) and how the study samples them.

heretic's own parametrisation (direction scope and index, and per component a weight kernel over layers), with
positions and distances as fractions of the last layer index so that one informed candidate fits every model. Two
ranges are wider than heretic's: max_weight reaches down to 0 (heretic: 0.8; gentler ablations keep more draft
acceptance, which heretic does not measure) and the kernel's position and reach cover every layer (heretic: the upper
40 %), so heretic's plain full-weight ablation is a point of the space. With `abliteration.experts`, the routed
experts get a kernel of their own (`experts.down_proj.*`); an informed trial that names none leaves them vanilla.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heretic.config import RowNormalization, Settings

from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.components import COMPONENTS
from mtp_abliterate.search.candidate.experts import COMPONENT as EXPERTS
from mtp_abliterate.search.candidate.methods import Method

if TYPE_CHECKING:
    from mtp_abliterate.search.candidate.resident import Resident

SCOPES = ("global", "per layer")


def ranges(num_layers: int, num_experts: int) -> dict[str, tuple[float, float]]:
    last = max(num_layers - 1, 1)
    per_component = {
        "max_weight": (0.0, 1.5),
        "position": (0.0, 1.0),
        "min_weight": (0.0, 1.0),
        "reach": (1 / last, 1.0),
    }
    components = (*COMPONENTS, *([EXPERTS] if num_experts else []))
    return {"direction_index": (0.4, 0.9)} | {
        f"{c}.{name}": bounds for c in components for name, bounds in per_component.items()
    }


def candidate(values: dict[str, Any], num_layers: int) -> DirectionalParameters:
    """Fractions of the last layer index as heretic's layer positions; min_weight as a fraction of max_weight."""
    last = max(num_layers - 1, 1)
    kernels = {}
    for c in (*COMPONENTS, EXPERTS):
        if f"{c}.max_weight" in values:
            top = values[f"{c}.max_weight"]
            kernels[c] = {
                "max_weight": top,
                "max_weight_position": values[f"{c}.position"] * last,
                "min_weight": values[f"{c}.min_weight"] * top,  # heretic samples it as a fraction of max_weight
                "min_weight_distance": values[f"{c}.reach"] * last,
            }
    index = values["direction_index"] * last if values["direction_scope"] == "global" else None
    return DirectionalParameters(direction_index=index, parameters=kernels)


def apply(resident: Resident, params: DirectionalParameters) -> dict[str, Any]:
    return resident.abliterator.apply_directional(params, resident.directions())


def adapter(settings: Settings, rank: int) -> tuple[int, bool]:
    """heretic's own LoRA: rank full_normalization_lora_rank under "full" row normalisation, else 1."""
    full = settings.row_normalization == RowNormalization.FULL
    return (settings.full_normalization_lora_rank if full else 1), False


METHOD = Method(
    label="heretic 1.4.0's directional ablation",
    parameters=DirectionalParameters,
    marker="direction_scope",
    ranges=ranges,
    candidate=candidate,
    apply=apply,
    adapter=adapter,
    choices={"direction_scope": SCOPES},
    optional=(f"{EXPERTS}.",),
    sampled=lambda name, chosen: name != "direction_index" or chosen.get("direction_scope") == "global",
)
