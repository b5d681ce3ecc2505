"""Trainable interventions (``interp.das``, ``interp.reft``) against ground truth on a hand-built model.

The model (float64, one block whose attention and MLP write nothing, so the residual stream is the token
embedding): token ``t`` of 8 is embedded at angle ``2 pi t / 8`` on a circle of radius 4 in the PLANTED
subspace, coordinates ``[0:2]`` of a 10-wide residual, plus per-token noise in ``[2:10]`` that the separate
unembedding never reads. The output at the last position is that position's token (an exact echo), so the
variable "last token" lives in the planted 2-D subspace of ``blocks.0.resid_post`` at position -1, and an
interchange there makes the model answer the SOURCE's last token.
"""

import math

import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.interp import das, reft

VOCAB, D, SEQ, SITE = 8, 10, 3, "blocks.0.resid_post"
CFG = ft.Config(vocab_size=VOCAB, d_model=D, n_heads=1, n_layers=1, d_ff=16, max_seq_len=SEQ).replace(
    positional="rope", norm="rmsnorm", **{"embeddings.tie": False}
)
PLANTED = torch.eye(D, dtype=torch.float64)[:, :2]  # the planted subspace, as orthonormal columns


def echo_model() -> dict:
    """The hand-set params: residual = embedding, unembedding reads the planted circle back."""
    params = ft.init_params(CFG, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    angles = 2 * math.pi * torch.arange(VOCAB, dtype=torch.float64) / VOCAB
    circle = torch.stack([angles.cos(), angles.sin()], dim=-1)
    params["embed"]["tokens"] = torch.cat([4 * circle, torch.randn(VOCAB, D - 2, generator=gen, dtype=torch.float64)], -1)
    for name in ("w_o", "b_o"):
        params["blocks"][0]["attn"][name] = torch.zeros_like(params["blocks"][0]["attn"][name])
    for name in ("w_out", "b_out"):
        params["blocks"][0]["mlp"][name] = torch.zeros_like(params["blocks"][0]["mlp"][name])
    params["unembed"]["w"] = torch.cat([5 * circle.T, torch.zeros(D - 2, VOCAB, dtype=torch.float64)])
    return params


def pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` (base, source) pairs whose last tokens differ; the counterfactual label is the source's last token."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    source = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    source[:, -1] = (base[:, -1] + torch.randint(1, VOCAB, (n,), generator=gen)) % VOCAB
    return base, source, source[:, -1].clone()


@pytest.fixture(scope="module")
def model():
    params = echo_model()
    tokens = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(2))
    assert torch.equal(ft.forward(params, tokens, CFG)[:, -1].argmax(-1), tokens[:, -1])  # an exact echo
    return params


@pytest.fixture(scope="module")
def trained(model):
    snapshot = {k: v.clone() for k, v in ft.tree.flatten_with_paths(model).items()}
    base, source, labels = pairs(64, seed=3)
    params_i, losses = das.train_das(model, CFG, SITE, base, source, labels, k=2, positions=[-1], steps=100, lr=0.1)
    after = ft.tree.flatten_with_paths(model)
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)  # the model is untouched
    return params_i, losses


def test_orthogonal_is_a_rotation_for_any_parameter():
    r = das.orthogonal(torch.randn(6, 6, dtype=torch.float64))
    torch.testing.assert_close(r @ r.T, torch.eye(6, dtype=torch.float64))
    assert abs(float(torch.linalg.det(r)) - 1.0) < 1e-10


def test_the_gradient_tree_holds_only_intervention_leaves(model):
    """``grad`` over the intervention params: one leaf, ``rotation``; no model param asks for a gradient."""
    base, source, labels = pairs(8, seed=4)
    act = das.site_activation(model, source, CFG, SITE)

    def loss(p):
        return das.last_position_loss(das.interchange_logits(model, CFG, SITE, base, act, p, 2, [-1]), labels)

    grads = torch.func.grad(loss)(das.das_params(D, dtype=torch.float64))
    assert list(ft.tree.flatten_with_paths(grads)) == ["rotation"] and grads["rotation"].shape == (D, D)
    assert not any(v.requires_grad for v in ft.tree.flatten_with_paths(model).values())


def test_swapping_the_planted_subspace_is_the_counterfactual(model):
    """With the identity rotation (A = 0) the swap is exactly the planted one: IIA is 1."""
    base, source, labels = pairs(64, seed=5)
    identity = {"rotation": torch.zeros(D, D, dtype=torch.float64)}
    assert float(das.iia(model, CFG, SITE, base, source, labels, identity, 2, positions=[-1])) == 1.0


def test_das_finds_the_planted_subspace(model, trained):
    """From a random rotation, DAS (k=2) reaches IIA >= 0.95 on held-out pairs, and its subspace aligns with the
    planted one: both principal angles (arccos of the singular values of Q_learned^T Q_planted) under 10 degrees
    (measured: 5.4 and 7.6 degrees; the unread noise coordinates cost the loss almost nothing, so the last
    few degrees of tilt towards them are not trained away)."""
    params_i, losses = trained
    assert losses[-1] < 0.05 * losses[0]
    base, source, labels = pairs(256, seed=6)
    assert float(das.iia(model, CFG, SITE, base, source, labels, params_i, 2, positions=[-1])) >= 0.95
    angles = das.principal_angles(das.subspace(params_i, 2), PLANTED)
    assert float(angles.max()) < 10.0, f"principal angles {angles.tolist()} degrees"


def test_a_random_rotation_stays_near_chance(model):
    """An untrained random rotation swaps a random 2-D subspace of 10: IIA near chance (1/8 over 8 tokens)."""
    base, source, labels = pairs(256, seed=6)
    scores = [float(das.iia(model, CFG, SITE, base, source, labels, das.das_params(D, seed=s, dtype=torch.float64),
                            2, positions=[-1])) for s in range(5)]
    assert sum(scores) / len(scores) < 0.3, scores


def test_stacked_rotations_run_as_one_vmap_equal_to_each_alone(model):
    """DAS params are a pytree: a stack of rotations (hypotheses) runs as one ``vmap``, logits and gradients
    equal to each rotation run alone (float64, exact up to 1e-12)."""
    base, source, labels = pairs(16, seed=10)
    act = das.site_activation(model, source, CFG, SITE)
    stack = {"rotation": torch.stack([das.das_params(D, seed=s, dtype=torch.float64)["rotation"] for s in range(3)])}

    def loss(p):
        return das.last_position_loss(das.interchange_logits(model, CFG, SITE, base, act, p, 2, [-1]), labels)

    grads = torch.func.vmap(torch.func.grad(loss))(stack)["rotation"]
    alone = torch.stack([torch.func.grad(loss)({"rotation": a})["rotation"] for a in stack["rotation"]])
    torch.testing.assert_close(grads, alone, atol=1e-12, rtol=0)


def test_the_swap_acts_only_at_the_chosen_positions(model):
    """At position 0 (which the output does not read) the swap changes nothing: the base's answer stays."""
    base, source, labels = pairs(32, seed=7)
    identity = {"rotation": torch.zeros(D, D, dtype=torch.float64)}
    assert float(das.iia(model, CFG, SITE, base, source, base[:, -1], identity, 2, positions=[0])) == 1.0


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_a_rank_1_reft_edit_teaches_a_new_fixed_answer(model, kind):
    """LoReFT (and DiReFT), rank 1 at one layer and the last position, trained so the model always answers token 5: it does on
    held-out inputs, and the model's weights stay bit-identical."""
    snapshot = {k: v.clone() for k, v in ft.tree.flatten_with_paths(model).items()}
    gen = torch.Generator().manual_seed(8)
    tokens, held_out = torch.randint(0, VOCAB, (64, SEQ), generator=gen), torch.randint(0, VOCAB, (128, SEQ), generator=gen)
    target = torch.full((64,), 5)
    params_i, losses = reft.train_reft(model, CFG, SITE, tokens, target, 1, positions=[-1], steps=150, lr=0.1, kind=kind)
    assert losses[-1] < 0.1 * losses[0]
    assert sorted(ft.tree.flatten_with_paths(params_i)) == ["R", "W", "b"] and params_i["R"].shape == (1, D)
    logits = reft.reft_logits(model, CFG, SITE, held_out, params_i, positions=[-1], kind=kind)
    assert float((logits[:, -1].argmax(-1) == 5).to(torch.float64).mean()) >= 0.95
    after = ft.tree.flatten_with_paths(model)
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    plain = ft.forward(model, held_out, CFG)
    assert torch.equal(plain[:, -1].argmax(-1), held_out[:, -1])  # without the edit, still the echo


def test_loreft_rows_are_orthonormal_and_the_edit_starts_as_a_no_op():
    p = reft.reft_params(D, 3, dtype=torch.float64)
    rows = reft.orthonormal_rows(p["R"])
    torch.testing.assert_close(rows @ rows.T, torch.eye(3, dtype=torch.float64))
    h = torch.randn(2, SEQ, D, dtype=torch.float64)
    torch.testing.assert_close(reft.loreft_intervention(p)(h), h)
    torch.testing.assert_close(reft.direft_intervention(reft.reft_params(D, 3, dtype=torch.float64, kind="direft"))(h), h)


def test_loreft_and_direft_edits_are_the_formulas_at_the_chosen_positions():
    """LoReFT is ``h + R^T (W h + b - R h)``, DiReFT ``h + R^T (W h + b)``, with ``R``'s rows orthonormal, at the
    chosen positions only (float64)."""
    gen = torch.Generator().manual_seed(9)
    p = {"R": torch.randn(2, D, generator=gen, dtype=torch.float64), "W": torch.randn(2, D, generator=gen, dtype=torch.float64),
         "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    h = torch.randn(3, SEQ, D, generator=gen, dtype=torch.float64)
    rows = torch.linalg.qr(p["R"].T).Q.T
    lo, di = reft.loreft_intervention(p, positions=[1])(h), reft.direft_intervention(p, positions=[1])(h)
    torch.testing.assert_close(lo[:, 1], h[:, 1] + (h[:, 1] @ p["W"].T + p["b"] - h[:, 1] @ rows.T) @ rows)
    torch.testing.assert_close(di[:, 1], h[:, 1] + (h[:, 1] @ p["W"].T + p["b"]) @ rows)
    for edited in (lo, di):
        assert torch.equal(edited[:, [0, 2]], h[:, [0, 2]])


def test_principal_angles_of_a_known_pair():
    """Spans of (e0, e1) and (e0, cos 30 e1 + sin 30 e2): angles 0 and 30 degrees."""
    eye = torch.eye(3, dtype=torch.float64)
    tilted = torch.stack([eye[0], math.cos(math.pi / 6) * eye[1] + math.sin(math.pi / 6) * eye[2]], dim=-1)
    torch.testing.assert_close(das.principal_angles(eye[:, :2], tilted).sort().values,
                               torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="square"):
        das.orthogonal(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k"):
        das.das_intervention(das.das_params(4), torch.zeros(1, 2, 4), 5)
    with pytest.raises(ValueError, match="positions"):
        das.das_intervention(das.das_params(4), torch.zeros(1, 2, 4), 2, positions=[7])(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="r <= d"):
        reft.orthonormal_rows(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="kind"):
        reft.train_reft({}, CFG, SITE, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), 1, kind="lora")
    with pytest.raises(ValueError, match="site"):
        das.site_activation({}, torch.zeros(1, 2, dtype=torch.long), CFG, "nowhere")
    assert interp.train_das is das.train_das and interp.train_reft is reft.train_reft
