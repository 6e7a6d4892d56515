"""ARA's objective as optimised (low-rank, no W formed) is the objective of the weight that is deployed."""

from __future__ import annotations

import pytest
import torch

from mtp_abliterate.search.candidate.ara import (
    AraParameters,
    LowRankOutputs,
    ModuleTask,
    ara_loss,
    edited_weight,
    knn_distance,
    optimise_module,
)

PARAMS = AraParameters(start_layer_index=0, end_layer_index=1, preserve_w=0.7, steer_w=0.3, overcorrect_w=0.9, k=3)


def _problem(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(24, 40, generator=g) / 40**0.5
    io = {"good_in": torch.randn(30, 40, generator=g), "bad_in": torch.randn(20, 40, generator=g) + 0.3}
    io |= {"good_out": io["good_in"] @ w0.T, "bad_out": io["bad_in"] @ w0.T}
    return w0, io


@pytest.mark.parametrize("row_norm", [True, False])
def test_low_rank_outputs_equal_the_edited_weights_outputs(row_norm: bool) -> None:
    w0, io = _problem()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 40, generator=g), torch.randn(24, 4, generator=g) * 0.1
    magnitude = w0.norm(dim=1) if row_norm else None
    w = edited_weight(w0, a, b, magnitude)
    good, bad = LowRankOutputs(w0, io, magnitude)(a, b)
    torch.testing.assert_close(good, io["good_in"] @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bad, io["bad_in"] @ w.T, rtol=1e-5, atol=1e-5)
    if row_norm:
        torch.testing.assert_close(w.norm(dim=1), w0.norm(dim=1))


def test_knn_distance_is_the_mean_distance_to_the_k_nearest_rows() -> None:
    a = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [10.0, 3.0], [7.0, 4.0]])
    # row 0: nearest 1, 2 -> 1.5; row 1: nearest 3, 5 -> 4.0
    assert knn_distance(a, b, 2).item() == pytest.approx((1.5 + 4.0) / 2, rel=1e-6)


def test_optimisation_lowers_the_objective_and_is_reproducible() -> None:
    w0, io = _problem()
    magnitude = w0.norm(dim=1)
    start = ara_loss(io["good_out"], io["bad_out"], io, PARAMS).item()
    a, b, final = optimise_module(ModuleTask(w0, io, 5, magnitude), PARAMS, rank=4)
    assert final < start
    w = edited_weight(w0, a, b, magnitude)
    assert ara_loss(io["good_in"] @ w.T, io["bad_in"] @ w.T, io, PARAMS).item() == pytest.approx(final, rel=1e-4)
    a2, b2, _ = optimise_module(ModuleTask(w0, io, 5, magnitude), PARAMS, rank=4)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a3, _, _ = optimise_module(ModuleTask(w0, io, 6, magnitude), PARAMS, rank=4)
    assert not torch.equal(a, a3)
