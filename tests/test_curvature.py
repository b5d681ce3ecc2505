"""Curvature as transforms, checked against matrices formed explicitly (float64, a model small enough)."""

import math
import re

import pytest
import torch

import ftransformer as ft
from ftransformer.attribution import curvature
from ftransformer.layers import attention

VOCAB, D_MODEL, HEADS, D_FF, SEQ, BATCH = 11, 8, 2, 12, 5, 3
ATTN = ["blocks.0.attn.*"]


@pytest.fixture(scope="module")
def setup():
    cfg = ft.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, n_layers=1, d_ff=D_FF, max_seq_len=8, init_std=0.4)
    params = ft.init_params(cfg, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return cfg, params, tokens, targets


def _flatten(sub: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in sub.values()])


def _unflatten(v: torch.Tensor, like: dict) -> dict:
    parts = torch.split(v, [x.numel() for x in like.values()])
    return {p: part.view_as(x) for (p, x), part in zip(like.items(), parts)}


def _explicit(fn, params, paths):
    """``fn`` of one flat vector of the selected leaves, and that vector."""
    of_sub, chosen = curvature.restrict(fn, params, paths)
    return (lambda v: of_sub(_unflatten(v, chosen))), _flatten(chosen), chosen


@pytest.fixture(scope="module")
def hessian(setup):
    cfg, params, tokens, targets = setup
    f, x, chosen = _explicit(lambda p: ft.loss_fn(p, tokens, targets, cfg), params, ATTN)
    # torch.autograd's double backward is no torch.func transform: the fused kernel (no double backward) is
    # refused by hand here, which hvp does automatically.
    with pytest.raises(RuntimeError, match="derivative for .*scaled_dot_product"):
        torch.autograd.functional.hessian(f, x)
    with attention.attention_kernel("einsum"):
        return torch.autograd.functional.hessian(f, x, vectorize=True), chosen


def _dense(matrix, like):
    return lambda v: _unflatten(matrix @ _flatten(v), like)


def _vector(like, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(x.shape, generator=gen, dtype=x.dtype) for p, x in like.items()}


def test_hvp_equals_the_hessian_times_v_on_the_einsum_kernel(setup, hessian, monkeypatch):
    cfg, params, tokens, targets = setup
    h, chosen = hessian
    kernels = []
    chosen_kernel = attention.kernel_here
    monkeypatch.setattr(attention, "kernel_here", lambda: kernels.append(chosen_kernel()) or kernels[-1])
    assert attention.kernel_here() == "sdpa"  # this config runs on the fused kernel outside a transform
    v = _vector(chosen)
    out = curvature.hvp(lambda p: ft.loss_fn(p, tokens, targets, cfg), params, v, paths=ATTN)
    assert list(out) == list(chosen)
    torch.testing.assert_close(_flatten(out), h @ _flatten(v), atol=1e-10, rtol=0)
    assert kernels[1:] and set(kernels[1:]) == {"einsum"}, kernels


def test_hvp_of_the_whole_model_restricts_to_the_sub_tree(setup, hessian):
    cfg, params, tokens, targets = setup
    h, chosen = hessian
    everything = curvature.select(params)
    v = {p: (_vector(chosen)[p] if p in chosen else torch.zeros_like(x)) for p, x in everything.items()}
    out = curvature.hvp(lambda p: ft.loss_fn(p, tokens, targets, cfg), params, v)
    assert list(out) == list(everything)
    torch.testing.assert_close(_flatten({p: out[p] for p in chosen}), h @ _flatten(_vector(chosen)), atol=1e-10, rtol=0)


