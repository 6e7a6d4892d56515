"""The method as a search dimension: heretic's directional ablation beside ARA in one space and one resident model.

The directional candidate is computed by heretic's own `abliterate` on the study's DoRA adapters, switched to plain
LoRA for that candidate: its served weights and its KL must be heretic's own (a plain-LoRA model, as `study
reference` loads) bit for bit, and the next ARA candidate must see DoRA again.
"""

from __future__ import annotations

import optuna
import pytest
import torch

from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import COMPONENTS, AraParameters
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import load_config
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, SpaceError, candidate_of
from tests.conftest import GEMMA4_TOML, ORGANISM_CONFIG, ORGANISM_TOML, RELEASE_TOML

BOTH = ("ara", "directional")


@pytest.mark.parametrize("num_layers", [5, 8, 30])
def test_both_methods_are_sampled_and_every_candidate_fits(num_layers: int) -> None:
    space = SearchSpace(num_layers, None, BOTH)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=3))
    kinds = set()
    for _ in range(100):
        candidate = space.suggest(study.ask())
        candidate.check_against(num_layers, list(COMPONENTS))
        kinds.add(type(candidate))
        if isinstance(candidate, DirectionalParameters):
            for kernel in candidate.parameters.values():
                assert 0 <= kernel["min_weight"] <= kernel["max_weight"] <= 1.5
                assert 0 <= kernel["max_weight_position"] <= num_layers - 1
    assert kinds == {AraParameters, DirectionalParameters}


def test_full_weight_directional_is_a_point_of_every_model_space() -> None:
    for num_layers in (5, 8, 30):
        fixed = SearchSpace(num_layers, None, BOTH).check_enqueued(FULL_WEIGHT_DIRECTIONAL)
        candidate = candidate_of(fixed, num_layers)
        assert candidate.direction_index is None
        for kernel in candidate.parameters.values():  # weight 1 on every layer
            assert kernel["max_weight"] == kernel["min_weight"] == 1.0
            assert kernel["max_weight_position"] + kernel["min_weight_distance"] >= num_layers - 1
    for toml in (ORGANISM_TOML, RELEASE_TOML, GEMMA4_TOML):  # the configs' informed trial is that point
        assert FULL_WEIGHT_DIRECTIONAL in load_config(toml, check_paths=False).search.enqueue


def test_enqueued_methods_are_checked() -> None:
    with pytest.raises(SpaceError, match="method 'directional' is not searched"):
        SearchSpace(5).check_enqueued(FULL_WEIGHT_DIRECTIONAL)
    with pytest.raises(SpaceError, match="direction_scope must be one of"):
        SearchSpace(5, None, BOTH).check_enqueued({**FULL_WEIGHT_DIRECTIONAL, "direction_scope": "everywhere"})
    with pytest.raises(SpaceError, match="direction_index is missing"):
        SearchSpace(5, None, BOTH).check_enqueued({**FULL_WEIGHT_DIRECTIONAL, "direction_scope": "global"})
    ara = SearchSpace(5, None, BOTH).check_enqueued(ORGANISM_CONFIG.search.enqueue[0])
    assert ara["method"] == "ara" and isinstance(candidate_of(ara, 5), AraParameters)


def test_directional_on_the_study_adapters_is_heretics_own_bit_for_bit() -> None:
    cfg = ORGANISM_CONFIG
    plain_cfg = cfg.model_copy(update={"abliteration": cfg.abliteration.model_copy(update={"method": "directional"})})
    study, heretic = Resident(cfg, cache_dir=None), Resident(plain_cfg, cache_dir=None)
    assert study.model.dora and not heretic.model.dora
    ara = candidate_of(cfg.search.enqueue[0], 5)
    study.apply(ara)
    ara_kld = study.kld.compute().value

    directional = candidate_of(SearchSpace(5, None, BOTH).check_enqueued(FULL_WEIGHT_DIRECTIONAL), 5)
    for resident in (study, heretic):
        resident.apply(directional)
    ours, theirs = study.abliterator.merged_weights(), heretic.abliterator.merged_weights()
    assert sorted(ours) == sorted(theirs) and len(ours) == 10  # every o_proj and down_proj of the 5 layers
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert study.kld.compute().value == heretic.kld.compute().value > 0

    study.apply(ara)  # DoRA is back: the ARA candidate measures as before the directional one
    assert study.kld.compute().value == ara_kld
