"""EK-FAC influence, pinned to its math (float64, a model small enough to form every matrix).

(a) ``precondition`` equals solving with the eigen-corrected Kronecker matrix formed explicitly (damped);
(b) the factors equal covariances summed by a plain loop over sequences from taps and autograd (no probes),
    for the true Fisher (the same sampled labels) and the empirical one, GQA's split w_qkv included;
(c) one one-token sequence: the K-FAC assumption holds exactly, the corrected eigenvalues are the outer product of
    the factors' eigenvalues and EK-FAC is the empirical Fisher ``vec(dW) vec(dW)^T`` itself;
(d) the damped Gauss-Newton block of one leaf (columns of ``ggn_vp``) against EK-FAC's for a one-token sequence:
    there ``GGN = a a^T (x) J^T H J`` exactly and EK-FAC is ``a a^T (x) mean_y g_y g_y^T`` over sampled labels,
    so they agree up to the Monte Carlo error of the labels (stated bound).
"""

import weakref

import pytest
import torch
from safetensors.torch import save_file

import ftransformer as ft
from ftransformer.attribution import curvature, ekfac

VOCAB, D_MODEL, HEADS, KV_HEADS, D_FF, SEQ = 11, 8, 4, 2, 12, 5


@pytest.fixture(scope="module")
def setup():
    cfg = ft.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, n_layers=2, d_ff=D_FF,
                    max_seq_len=8, init_std=0.4)
    params = ft.init_params(cfg, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (6, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (6, SEQ), generator=gen)
    batches = [(tokens[:4], targets[:4]), (tokens[4:], targets[4:])]
    return cfg, params, batches


def _leaf_grad(params, cfg, tokens, targets, path):
    """The gradient of the summed loss of one sequence at the leaf ``path`` (plain autograd on the parameter); a
    pattern gives the dict of every leaf it matches."""
    of_sub, chosen = curvature.restrict(lambda p: ft.loss_fn(p, tokens, targets, cfg, reduction="sum"), params, [path])
    grads = torch.func.grad(of_sub)(chosen)
    return grads if "*" in path else grads[path]


def test_blocks_split_fused_qkv_by_gqa_widths(setup):
    cfg, params, _ = setup
    blocks = ekfac.kfac_blocks(params, cfg)
    hd = cfg.head_dim
    assert blocks["blocks.1.attn.w_qkv.q"] == ekfac.Block("blocks.1.attn.w_qkv", 0, HEADS * hd)
    assert blocks["blocks.1.attn.w_qkv.v"] == ekfac.Block("blocks.1.attn.w_qkv", (HEADS + KV_HEADS) * hd,
                                                          (HEADS + 2 * KV_HEADS) * hd)
    assert set(ekfac.kfac_blocks(params, cfg, split_qkv=False)) >= {"blocks.0.attn.w_qkv", "blocks.0.mlp.w_out"}
    with pytest.raises(ValueError, match="match no projection"):
        ekfac.kfac_blocks(params, cfg, ["blocks.9.*"])
    with pytest.raises(ValueError, match=r"\[d_in, d_out\] projection leaves"):
        ekfac.kfac_blocks(params, cfg, ["blocks.0.ln1.*"])


def test_probe_pass_hands_each_gradient_over_during_the_backward_and_drops_it(setup):
    cfg, params, batches = setup
    paths = {b.path for b in ekfac.kfac_blocks(params, cfg).values()}
    seen, inputs, earlier = [], [], []

    def on_grad(path, node, g):
        # every earlier gradient still alive is the residual stream's (autograd's own): no w_qkv / w_in gradient
        # outlives its own call, so memory holds one layer's, not the batch's
        assert all(r().shape[-1] == D_MODEL for r in earlier if r() is not None), path
        assert g.shape == (*batches[0][0].shape, node.shape[-1])
        earlier.append(weakref.ref(g))
        seen.append(path)

    ekfac.probe_pass(params, cfg, *batches[0], paths, lambda path, node, x: inputs.append(path), on_grad)
    assert sorted(seen) == sorted(inputs) == sorted(paths)
    assert seen.index("blocks.1.attn.w_qkv") < seen.index("blocks.0.mlp.w_out")  # the backward's order, layer by layer
    assert {r().shape[-1] for r in earlier if r() is not None} <= {D_MODEL}


def test_sequence_grads_equal_autograd_per_sequence(setup):
    cfg, params, batches = setup
    factors = ekfac.fit_factors(params, cfg, batches[1:], fisher="empirical", progress=False)
    tokens, targets = batches[0]
    grads = ekfac.sequence_grads(params, cfg, factors, batches[0])
    for name, block in factors.blocks.items():
        for i in range(tokens.shape[0]):
            expected = _leaf_grad(params, cfg, tokens[i], targets[i], block.path)[:, block.start:block.stop]
            torch.testing.assert_close(grads[name][i], expected)


def _labels(params, cfg, batches, key):
    """Each batch's labels: its targets, or (``key``) labels sampled from the model as ``fit_factors`` draws them."""
    if key is None:
        return [targets for _, targets in batches]
    return [ekfac.sample_labels(ft.forward(params, tokens, cfg), ft.random.fold_in(key, b))
            for b, (tokens, _) in enumerate(batches)]


def test_lora_adapter_blocks_equal_autograd_on_the_adapter_matrices(setup):
    cfg, params, batches = setup
    adapted = ft.peft.lora(params, cfg, rank=3, alpha=6.0, targets=["blocks.*.attn.w_qkv", "blocks.1.mlp.w_in"],
                           key=ft.random.key(0))
    gen = torch.Generator().manual_seed(4)
    adapted = ft.peft.adapters.map_nodes(adapted, lambda p, w: w._replace(b=torch.randn(w.b.shape, generator=gen,
                                         dtype=torch.float64)) if isinstance(w, ft.peft.LoRAWeight) else w)
    blocks = ekfac.kfac_blocks(adapted, cfg, ["blocks.*.attn.w_qkv", "blocks.1.mlp.w_in.b"])
    assert blocks["blocks.0.attn.w_qkv.a"] == ekfac.Block("blocks.0.attn.w_qkv", 0, 3, "lora_a")
    assert "blocks.1.mlp.w_in.a" not in blocks and blocks["blocks.1.mlp.w_in.b"].kind == "lora_b"
    factors = ekfac.fit_factors(adapted, cfg, batches, paths=list(blocks), key=ft.random.key(2), progress=False)
    assert factors.factors["blocks.0.attn.w_qkv.a"].lambdas.shape == (D_MODEL, 3)
    tokens, targets = batches[1]
    grads = ekfac.sequence_grads(adapted, cfg, factors, batches[1])
    for i in range(tokens.shape[0]):
        expected = _leaf_grad(adapted, cfg, tokens[i], targets[i], "blocks.*.*.[ab]")
        for name in blocks:
            torch.testing.assert_close(grads[name][i], expected[name])
    scores = ekfac.pairwise_scores(adapted, cfg, factors, batches[1], batches, damping=1e-2, progress=False)
    assert scores.shape == (2, 6) and scores.isfinite().all()


def _loop_covariances(params, cfg, batches, layer, key):
    """A and G of ``blocks.{layer}.mlp.w_out`` by a loop over sequences: its input is the tap ``mlp.hidden``, its
    output gradient that of the residual stream after it (pre-LN), through a zero intervention."""
    a_sum = g_sum = 0.0
    count = 0
    for (tokens, _), labels in zip(batches, _labels(params, cfg, batches, key)):
        for i in range(tokens.shape[0]):
            zero = torch.zeros(SEQ, D_MODEL, dtype=torch.float64, requires_grad=True)
            logits, acts = ft.forward_with_activations(
                params, tokens[i], cfg, interventions={f"blocks.{layer}.resid_post": lambda x: x + zero})
            loss = ft.model.cross_entropy(logits, labels[i], reduction="sum")
            (g,) = torch.autograd.grad(loss, zero)
            a = acts["blocks"][layer]["mlp"]["hidden"].detach()
            a_sum, g_sum, count = a_sum + a.T @ a, g_sum + g.T @ g, count + SEQ
    return a_sum / count, g_sum / count


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_factors_equal_a_loop_over_sequences(setup, fisher):
    cfg, params, batches = setup
    key = ft.random.key(3) if fisher == "true" else None
    factors = ekfac.fit_factors(params, cfg, batches, paths=["blocks.*.mlp.w_out"], fisher=fisher, key=key,
                                progress=False)
    assert (factors.sequences, factors.tokens, factors.fisher) == (6, 6 * SEQ, fisher)
    for layer in range(2):
        a_cov, g_cov = _loop_covariances(params, cfg, batches, layer, key)
        f = factors.factors[f"blocks.{layer}.mlp.w_out"]
        torch.testing.assert_close(f.a_cov, a_cov)
        torch.testing.assert_close(f.g_cov, g_cov)
        torch.testing.assert_close(f.a_vectors @ torch.diag(f.a_values) @ f.a_vectors.T, a_cov)
        torch.testing.assert_close(f.g_vectors @ torch.diag(f.g_values) @ f.g_vectors.T, g_cov)
        # The eigenvalue correction: the mean over sequences of the squared rotated per-sequence gradients.
        rotated = [f.a_vectors.T @ _leaf_grad(params, cfg, tokens[i], labels[i], f"blocks.{layer}.mlp.w_out") @ f.g_vectors
                   for (tokens, _), labels in zip(batches, _labels(params, cfg, batches, key))
                   for i in range(tokens.shape[0])]
        torch.testing.assert_close(f.lambdas, torch.stack(rotated).square().mean(0))


def _ekfac_matrix(f: ekfac.BlockFactors, damping: float) -> torch.Tensor:
    """The damped EK-FAC matrix over ``vec(W)`` (row-major ``[d_in, d_out]``), formed explicitly."""
    q = torch.kron(f.a_vectors, f.g_vectors)
    return q @ torch.diag(f.lambdas.reshape(-1) + damping) @ q.T


def test_precondition_equals_solving_the_explicit_matrix(setup):
    cfg, params, batches = setup
    factors = ekfac.fit_factors(params, cfg, batches, paths=["blocks.0.attn.w_o", "blocks.1.attn.w_qkv"],
                                key=ft.random.key(0), progress=False)
    grads = ekfac.sequence_grads(params, cfg, factors, batches[1])
    for damping in (1e-3, None):
        pre = ekfac.precondition(grads, factors, damping)
        for name, f in factors.factors.items():
            lam = ekfac.block_damping(f, damping)
            matrix = _ekfac_matrix(f, float(lam))
            expected = torch.linalg.solve(matrix, grads[name].reshape(len(grads[name]), -1).T).T
            torch.testing.assert_close(pre[name].reshape(len(grads[name]), -1), expected)
    # Scores are query . preconditioned train, summed over blocks; the token scores sum to them.
    scores = ekfac.pairwise_scores(params, cfg, factors, batches[1], batches, damping=1e-3, progress=False)
    train = [ekfac.sequence_grads(params, cfg, factors, b) for b in batches]
    pre_train = {n: torch.cat([ekfac.precondition(t, factors, 1e-3)[n] for t in train]) for n in factors.factors}
    expected = sum(torch.einsum("qio,bio->qb", grads[n], pre_train[n]) for n in factors.factors)
    torch.testing.assert_close(scores, expected)
    tokens = ekfac.pairwise_token_scores(params, cfg, factors, batches[1], batches, damping=1e-3, progress=False)
    assert tokens.shape == (2, 6, SEQ)
    torch.testing.assert_close(tokens.sum(-1), scores)


def test_one_token_sequence_makes_ekfac_the_empirical_fisher(setup):
    cfg, params, _ = setup
    tokens, targets = torch.tensor([[3]]), torch.tensor([[7]])
    path = "blocks.1.mlp.w_in"
    factors = ekfac.fit_factors(params, cfg, [(tokens, targets)], paths=[path], fisher="empirical", progress=False)
    f = factors.factors[path]
    torch.testing.assert_close(f.lambdas, torch.outer(f.a_values, f.g_values).clamp(min=0), atol=1e-12, rtol=1e-9)
    dw = _leaf_grad(params, cfg, tokens[0], targets[0], path).reshape(-1)
    fisher = torch.outer(dw, dw)
    torch.testing.assert_close(_ekfac_matrix(f, 0.0), fisher, atol=1e-10, rtol=1e-8)
    v = torch.randn(dw.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pre = ekfac.precondition({path: v.view(D_MODEL, D_FF)}, factors, 0.05)[path]
    torch.testing.assert_close(pre.reshape(-1), torch.linalg.solve(fisher + 0.05 * torch.eye(dw.numel(),
                                                                   dtype=torch.float64), v))


def test_damped_gauss_newton_block_matches_ekfac_for_one_token(setup):
    cfg, params, _ = setup
    path, copies = "blocks.1.mlp.w_out", 4000
    tokens = torch.tensor([[5]])
    like = curvature.select(params, [path])
    n = like[path].numel()
    columns = [curvature.ggn_vp(params, tokens, cfg, {path: e.view_as(like[path])}, paths=[path])[path].reshape(-1)
               for e in torch.eye(n, dtype=torch.float64)]
    ggn = torch.stack(columns, 1)
    batch = (tokens.expand(copies, 1), tokens.expand(copies, 1))
    factors = ekfac.fit_factors(params, cfg, [batch], paths=[path], key=ft.random.key(7), progress=False)
    ek = _ekfac_matrix(factors.factors[path], 0.0)
    # Both are a a^T (x) (a d_out x d_out factor); EK-FAC's second factor averages `copies` sampled labels.
    error = torch.linalg.matrix_norm(ek - ggn) / torch.linalg.matrix_norm(ggn)
    assert error < 4 / copies**0.5, f"relative error {error:.4f} above the Monte Carlo bound"
    damping = 1e-2 * torch.linalg.eigvalsh(ggn).max()
    v = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = v.T @ torch.linalg.solve(ggn + damping * torch.eye(n, dtype=torch.float64), v)
    ours = v.T @ ekfac.precondition({path: v.T.reshape(2, D_FF, D_MODEL)}, factors, float(damping))[path].reshape(2, -1).T
    torch.testing.assert_close(ours, exact, rtol=4 / copies**0.5, atol=0.0)


def test_factors_round_trip_through_safetensors(setup, tmp_path):
    cfg, params, batches = setup
    factors = ekfac.fit_factors(params, cfg, batches, paths=["blocks.0.attn.w_*"], key=ft.random.key(1), progress=False)
    loaded = ekfac.load_factors(ekfac.save_factors(factors, tmp_path / "f.safetensors"))
    assert (loaded.blocks, loaded.fisher, loaded.sequences, loaded.tokens) == (
        factors.blocks, factors.fisher, factors.sequences, factors.tokens)
    for name, f in factors.factors.items():
        for a, b in zip(f, loaded.factors[name]):
            assert torch.equal(a, b)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no EK-FAC factors"):
        ekfac.load_factors(tmp_path / "other.safetensors")


def test_bad_arguments_name_what_was_expected(setup):
    cfg, params, batches = setup
    with pytest.raises(ValueError, match="fisher must be one of"):
        ekfac.fit_factors(params, cfg, batches, fisher="fisher")
    with pytest.raises(ValueError, match="pass key="):
        ekfac.fit_factors(params, cfg, batches)
    with pytest.raises(TypeError, match="re-iterable"):
        ekfac.fit_factors(params, cfg, iter(batches), fisher="empirical")
    factors = ekfac.fit_factors(params, cfg, batches, paths=["blocks.0.attn.w_o"], fisher="empirical", progress=False)
    with pytest.raises(ValueError, match="damping must be"):
        ekfac.pairwise_scores(params, cfg, factors, batches[0], batches, damping=-1.0, progress=False)
    with pytest.raises(ValueError, match="grads must hold"):
        ekfac.precondition({}, factors)
    with pytest.raises(ValueError, match="train_batches is empty"):
        ekfac.pairwise_scores(params, cfg, factors, batches[0], [], progress=False)