def test_hvp_on_a_gqa_rope_swiglu_rmsnorm_model_equals_the_hessian():
    cfg = ft.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=6, max_seq_len=8,
                    bias=False, activation="swiglu", init_std=0.4, norm=ft.config.Norm(kind="rmsnorm"),
                    positional=ft.config.Positional(kind="rope"))
    params = ft.init_params(cfg, seed=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    tokens, targets = torch.randint(0, VOCAB, (2, 2, SEQ), generator=gen)
    loss = lambda p: ft.loss_fn(p, tokens, targets, cfg)  # noqa: E731
    paths = ["blocks.0.attn.*", "blocks.0.ln1.*"]
    f, x, chosen = _explicit(loss, params, paths)
    with attention.attention_kernel("einsum"):
        h = torch.autograd.functional.hessian(f, x, vectorize=True)
    v = _vector(chosen, seed=5)
    torch.testing.assert_close(_flatten(curvature.hvp(loss, params, v, paths=paths)), h @ _flatten(v), atol=1e-10, rtol=0)


def test_ggn_vp_equals_j_transpose_h_j(setup):
    cfg, params, tokens, _ = setup
    paths = ["blocks.0.mlp.*", "ln_f.*"]
    f, x, chosen = _explicit(lambda p: ft.forward(p, tokens, cfg), params, paths)
    jac = torch.autograd.functional.jacobian(f, x, vectorize=True).reshape(-1, VOCAB, x.numel())
    p = torch.softmax(f(x), -1).reshape(-1, VOCAB)
    h_out = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / p.shape[0]
    ggn = torch.einsum("nvi,nvw,nwj->ij", jac, h_out, jac)
    v = _vector(chosen)
    torch.testing.assert_close(_flatten(curvature.ggn_vp(params, tokens, cfg, v, paths=paths)), ggn @ _flatten(v),
                               atol=1e-10, rtol=0)


def test_lanczos_finds_the_top_eigenvalues(setup, hessian):
    cfg, params, tokens, targets = setup
    h, chosen = hessian
    exact = torch.linalg.eigvalsh(h).flip(0)[:4]
    found = curvature.top_eigenvalues(_dense(h, chosen), chosen, 4, key=ft.random.key(0), iters=120)
    torch.testing.assert_close(found, exact, atol=1e-6, rtol=0)
    hvp = lambda v: curvature.hvp(lambda p: ft.loss_fn(p, tokens, targets, cfg), params, v, paths=ATTN)  # noqa: E731
    torch.testing.assert_close(curvature.top_eigenvalues(hvp, chosen, 2, key=ft.random.key(0), iters=120),
                               exact[:2], atol=1e-6, rtol=0)


def test_lanczos_on_a_small_operator_is_exact_and_the_key_decides_the_start():
    a = torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0], dtype=torch.float64))
    like = {"x": torch.zeros(4, dtype=torch.float64)}
    found = curvature.top_eigenvalues(_dense(a, like), like, 4, key=ft.random.key(3), iters=10)
    torch.testing.assert_close(found, torch.tensor([5.0, 2.0, 1.0, -3.0], dtype=torch.float64))
    again = curvature.top_eigenvalues(_dense(a, like), like, 4, key=ft.random.key(3), iters=10)
    assert torch.equal(found, again)


def test_hutchinson_is_within_its_statistical_tolerance_of_the_trace(hessian):
    h, chosen = hessian
    samples = 400
    # Var(z^T A z) for Rademacher z: 2 * the sum of the squared off-diagonal entries.
    std = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / samples)
    est = curvature.hutchinson_trace(_dense(h, chosen), chosen, key=ft.random.key(7), samples=samples)
    assert abs(float(est.estimate - h.trace())) < 4 * std, (float(est.estimate), float(h.trace()), std)
    assert 0.5 * std < float(est.stderr) < 2 * std
    same = curvature.hutchinson_trace(_dense(h, chosen), chosen, key=ft.random.key(7), samples=samples)
    assert torch.equal(est.estimate, same.estimate)


def test_hutchinson_is_exact_on_a_diagonal_operator():
    a = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    like = {"x": torch.zeros(2, 3, dtype=torch.float64)}
    est = curvature.hutchinson_trace(_dense(a, like), like, key=ft.random.key(0), samples=3)
    assert float(est.estimate) == 21.0 and float(est.stderr) == 0.0


