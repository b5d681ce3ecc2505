"""Boundless DAS (``interp.boundless``) recovers the size of a planted subspace (``interp.planted``: a 2-D circle
or the 3-D corners of a cube in a 6-wide residual stream, read at the last position)."""

import pytest
import torch

import ftransformer as ft
from ftransformer.interp import boundless, das, planted
from tests.typecheck import unchecked

CFG = planted.planted_config(vocab=8, d_model=6, n_layers=1, seq=2)
SITE = "blocks.0.resid_post"


@pytest.mark.parametrize("dim", [2, 3])
def test_boundless_das_recovers_the_planted_size(dim):
    """Trained from a small boundary (1.0) with the size penalty, the boundary settles just past the planted size
    (measured: 1.69-1.92 for dim 2, 2.55-2.56 for dim 3, seeds 0-2): ``learned_size`` (coordinates swapped
    more than half) is ``dim``; swapping the first ``dim`` rotated coordinates then reaches IIA >= 0.95 on held-out
    pairs, and the learned subspace's largest principal angle to the planted one is under 30 degrees (measured
    5.3 for dim 2, 28.4 for dim 3 at seed 0: the size is found before the rotation finishes aligning)."""
    model = planted.planted_model(CFG, dtype=torch.float64, dim=dim)
    base, source, labels = planted.pairs(32, CFG, seed=3)
    snapshot = {k: v.clone() for k, v in ft.tree.flatten_with_paths(model).items()}
    with unchecked():
        params_i, losses = boundless.train_boundless_das(model, CFG, SITE, base, source, labels, positions=[-1], steps=120)
    assert all(torch.equal(snapshot[k], v) for k, v in ft.tree.flatten_with_paths(model).items())
    assert sorted(params_i) == ["boundary", "rotation"] and losses[-1] < 0.1 * losses[0]
    assert boundless.learned_size(params_i) == dim, float(params_i["boundary"])
    held_out = planted.pairs(256, CFG, seed=6)
    assert float(das.iia(model, CFG, SITE, *held_out, params_i, dim, positions=[-1])) >= 0.95
    angles = das.principal_angles(das.subspace(params_i, dim), planted.planted_basis(6, dtype=torch.float64)[:, :dim])
    assert float(angles.max()) < 30.0, angles


def test_the_boundary_mask_is_a_soft_step_that_sharpens():
    """``m_i = sigmoid((b - i - 1/2) / T)``: 1/2 at ``i + 1/2 = b``; nearly 0/1 elsewhere as T falls; the
    schedule falls geometrically from start to end."""
    b = torch.tensor(2.0, dtype=torch.float64)
    soft, hard = boundless.boundary_mask(b, 5, 1.0), boundless.boundary_mask(b, 5, 0.01)
    torch.testing.assert_close(soft, torch.sigmoid(torch.tensor([1.5, 0.5, -0.5, -1.5, -2.5], dtype=torch.float64)))
    assert torch.equal(hard > 0.5, torch.tensor([True, True, False, False, False])) and float((hard - hard.round()).abs().max()) < 1e-6
    schedule = boundless.temperature_schedule(5, 1.0, 0.01)
    torch.testing.assert_close(schedule, torch.tensor([1.0, 10**-0.5, 0.1, 10**-1.5, 0.01], dtype=torch.float64))
    assert boundless.learned_size({"rotation": torch.zeros(5, 5), "boundary": torch.tensor(2.55)}) == 3


def test_a_hard_boundary_is_the_das_swap():
    """At a tiny temperature with the boundary at k, the soft swap equals DAS's hard swap of the first k coordinates."""
    gen = torch.Generator().manual_seed(0)
    h, s = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    p = boundless.boundless_das_params(5, dtype=torch.float64, boundary=2.0)
    soft = boundless.boundless_intervention(p, s, 1e-4, positions=[1])(h)
    torch.testing.assert_close(soft, das.das_intervention({"rotation": p["rotation"]}, s, 2, positions=[1])(h))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="boundary"):
        boundless.boundless_das_params(4, boundary=5.0)
    with pytest.raises(ValueError, match="0 < end <= start"):
        boundless.temperature_schedule(10, 0.1, 1.0)
    with pytest.raises(ValueError, match="size_weight"):
        boundless.train_boundless_das({}, CFG, SITE, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                                      torch.zeros(1, dtype=torch.long), size_weight=-1.0)
