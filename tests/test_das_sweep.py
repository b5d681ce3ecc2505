"""``interp.das_sweep``: DAS over (layer x position x k) as ONE stacked step (each member run from its own layer),
against training each hypothesis alone, and against the ground truth of ``interp.planted`` (the variable lives in a
planted 2-D subspace at the last position of every layer, so IIA is 1 there for k >= 2 and 0 at the other
positions, where the base's own last token stays the answer)."""

import itertools

import pytest
import torch

import ftransformer as ft
from ftransformer.interp import das, hypotheses, planted
from tests.typecheck import unchecked

CFG = planted.planted_config(vocab=8, d_model=6, n_layers=2, seq=3)
LAYERS, POSITIONS, KS = [0, 1], [0, -1], [1, 2]
GRID = list(itertools.product(LAYERS, POSITIONS, KS))  # the members, in (layer, position, k) nesting order


@pytest.fixture(scope="module")
def model():
    return planted.planted_model(CFG, dtype=torch.float64)


@pytest.fixture(scope="module")
def swept(model):
    train, test = planted.pairs(32, CFG, seed=3), planted.pairs(128, CFG, seed=4)
    snapshot = {k: v.clone() for k, v in ft.tree.flatten_with_paths(model).items()}
    with unchecked():
        result = ft.interp.das_sweep(model, CFG, train, test, layers=LAYERS, positions=POSITIONS, ks=KS, steps=60, lr=0.1)
    assert all(torch.equal(snapshot[k], v) for k, v in ft.tree.flatten_with_paths(model).items())  # model untouched
    return train, test, result


def test_the_sweep_finds_the_planted_site(model, swept):
    """IIA >= 0.95 at (every layer, last position, k=2); 0 at position 0 (the output never reads it); k=1, a line
    of the planted circle, cannot carry the 8-valued variable (IIA well under 0.95). The learned k=2 subspace at
    layer 1 lies within 10 degrees of the planted one."""
    _, _, result = swept
    assert result.iia.shape == (2, 2, 2) and result.losses.shape == (60, 8)
    assert float(result.iia[:, 1, 1].min()) >= 0.95, result.iia
    assert float(result.iia[:, 0].max()) == 0.0, result.iia
    assert float(result.iia[:, 1, 0].max()) < 0.8, result.iia
    member = 1 * 4 + 1 * 2 + 1  # (layer 1, position -1, k 2) in (layer, position, k) nesting order
    angles = das.principal_angles(das.subspace({"rotation": result.params["rotation"][member]}, 2),
                                  planted.planted_basis(CFG.d_model, dtype=torch.float64)[:, :2])
    assert float(angles.max()) < 10.0, angles