def test_spectral_density_integrates_to_one_and_its_mean_is_the_trace_over_n(hessian):
    h, chosen = hessian
    n = h.shape[0]
    d = curvature.spectral_density(_dense(h, chosen), chosen, key=ft.random.key(1), probes=16, iters=40, grid=2000)
    assert d.grid.shape == d.density.shape == (2000,) and d.nodes.shape == d.weights.shape == (16, 40)
    torch.testing.assert_close(torch.trapezoid(d.density, d.grid), torch.tensor(1.0, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(d.weights.sum(-1), torch.ones(16, dtype=torch.float64))
    mean = torch.trapezoid(d.grid * d.density, d.grid)
    quadrature = (d.weights * d.nodes).sum(-1)
    torch.testing.assert_close(mean, quadrature.mean(), atol=1e-6, rtol=0)
    # Each probe's quadrature is v^T H v / |v|^2 for a uniform direction v: its mean is trace / n.
    eig = torch.linalg.eigvalsh(h)
    std = math.sqrt(2 * float(((eig - eig.mean()) ** 2).mean()) / (n + 2) / 16)
    assert abs(float(mean) - float(h.trace()) / n) < 4 * std, (float(mean), float(h.trace()) / n, std)
    assert float(d.nodes.max()) == pytest.approx(float(eig.max()), abs=1e-6)


def test_layer_paths_group_each_block():
    cfg = ft.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, n_layers=2, d_ff=D_FF, max_seq_len=8)
    params = ft.init_params(cfg, seed=0)
    groups = curvature.layer_paths(params)
    assert list(groups) == ["embed", "blocks.0", "blocks.1", "ln_f"]
    assert set(curvature.select(params, groups["blocks.1"])) == {p for p in ft.tree.flatten_with_paths(params)
                                                               if p.startswith("blocks.1.")}


def test_bad_input_names_expected_and_got(setup):
    cfg, params, tokens, targets = setup
    loss = lambda p: ft.loss_fn(p, tokens, targets, cfg)  # noqa: E731
    with pytest.raises(ValueError, match="match no parameter"):
        curvature.select(params, ["blocks.7.*"])
    with pytest.raises(TypeError, match="sequence of pattern strings"):
        curvature.select(params, "blocks.0.*")
    chosen = curvature.select(params, ATTN)
    wrong = {**chosen, "blocks.0.attn.b_o": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"has shape \(3,\) but the parameter has \(8,\)"):
        curvature.hvp(loss, params, wrong, paths=ATTN)
    with pytest.raises(ValueError, match="must hold the selected paths"):
        curvature.hvp(loss, params, {"blocks.0.attn.b_o": chosen["blocks.0.attn.b_o"]}, paths=ATTN)
    like = {"x": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"k must be an int in \[1, the dimension=3\]"):
        curvature.top_eigenvalues(lambda v: v, like, 4, key=ft.random.key(0))
    with pytest.raises(TypeError, match="key must be a key|parameter 'key'"):
        curvature.spectral_density(lambda v: v, like, key=0)
    with pytest.raises(ValueError, match="samples"):
        curvature.hutchinson_trace(lambda v: v, like, key=ft.random.key(0), samples=1)


def test_plot_spectrum_writes_a_png(hessian, tmp_path):
    from ftransformer.attribution.plots import plot_spectrum

    h, chosen = hessian
    d = curvature.spectral_density(_dense(h, chosen), chosen, key=ft.random.key(1), probes=2, iters=12)
    path = plot_spectrum(d, tmp_path / "spectrum.png", title="attn block")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    with pytest.raises(TypeError, match="curvature.Density"):
        plot_spectrum(h, tmp_path / "no.png")


def test_inspect_curvature_prints_eigenvalues_and_traces_per_layer(tmp_path, capsys):
    from ftransformer.cli import main
    from ftransformer.data import CharTokenizer

    tok = CharTokenizer.from_text("the cat sat on the mat. ")
    cfg = ft.Config(vocab_size=tok.vocab_size, d_model=D_MODEL, n_heads=HEADS, n_layers=2, d_ff=D_FF, max_seq_len=9)
    ft.save_checkpoint(tmp_path / "run", params=ft.init_params(cfg, seed=0), config=cfg, step=0, tokenizer=tok)
    out = tmp_path / "curv.png"
    argv = ["inspect", "curvature", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--top-k", "2",
            "--iters", "6", "--probes", "4", "--batch", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for part in ("model", "embed", "blocks.0", "blocks.1", "ln_f"):
        assert re.search(rf"^  {re.escape(part)}\s+\d+\s+\S+ \+- ", printed, flags=re.M), printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv[:-6], "--top-k", "3", "--iters", "2"]) == 2
    assert "--iters must be >= --top-k" in capsys.readouterr().err
    assert main(["inspect", "curvature", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--text", "the cat"]) == 0
    assert "on 1 x 6 tokens" in capsys.readouterr().out
