"""Projected-gradient attribution, checked against explicit gradients and explicit projection matrices (float64)."""

import json

import pytest
import torch

import ftransformer as ft
from ftransformer.attribution import projected as pj
from ftransformer.peft.adapters import map_nodes

SEQS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12], [3, 3, 3, 3, 3, 3], [0, 1]]
ATTN = ["blocks.0.attn.*"]


@pytest.fixture(scope="module")
def model():
    cfg = ft.Config(vocab_size=13, d_model=8, n_heads=2, n_layers=2, d_ff=12, max_seq_len=8, init_std=0.3)
    return cfg, ft.init_params(cfg, seed=0, dtype=torch.float64)


def _explicit_grads(params, cfg, paths):
    """Each sequence's gradient of its summed loss by plain autograd, one sequence at a time, laid flat."""
    rows = []
    for s in SEQS:
        chosen = pj.select(params, paths)
        leaves = {p: x.detach().clone().requires_grad_() for p, x in chosen.items()}
        flat = {**ft.tree.flatten_with_paths(params), **leaves}
        ids = torch.tensor(s)
        loss = ft.loss_fn(ft.tree.unflatten_paths(flat, params), ids[:-1], ids[1:], cfg, reduction="sum")
        grads = torch.autograd.grad(loss, list(leaves.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows), chosen


def test_pad_sequences_pads_targets_with_ignore_index():
    tokens, targets = pj.pad_sequences([[1, 2, 3], [4, 5]])
    assert tokens.tolist() == [[1, 2], [4, 0]] and targets.tolist() == [[2, 3], [5, -100]]
    with pytest.raises(ValueError, match=">= 2 ids"):
        pj.pad_sequences([[1, 2], [3]])


@pytest.mark.parametrize("distribution", pj.DISTRIBUTIONS)
def test_dense_projection_of_the_exact_gradient_is_the_explicit_matrix_product(model, distribution, monkeypatch):
    cfg, params = model
    monkeypatch.setattr(pj, "ROWS", 37)  # several blocks per leaf, a ragged last one
    g, chosen = _explicit_grads(params, cfg, ATTN)
    tokens, targets = pj.pad_sequences(SEQS)
    grads = pj.example_grads(params, tokens, targets, cfg, ATTN)
    torch.testing.assert_close(torch.cat([x.reshape(len(SEQS), -1) for x in grads.values()], 1), g, atol=1e-12, rtol=0)
    proj = pj.Projection(ft.random.key(3), 20, distribution)
    matrix = pj.dense_matrix(proj, chosen)
    assert matrix.shape == (g.shape[1], 20) and matrix.dtype == torch.float64
    torch.testing.assert_close(pj.features(params, tokens, targets, cfg, proj, ATTN), g @ matrix, atol=1e-12, rtol=0)
    if distribution == "rademacher":
        assert set(matrix.abs().unique().tolist()) == {20 ** -0.5}


def test_kronecker_projection_is_the_kronecker_product_times_the_vectorised_gradient(model):
    cfg, params = model
    paths = ["blocks.0.attn.w_qkv", "blocks.1.mlp.*"]
    tokens, targets = pj.pad_sequences(SEQS)
    proj = pj.Projection(ft.random.key(5), 3, "gaussian", "kronecker")
    out = pj.kronecker_grads(params, tokens, targets, cfg, proj, paths)
    assert list(out) == ["blocks.0.attn.w_qkv", "blocks.1.mlp.w_in", "blocks.1.mlp.w_out"]
    full = pj.example_grads(params, tokens, targets, cfg, list(out))
    for path, projected in out.items():
        w = ft.tree.flatten_with_paths(params)[path]
        p_a, p_g = pj.kronecker_factors(proj, path, *w.shape, w.dtype, w.device)
        kron = torch.kron(p_g, p_a)  # acts on column-major vec(dL/dW)
        for i in range(len(SEQS)):
            expected = kron.T @ full[path][i].T.reshape(-1)
            torch.testing.assert_close(projected[i].T.reshape(-1), expected, atol=1e-12, rtol=0)
    feats = pj.features(params, tokens, targets, cfg, proj, paths)
    assert feats.shape == (len(SEQS), 3 * 9)


def test_keys_reproduce_and_differ(model):
    cfg, params = model
    tokens, targets = pj.pad_sequences(SEQS)
    for kind in pj.KINDS:
        a = pj.features(params, tokens, targets, cfg, pj.Projection(ft.random.key(7), 4, kind=kind), ATTN)
        b = pj.features(params, tokens, targets, cfg, pj.Projection(ft.random.key(7), 4, kind=kind), ATTN)
        c = pj.features(params, tokens, targets, cfg, pj.Projection(ft.random.key(8), 4, kind=kind), ATTN)
        assert torch.equal(a, b) and not torch.allclose(a, c)
    # The batch a sequence is projected in does not change its features.
    proj = pj.Projection(ft.random.key(7), 4)
    whole = torch.cat([f for _, f in pj.featurize(params, cfg, SEQS, proj, paths=ATTN, batch_size=5)])
    split = torch.cat([f for _, f in pj.featurize(params, cfg, SEQS, proj, paths=ATTN, batch_size=2)])
    torch.testing.assert_close(whole, split, atol=1e-12, rtol=0)


def test_projection_preserves_inner_products_on_average():
    like = {"w": torch.zeros(300, dtype=torch.float64)}
    for distribution in pj.DISTRIBUTIONS:
        p = pj.dense_matrix(pj.Projection(ft.random.key(1), 2000, distribution), like)
        assert abs(float((p * p).sum(1).mean()) - 1.0) < 0.01  # E[P P^T] = I: diagonal
        assert float((p[:50] @ p[:50].T - torch.eye(50, dtype=p.dtype)).abs().max()) < 0.15


def test_index_round_trips_from_disk_and_scores_are_one_product(model, tmp_path):
    cfg, params = model
    proj = pj.Projection(ft.random.key(11), 6)
    texts = [f"seq {i}" for i in range(len(SEQS))]
    index = pj.build_index(params, cfg, SEQS, proj, tmp_path / "idx", paths=ATTN, texts=texts, batch_size=2,
                           progress=False, extra={"note": "test"})
    again = pj.load_index(tmp_path / "idx")
    direct = torch.cat([f for _, f in pj.featurize(params, cfg, SEQS, proj, paths=ATTN)])
    assert again.features.dtype == torch.float32 and again.features.shape == (len(SEQS), 6)
    torch.testing.assert_close(again.features.double(), direct, atol=1e-6, rtol=1e-6)
    assert torch.equal(index.features, again.features)
    assert again.meta["texts"] == texts and again.meta["paths"] == ATTN and again.meta["extra"] == {"note": "test"}
    assert int(pj.index_projection(again).key) == int(proj.key) and pj.index_projection(again)[1:] == proj[1:]
    queries = direct[:2] * 2 + 1
    feats = again.features.double()
    torch.testing.assert_close(pj.scores(again, queries, rows=2), queries @ feats.T)
    g = feats.T @ feats
    lam = 0.1 * torch.trace(g) / 6
    expected = queries @ torch.linalg.inv(g + lam * torch.eye(6, dtype=g.dtype)) @ feats.T
    torch.testing.assert_close(pj.scores(again, queries, damping=0.1, rows=3), expected)
    json.loads((tmp_path / "idx" / pj.META_FILE).read_text())


def test_bad_input_names_expected_and_got(model, tmp_path):
    cfg, params = model
    with pytest.raises(ValueError, match="Projection.distribution"):
        pj.dense_matrix(pj.Projection(ft.random.key(0), 4, "uniform"), {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="Projection.k"):
        pj.dense_matrix(pj.Projection(ft.random.key(0), 0), {"w": torch.zeros(3)})
    with pytest.raises(TypeError, match="Projection.key"):
        pj.dense_matrix(pj.Projection(0, 4), {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="no complete index"):
        pj.load_index(tmp_path)
    index_feats = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"dim=6.*got \(2, 5\)"):
        pj.scores(index_feats, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least one sequence"):
        pj.build_index(params, cfg, [], pj.Projection(ft.random.key(0), 4), tmp_path)
    with pytest.raises(ValueError, match="texts must hold one text per sequence"):
        pj.build_index(params, cfg, SEQS, pj.Projection(ft.random.key(0), 4), tmp_path, texts=["a"])


def test_kronecker_on_a_gqa_swiglu_model_and_dense_on_lora_adapters():
    cfg = ft.Config(vocab_size=13, d_model=8, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=6, max_seq_len=8,
                    bias=False, activation="swiglu", init_std=0.4, norm=ft.config.Norm(kind="rmsnorm"),
                    positional=ft.config.Positional(kind="rope"))
    params = ft.init_params(cfg, seed=3, dtype=torch.float64)
    tokens, targets = pj.pad_sequences(SEQS)
    proj = pj.Projection(ft.random.key(2), 2, kind="kronecker")
    out = pj.kronecker_grads(params, tokens, targets, cfg, proj)
    nodes = ft.tree.flatten_with_paths(params)
    assert set(out) == {p for p in nodes if p.startswith("blocks.0.") and nodes[p].ndim == 2}, list(out)
    full = pj.example_grads(params, tokens, targets, cfg, list(out))
    for path, projected in out.items():
        p_a, p_g = pj.kronecker_factors(proj, path, *nodes[path].shape, torch.float64, "cpu")
        torch.testing.assert_close(projected, p_a.T @ full[path] @ p_g, atol=1e-12, rtol=0)
    # Adapters are leaves like any other: the dense projection of a LoRA tree's a and b matrices.
    b_nonzero = lambda p, x: x._replace(b=torch.full_like(x.b, 0.1)) if hasattr(x, "b") else x  # noqa: E731
    adapted = map_nodes(ft.peft.lora(params, cfg, rank=2, alpha=4.0, key=ft.random.key(0)), b_nonzero)
    lora_paths = ["blocks.0.*.a", "blocks.0.*.b"]
    g, chosen = _explicit_grads(adapted, cfg, lora_paths)
    dense = pj.Projection(ft.random.key(4), 5)
    torch.testing.assert_close(pj.features(adapted, tokens, targets, cfg, dense, lora_paths),
                               g @ pj.dense_matrix(dense, chosen), atol=1e-12, rtol=0)