def test_each_member_equals_training_it_alone(model, swept):
    """Member (layer 1, position -1, k 2) after 60 vmapped steps equals ``train_das`` on that hypothesis alone: the
    first loss exactly (1e-12), rotation and every loss to 1e-6 relative -- the remaining difference is the
    optimizer's step scalars (learning rate, bias corrections), float32 tensors under vmap and Python floats alone
    (``optim._bias_corrections``), not the intervention. IIA equal."""
    train, test, result = swept
    with unchecked():
        alone, losses = das.train_das(model, CFG, "blocks.1.resid_post", *train, 2, positions=[-1], steps=60, lr=0.1)
    member = 7
    torch.testing.assert_close(result.losses[0, member], torch.tensor(losses[0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.losses[:, member], torch.tensor(losses, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.params["rotation"][member], alone["rotation"], rtol=1e-6, atol=1e-7)
    score = das.iia(model, CFG, "blocks.1.resid_post", *test, alone, 2, positions=[-1])
    assert float(score) == float(result.iia[1, 1, 1])


def _members(seeds: range) -> list[dict]:
    return [das.das_params(CFG.d_model, seed=s, dtype=torch.float64) for s in seeds]


def _alone_loss(model, base, source, labels, layer: int, site: str, position: int, k: int):
    """One hypothesis's loss, run alone through the whole model (``das.interchange_logits``)."""
    path = f"blocks.{layer}.{site}"
    source_activation = das.site_activation(model, source, CFG, path)
    return lambda p: das.last_position_loss(
        das.interchange_logits(model, CFG, path, base, source_activation, p, k, [position]), labels)


def test_one_stacked_step_equals_each_step_alone(model):
    """One step of the stacked hypotheses (float64; every member started at its own layer): every member's loss,
    gradient-driven update and Adam state equal ``optimizer_step`` on it alone through the whole model (atol 1e-12
    for values and moments)."""
    base, source, labels = planted.pairs(8, CFG, seed=5)
    masks = hypotheses.hypothesis_masks(POSITIONS, KS, 3, CFG.d_model)
    opt = ft.optim.adamw(0.1, weight_decay=0.0)
    groups = hypotheses.starts(model, CFG, base, source, LAYERS, "resid_post")
    members = _members(range(8))
    step = hypotheses.sweep_step(model, CFG, groups, masks, labels, opt)
    new, state, values = step(ft.tree.stack(members), ft.tree.stack([opt.init(p) for p in members]))
    for i, (p, (layer, position, k)) in enumerate(zip(members, GRID, strict=True)):
        alone = das.optimizer_step(_alone_loss(model, base, source, labels, layer, "resid_post", position, k), opt)
        one, one_state, value = alone(p, opt.init(p))
        torch.testing.assert_close(values[i], value, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.mu["rotation"][i], one_state.mu["rotation"], rtol=0, atol=1e-12)
        torch.testing.assert_close(new["rotation"][i], one["rotation"], rtol=1e-6, atol=1e-9)


def test_started_members_equal_the_whole_model_run(model):
    """Every member started at its layer from the cached base run gives the last-position logits of the whole
    intervened model (``das.interchange_logits``), float64 to 1e-12, for ``resid_post`` (started after the block)
    and ``resid_mid`` (started at the block, the swap inside it); the same in any layer order and in chunks."""
    base, source, _ = planted.pairs(8, CFG, seed=7)
    masks = hypotheses.hypothesis_masks(POSITIONS, KS, 3, CFG.d_model)
    members = _members(range(8, 16))
    for site in ("resid_post", "resid_mid"):
        groups = hypotheses.starts(model, CFG, base, source, LAYERS, site)
        got = hypotheses.sweep_logits(model, CFG, groups, ft.tree.stack(members), masks)
        for i, (p, (layer, position, k)) in enumerate(zip(members, GRID, strict=True)):
            path = f"blocks.{layer}.{site}"
            activation = das.site_activation(model, source, CFG, path)
            whole = das.interchange_logits(model, CFG, path, base, activation, p, k, [position])
            torch.testing.assert_close(got[i, ..., -1, :], whole[..., -1, :], rtol=0, atol=1e-12)
        backwards = hypotheses.starts(model, CFG, base, source, LAYERS[::-1], site)  # layer-major in the order given
        swapped = hypotheses.sweep_logits(model, CFG, backwards, ft.tree.stack(members[4:] + members[:4]), masks)
        torch.testing.assert_close(torch.cat([swapped[4:], swapped[:4]]), got, rtol=0, atol=1e-12)
        chunked = hypotheses.sweep_logits(model, CFG, groups, ft.tree.stack(members), masks, chunk=3)
        torch.testing.assert_close(chunked, got, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        hypotheses.sweep_logits(model, CFG, groups, ft.tree.stack(members), masks, chunk=0)
    with pytest.raises(ValueError, match="expected 2 layers x 4"):
        hypotheses.sweep_logits(model, CFG, groups, ft.tree.stack(members[:3]), masks)


def test_the_heatmap_is_written(swept, tmp_path):
    _, _, result = swept
    path = ft.interp.plot_iia_heatmap(result.iia, tmp_path / "iia.png", layers=LAYERS, positions=POSITIONS, ks=KS)
    assert path.stat().st_size > 1000
    with pytest.raises((ValueError, TypeError)):  # the shape check (jaxtyping's, under the tests' hook) or ours
        ft.interp.plot_iia_heatmap(result.iia[0], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels has 3 entries"):
        ft.interp.plot_iia_heatmap(result.iia, tmp_path / "bad.png", layers=[0, 1, 2])


def test_bad_input_is_named(model):
    pairs = planted.pairs(4, CFG, seed=6)
    with pytest.raises(ValueError, match="ks"):
        ft.interp.das_sweep(model, CFG, pairs, pairs, layers=[0], positions=[-1], ks=[7], steps=1)
    with pytest.raises(ValueError, match="positions"):
        ft.interp.das_sweep(model, CFG, pairs, pairs, layers=[0], positions=[5], ks=[1], steps=1)
    with pytest.raises(ValueError, match="layers"):
        ft.interp.das_sweep(model, CFG, pairs, pairs, layers=[2], positions=[-1], ks=[1], steps=1)
    with pytest.raises(TypeError):  # beartype (the tests' hook) or our message naming (base, source, labels)
        ft.interp.das_sweep(model, CFG, pairs[:2], pairs, layers=[0], positions=[-1], ks=[1], steps=1)
