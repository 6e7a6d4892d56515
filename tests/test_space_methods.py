"""The method as a search dimension: heretic's directional ablation beside ARA in one space and one resident model.

The directional candidate is computed by heretic's own `abliterate` on the study's DoRA adapters, switched to plain
LoRA for that candidate: its served weights and its KL must be heretic's own (a plain-LoRA model, as `study
reference` loads) bit for bit, and the next ARA candidate must see DoRA again.
"""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import RandomSampler

from mtp_abliterate.search.candidate.abliterator import DirectionalParameters
from mtp_abliterate.search.candidate.ara import COMPONENTS, AbliterationError, AraParameters, ModelShape
from mtp_abliterate.search.candidate.resident import Resident, parse_parameters
from mtp_abliterate.search.config import ConfigError, load_config
from mtp_abliterate.search.study.space import FULL_WEIGHT_DIRECTIONAL, SearchSpace, SpaceError, candidate_of
from mtp_abliterate.search.study.storage import make_sampler
from tests.conftest import GEMMA4_TOML, ORGANISM_CONFIG, ORGANISM_TOML, RELEASE_TOML, write_study_config

BOTH = ("ara", "directional")


@pytest.mark.parametrize("num_layers", [5, 8, 30])
def test_both_methods_are_sampled_and_every_candidate_fits(num_layers: int) -> None:
    space = SearchSpace(num_layers, None, BOTH)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=3))
    kinds = set()
    for _ in range(100):
        candidate = space.suggest(study.ask())
        candidate.check_against(ModelShape(num_layers, 0), list(COMPONENTS))
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


def test_the_gp_sampler_takes_one_method(tmp_path) -> None:
    both = write_study_config(ORGANISM_TOML, tmp_path / "both.toml", search={"sampler": "gp"})
    with pytest.raises(ConfigError, match="sampler 'gp' models one method's parameters"):
        load_config(both)
    ara = ORGANISM_CONFIG.search.enqueue[0]
    stray = write_study_config(ORGANISM_TOML, tmp_path / "stray.toml", search={"sampler": "gp", "methods": ["ara"]})
    with pytest.raises(ConfigError, match="enqueue\\[1\\] is a directional trial but methods"):
        load_config(stray)  # before any model loads
    one = write_study_config(
        ORGANISM_TOML, tmp_path / "one.toml", search={"sampler": "gp", "methods": ["ara"], "enqueue": [ara]}
    )
    assert isinstance(make_sampler(load_config(one), offset=0, host=""), optuna.samplers.GPSampler)


def test_a_one_method_study_names_no_method_and_still_rebuilds_its_candidates() -> None:
    directional = SearchSpace(8, None, ("directional",))
    fixed = directional.check_enqueued(FULL_WEIGHT_DIRECTIONAL)
    assert "method" not in fixed and isinstance(candidate_of(fixed, 8), DirectionalParameters)
    # the method's order in the config does not change the stored distribution
    assert SearchSpace(8, None, ("directional", "ara")).methods == SearchSpace(8, None, BOTH).methods == BOTH


def test_a_stored_study_finds_the_names_and_distributions_it_holds() -> None:
    """A study resumes only on the parameters it stored: the method registry samples what the space always did."""
    space, study = SearchSpace(8, None, BOTH, num_experts=4), optuna.create_study(sampler=RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        trial = study.ask()
        space.suggest(trial)
        seen |= trial.distributions
        study.tell(trial, 0.0)
    assert seen.pop("method") == CategoricalDistribution(BOTH)
    assert seen.pop("direction_scope") == CategoricalDistribution(("global", "per layer"))
    assert seen.pop("direction_index") == FloatDistribution(0.4, 0.9)
    ara = {"start_layer_index": (0, 4), "end_layer_index": (5, 8), "k": (1, 15), "experts_per_layer": (0, 4)}
    for name, (low, high) in ara.items():
        assert seen.pop(name) == IntDistribution(low, high)
    assert seen.pop("steer_w") == FloatDistribution(1e-4, 1.0, log=True)
    assert seen.pop("preserve_w") == FloatDistribution(0.0, 1.0)
    assert seen.pop("overcorrect_w") == FloatDistribution(0.0, 1.3)
    kernel = {"max_weight": (0.0, 1.5), "position": (0.0, 1.0), "min_weight": (0.0, 1.0), "reach": (1 / 7, 1.0)}
    for component in (*COMPONENTS, "experts.down_proj"):
        for name, (low, high) in kernel.items():
            assert seen.pop(f"{component}.{name}") == FloatDistribution(low, high)
    assert seen == {}


def test_an_unknown_method_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(AbliterationError, match=r"^unknown method 'rank-one'; use one of \['ara', 'directional'\]$"):
        parse_parameters("rank-one", {}, ModelShape(5, 0))


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


def test_after_a_rank_one_directional_candidate_ara_gets_its_rank_back() -> None:
    # Without heretic's "full" row normalisation, heretic writes rank-1 factors into the adapters.
    cfg = ORGANISM_CONFIG.model_copy(
        update={"abliteration": ORGANISM_CONFIG.abliteration.model_copy(update={"row_normalization": "none"})}
    )
    resident = Resident(cfg, cache_dir=None)
    resident.apply(candidate_of(SearchSpace(5, None, BOTH).check_enqueued(FULL_WEIGHT_DIRECTIONAL), 5))
    module = next(iter(resident.abliterator.adapters.values()))
    assert module.lora_A["default"].weight.shape[0] == 1
    resident.apply(candidate_of(cfg.search.enqueue[0], 5))
    assert module.lora_A["default"].weight.shape[0] == cfg.abliteration.rank and len(resident.abliterator.edited) == 6
