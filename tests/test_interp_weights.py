"""Weight processing (pure params transforms, invariance of the logits) and factored QK/OV circuits."""

import pytest
import torch

import ftransformer as ft
from ftransformer.interp import weights as w

GPT2_LIKE = ft.Config(vocab_size=37, d_model=24, n_heads=4, n_layers=3, d_ff=40, max_seq_len=16, activation="gelu_tanh")
LLAMA_LIKE = GPT2_LIKE.replace(norm="rmsnorm", bias=False, positional="rope", n_kv_heads=2, activation="swiglu",
                               tie_embeddings=False)


def noisy_params(cfg: ft.Config, seed: int = 0) -> dict:
    """Initial params plus noise: norm scales and biases far from 1 / 0, so a transform that drops one fails."""
    gen = torch.Generator().manual_seed(seed + 7)
    params = ft.init_params(cfg, seed=seed, dtype=torch.float64)
    return ft.tree.map(lambda x: x + 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype), params)


def logits(params: dict, cfg: ft.Config) -> torch.Tensor:
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    return ft.forward(params, tokens, cfg)


def snapshot(params: dict) -> dict:
    return {k: v.clone() for k, v in ft.tree.flatten_with_paths(params).items()}


def assert_untouched(params: dict, before: dict) -> None:
    after = ft.tree.flatten_with_paths(params)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} was modified in place"


