"""The routed experts as an ARA component (search/candidate/experts.py), on the organism's real fused experts."""

from __future__ import annotations

import pytest
import torch

from mtp_abliterate.search.candidate.ara import AbliterationError, AraParameters
from mtp_abliterate.search.candidate.experts import COMPONENT as EXPERTS
from mtp_abliterate.search.candidate.experts import ROUTED, chosen_experts, expert_io, routed_counts
from mtp_abliterate.search.candidate.resident import Resident, shape_of
from mtp_abliterate.search.config import StudyConfig
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, candidate_of
from tests.conftest import ORGANISM_CONFIG

CONFIG: StudyConfig = ORGANISM_CONFIG


def _informed(**update) -> AraParameters:
    return AraParameters(**CONFIG.search.enqueue[0]).model_copy(update=update)


@torch.no_grad()
def test_each_expert_is_captured_on_the_tokens_the_router_sends_it(resident: Resident) -> None:
    ab = resident.abliterator
    assert ab.num_experts == shape_of(CONFIG.model.target).num_experts > 0
    assert sorted(ab.experts.experts) == list(range(ab.num_layers))
    ab.reset()
    io, _ = resident.module_io()
    bad = resident.prompts("bad_prompts")
    # The routers' own top-k at each prompt's last token (hooks on the router modules, not on the experts).
    chosen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.router.register_forward_hook(
            lambda _m, _a, out, i=i: chosen.__setitem__(i, out[2].view(len(bad), -1, out[2].shape[-1])[:, -1])
        )
        for i, layer in enumerate(resident.model.get_layers())
    ]
    try:
        resident.model.generate(bad, max_new_tokens=1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for layer, fused in ab.experts.experts.items():
        routed = io[(layer, ROUTED, 0)]
        assert torch.equal(routed["bad_topk"], chosen[layer])
        for expert in range(ab.num_experts):
            reached = int((routed["bad_topk"] == expert).any(dim=1).sum())
            assert reached == int(routed_counts(routed["bad_topk"], ab.num_experts)[expert])
            if reached == 0:
                continue
            e_io = expert_io(fused, routed, expert)
            assert e_io["bad_in"].shape[0] == reached
            # The expert's output as the fused module itself computes it for those rows, routed to it alone.
            rows = routed["bad_x"][(routed["bad_topk"] == expert).any(dim=1)].to(fused.module.down_proj.dtype)
            alone = fused.module(rows, torch.full((reached, 1), expert), torch.ones(reached, 1))
            assert torch.equal(alone, e_io["bad_out"])


@torch.no_grad()
def test_expert_edits_keep_row_norms_touch_only_chosen_experts_and_reset_bit_for_bit(resident: Resident) -> None:
    ab = resident.abliterator
    ab.reset()
    vanilla_logits = resident.kld.compute()
    vanilla = {
        layer: (f.module.down_proj.detach().clone(), f.module.gate_up_proj.detach().clone())
        for layer, f in ab.experts.experts.items()
    }
    io, _ = resident.module_io()
    params = _informed(experts_per_layer=1)
    with torch.enable_grad():
        details = resident.apply(params)
    in_range = range(params.start_layer_index, params.end_layer_index)
    expected = {
        (layer, chosen_experts(io[(layer, ROUTED, 0)], ab.num_experts, 1)[0])
        for layer in ab.experts.experts
        if layer in in_range
    }
    assert set(ab.experts.edited()) == expected
    assert details["modules"] == len(ab.edited) + len(expected)
    merged = ab.merged_weights()
    for layer, fused in ab.experts.experts.items():
        down, gate_up = vanilla[layer]
        assert torch.equal(fused.module.gate_up_proj, gate_up)
        for expert in range(ab.num_experts):
            now = fused.module.down_proj[expert]
            if (layer, expert) in expected:
                assert not torch.equal(now, down[expert])
                # Row norms kept (DoRA with frozen magnitudes), up to the BF16 rounding of the stored weight.
                torch.testing.assert_close(now.float().norm(dim=1), down[expert].float().norm(dim=1), rtol=1e-2, atol=0)
                assert torch.equal(merged[fused.weight_name(expert)], now)
            else:
                assert torch.equal(now, down[expert])
                assert fused.weight_name(expert) not in merged
    assert resident.kld.compute().value > 0
    ab.reset()
    for layer, fused in ab.experts.experts.items():
        assert torch.equal(fused.module.down_proj, vanilla[layer][0])
    assert resident.kld.compute().value == vanilla_logits.value == 0.0


def test_experts_off_is_the_two_component_candidate(resident: Resident) -> None:
    """experts_per_layer = 0 is the candidate without the field: same adapters, same deployed weights."""
    with torch.enable_grad():
        resident.apply(AraParameters(**CONFIG.search.enqueue[0]))
    before = (resident.abliterator.adapter_digest(), resident.abliterator.merged_digest())
    with torch.enable_grad():
        resident.apply(_informed(experts_per_layer=0))
    assert (resident.abliterator.adapter_digest(), resident.abliterator.merged_digest()) == before
    assert not resident.abliterator.experts.edited()
    with pytest.raises(AbliterationError, match="routed experts per layer"):
        resident.apply(_informed(experts_per_layer=resident.abliterator.num_experts + 1))
    resident.abliterator.reset()


@torch.no_grad()
def test_directional_ablation_reaches_every_expert_of_its_layers(resident: Resident) -> None:
    """heretic's directional method with a kernel for the experts: heretic's own edits unchanged, every expert of
    each reached layer edited with its row norms kept, all of it reverted by a reset."""
    ab = resident.abliterator
    space = SearchSpace(ab.num_layers, None, ("ara", "directional"), ab.num_experts)
    plain = candidate_of(space.check_enqueued(FULL_WEIGHT_DIRECTIONAL), ab.num_layers)
    kernel = {
        f"{EXPERTS}.{n}": v for n, v in (("max_weight", 1.0), ("position", 0.0), ("min_weight", 1.0), ("reach", 1.0))
    }
    with_experts = candidate_of(space.check_enqueued(FULL_WEIGHT_DIRECTIONAL | kernel), ab.num_layers)
    assert plain.parameters[EXPERTS]["max_weight"] == 0  # an informed trial naming no experts leaves them
    vanilla = {layer: f.module.down_proj.detach().clone() for layer, f in ab.experts.experts.items()}
    resident.apply(plain)
    heretic_only = ab.adapter_digest()
    assert not ab.experts.edited()
    resident.apply(with_experts)
    assert set(ab.experts.edited()) == {(layer, e) for layer in ab.experts.experts for e in range(ab.num_experts)}
    assert {k for k in ab.merged_weights() if ".experts." not in k} == {
        f"{ab.module_names[k]}.weight" for k in ab.edited
    }
    for layer, fused in ab.experts.experts.items():
        now, before = fused.module.down_proj.float(), vanilla[layer].float()
        assert not torch.equal(now, before)
        torch.testing.assert_close(now.norm(dim=2), before.norm(dim=2), rtol=1e-2, atol=0)
    ab.reset()
    assert all(torch.equal(f.module.down_proj, vanilla[layer]) for layer, f in ab.experts.experts.items())
    resident.apply(plain)
    assert ab.adapter_digest() == heretic_only
    ab.reset()