def transformed(transform, cfg: ft.Config, *, up_to_softmax: bool = False) -> tuple[dict, dict, ft.Config]:
    """``(params, new_params, new_cfg)`` after checking the input tree is untouched and the logits (their
    log_softmax with ``up_to_softmax``) agree to 1e-5, in float64 and in float32."""
    for dtype in (torch.float32, torch.float64):
        params = ft.tree.to(noisy_params(cfg), dtype=dtype)
        before = snapshot(params)
        new_params, new_cfg = transform(params, cfg)
        assert_untouched(params, before)
        got, want = logits(new_params, new_cfg), logits(params, cfg)
        if up_to_softmax:
            got, want = got.log_softmax(-1), want.log_softmax(-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return params, new_params, new_cfg


CASES = {
    "gpt2": GPT2_LIKE,
    "gpt2-untied-gqa": GPT2_LIKE.replace(tie_embeddings=False, n_kv_heads=2),
    "llama": LLAMA_LIKE,
    "gemma-unit-offset": LLAMA_LIKE.replace(norm_unit_offset=True, activation="geglu_tanh", tie_embeddings=True),
    "neox-parallel": GPT2_LIKE.replace(residual="parallel", positional="rope"),
    "phi-shared-norm": GPT2_LIKE.replace(residual="parallel_shared_norm"),
    "attention-only": GPT2_LIKE.replace(mlp=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_layer_norm_keeps_logits_and_leaves_identity_norms(name):
    cfg = CASES[name]
    params, folded, new_cfg = transformed(w.fold_layer_norm, cfg)
    assert not new_cfg.embeddings.tie
    identity = 0.0 if cfg.norm.unit_offset else 1.0
    for block in folded["blocks"]:
        assert torch.all(block["ln1"]["scale"] == identity)
        assert "bias" not in block["ln1"] or torch.all(block["ln1"]["bias"] == 0)
    # folding twice changes nothing more
    again, _ = w.fold_layer_norm(folded, new_cfg)
    torch.testing.assert_close(logits(again, new_cfg), logits(params, cfg), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied-gqa", "neox-parallel", "attention-only"])
def test_center_writing_weights_keeps_logits_and_centres_every_writer(name):
    _, centred, _ = transformed(w.center_writing_weights, CASES[name])
    writers = [centred["embed"]["tokens"]] + [b["attn"]["w_o"] for b in centred["blocks"]]
    writers += [b["mlp"]["w_out"] for b in centred["blocks"] if "mlp" in b]
    for t in writers:
        torch.testing.assert_close(t.mean(-1), torch.zeros_like(t.mean(-1)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_center_unembed_keeps_log_softmax_but_moves_logits(name):
    cfg = CASES[name]
    params, centred, new_cfg = transformed(w.center_unembed, cfg, up_to_softmax=True)
    assert (logits(centred, new_cfg) - logits(params, cfg)).abs().max() > 1e-3  # the logits themselves did move
    torch.testing.assert_close(centred["unembed"]["w"].mean(-1), torch.zeros(cfg.d_model, dtype=torch.float64))
    # the embedding the model reads is untouched when untying
    assert torch.equal(centred["embed"]["tokens"], params["embed"]["tokens"])


@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied-gqa", "neox-parallel"])
def test_fold_value_biases_keeps_logits_and_zeroes_value_bias(name):
    cfg = CASES[name]
    _, folded, _ = transformed(w.fold_value_biases, cfg)
    v_width = cfg.n_kv_heads * cfg.head_dim
    for block in folded["blocks"]:
        assert torch.all(block["attn"]["b_qkv"][-v_width:] == 0)


def process_all(params: dict, cfg: ft.Config) -> tuple[dict, ft.Config]:
    for transform in (w.fold_layer_norm, w.center_writing_weights, w.center_unembed, w.fold_value_biases):
        params, cfg = transform(params, cfg)
    return params, cfg


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel"])
def test_all_four_transforms_compose(name):
    _, processed, _ = transformed(process_all, CASES[name], up_to_softmax=True)
    for block in processed["blocks"]:
        torch.testing.assert_close(block["attn"]["w_o"].mean(-1), torch.zeros_like(block["attn"]["w_o"][:, 0]))


@pytest.mark.parametrize(
    ("transform", "changes", "field"),
    [
        (w.fold_layer_norm, dict(norm_position="sandwich"), "norm_position"),
        (w.fold_layer_norm, dict(norm_position="post"), "norm_position"),
        (w.center_writing_weights, dict(norm="rmsnorm", bias=False), "norm"),
        (w.center_writing_weights, dict(norm_position="output"), "norm_position"),
        (w.center_unembed, dict(logit_softcap=30.0), "logit_softcap"),
        (w.fold_value_biases, dict(bias=False, attention=ft.config.Attention(qkv_bias=True)), "Config.bias"),
    ],
)
def test_unsupported_configs_raise_naming_the_field(transform, changes, field):
    cfg = GPT2_LIKE.replace(**changes)
    with pytest.raises(ValueError, match=field):
        transform(ft.init_params(cfg), cfg)


# ---------------------------------------------------------------- circuits


def dense_heads(params: dict, cfg: ft.Config, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query head's dense QK and OV matrices, written out head by head (the reference)."""
    attn, hd = params["blocks"][layer]["attn"], cfg.head_dim
    w_q, w_k, w_v = attn["w_qkv"].split([cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd], dim=-1)
    group = cfg.n_heads // cfg.n_kv_heads
    qk, ov = [], []
    for h in range(cfg.n_heads):
        g = h // group
        q, k, v = w_q[:, h * hd:(h + 1) * hd], w_k[:, g * hd:(g + 1) * hd], w_v[:, g * hd:(g + 1) * hd]
        qk.append(q @ k.T)
        ov.append(v @ attn["w_o"][h * hd:(h + 1) * hd])
    return torch.stack(qk), torch.stack(ov)


def frobenius_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(a @ b) / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_circuits_equal_dense_products_and_their_svd(name):
    cfg = CASES[name]
    params = noisy_params(cfg)
    qk_dense, ov_dense = dense_heads(params, cfg, 1)
    qk, ov = w.qk_circuit(params, cfg, 1), w.ov_circuit(params, cfg, 1)
    assert qk.B.shape[:2] == (cfg.n_kv_heads, 1)  # the key factor is shared by a kv group, not copied per head
    for factored, dense in ((qk, qk_dense), (ov, ov_dense)):
        torch.testing.assert_close(factored.full().flatten(0, 1), dense)
        torch.testing.assert_close(factored.norms().flatten(), torch.linalg.matrix_norm(dense))
        sv = torch.linalg.svdvals(dense)[:, : cfg.head_dim]
        torch.testing.assert_close(factored.svdvals().flatten(0, 1), sv)
        torch.testing.assert_close(factored.T.full().flatten(0, 1), dense.mT)
    x = torch.randn(3, cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close((x @ qk).full().flatten(0, 1), x @ qk_dense)
    torch.testing.assert_close((qk @ ov).full().flatten(0, 1), qk_dense @ ov_dense)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_scores_equal_dense_computation(name, kind):
    cfg = CASES[name]
    params = noisy_params(cfg)
    _, ov_writer = dense_heads(params, cfg, 0)
    qk_reader, ov_reader = dense_heads(params, cfg, 2)
    reader = {"q": qk_reader, "k": qk_reader.mT, "v": ov_reader}[kind]
    want = torch.stack([torch.stack([frobenius_score(a, b) for b in reader]) for a in ov_writer])
    torch.testing.assert_close(w.composition_scores(params, cfg, 0, 2, kind), want)


def test_composition_scores_reject_bad_arguments():
    params = ft.init_params(GPT2_LIKE)
    with pytest.raises(ValueError, match="kind"):
        w.composition_scores(params, GPT2_LIKE, 0, 1, "o")
    with pytest.raises(ValueError, match="writer=2, reader=1"):
        w.composition_scores(params, GPT2_LIKE, 2, 1, "k")
    with pytest.raises(ValueError, match="n_layers=3"):
        w.qk_circuit(params, GPT2_LIKE, 3)
