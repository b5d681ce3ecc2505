"""Interpretability on every family layout of the suite, through the model's own layer functions.

Random tiny models of gpt2, llama, gemma, gemma2, gemma3_text, gpt_neox, olmo2 and phi3 (written by
transformers with every parameter re-randomized, so no norm scale or bias sits at its default), loaded in
float64: direct logit attribution sums to the pre-cap logit, the logit lens ends at ``forward``'s logits,
every weight transform keeps the logits or refuses the layout naming why, and edges run on every layout
whose writers are summands of the residual stream and refuse the others naming why.
"""

import pytest
import torch
from einops import rearrange

import ftransformer as ft
from ftransformer import interp
from ftransformer.config import flat_path
from ftransformer.interp import edges
from ftransformer.layers.attention import head_outputs, project_qkv
from ftransformer.layers.embedding import rotary_tables
from ftransformer.layers.linear import linear
from ftransformer.model import unembedding
from tests import hf_tiny

transformers = pytest.importorskip("transformers")

FAMILIES = ("gpt2", "llama", "gemma", "gemma2", "gemma3_text", "gpt_neox", "olmo2", "phi3")
# Layouts in which a head's write is not a summand of the residual stream (a norm on each sublayer's output).
NOT_SUMMANDS = {"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "output"}
TRANSFORMS = ("fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases")
# (transform, family) -> the Config field its refusal names.
REFUSALS = {
    ("fold_layer_norm", "gemma2"): "norm_position", ("fold_layer_norm", "gemma3_text"): "norm_position",
    ("fold_layer_norm", "olmo2"): "norm_position", ("center_unembed", "gemma2"): "logit_softcap",
    **{("center_writing_weights", f): "norm" for f in ("llama", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3")},
}


def _build_gpt2(directory) -> None:
    config = transformers.GPT2Config(vocab_size=hf_tiny.VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    hf_tiny.randomize_(model, 0)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    """``family -> (cfg, params)``, float64, loaded by ``load_hf`` from a random tiny checkpoint."""
    out = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        if family == "gpt2":
            _build_gpt2(directory)
        else:
            hf_tiny.build(family, directory)
        out[family] = ft.load_hf(directory, dtype=torch.float64)
    return out


def test_the_suite_covers_every_layout(families):
    layouts = {(cfg.layout.norm_position, cfg.layout.residual, cfg.norm.kind) for cfg, _ in families.values()}
    assert {"pre", "sandwich", "output"} <= {p for p, _, _ in layouts}
    assert {"sequential", "parallel"} <= {r for _, r, _ in layouts} and {"layernorm", "rmsnorm"} <= {n for *_, n in layouts}
    assert any(cfg.norm.unit_offset for cfg, _ in families.values())
    assert any(cfg.embeddings.logit_softcap is not None for cfg, _ in families.values())


def _tol(cfg: ft.Config) -> float:
    """float64 exactness, or float32's where the family's norms compute in float32 whatever the dtype (as
    transformers' do: ``norm_upcast``, ``norm_unit_offset``): the logit itself is rounded to float32 there."""
    return 1e-5 if (cfg.norm.float32 != "none") or cfg.norm.unit_offset else 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_sums_to_the_pre_cap_logit_and_the_lens_ends_at_the_logits(families, family):
    cfg, params = families[family]
    tokens = hf_tiny.tokens(3, 9, seed=1)
    logits, acts = ft.forward_with_activations(params, tokens, cfg)
    pre_cap = linear(acts["final"], unembedding(params, cfg))
    if cfg.embeddings.logit_softcap is not None:
        torch.testing.assert_close(torch.tanh(pre_cap / cfg.embeddings.logit_softcap) * cfg.embeddings.logit_softcap, logits)
    else:
        torch.testing.assert_close(pre_cap, logits)
    for token in (7, hf_tiny.tokens(3, 9, seed=2)):
        dla = interp.direct_logit_attribution(params, acts, cfg, token)
        total = dla["embed"] + dla["heads"].sum((0, 1)) + dla["mlp"].sum(0) + dla["bias"]
        want = pre_cap[..., token] if isinstance(token, int) else pre_cap.gather(-1, token[..., None])[..., 0]
        assert dla["heads"].shape == (cfg.n_layers, cfg.n_heads, 3, 9)
        torch.testing.assert_close(total, want, atol=_tol(cfg), rtol=_tol(cfg))
        assert float(want.abs().max()) > 0.1  # not a sum of zeros
    lens = interp.logit_lens(params, acts, cfg)
    assert torch.equal(lens[-1], logits) and torch.equal(lens[-1], ft.forward(params, tokens, cfg))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_weight_transform_keeps_the_logits_or_refuses_naming_the_field(families, family, transform):
    cfg, params = families[family]
    tokens = hf_tiny.tokens(2, 8, seed=3)
    fn = getattr(interp, transform)
    field = REFUSALS.get((transform, family))
    if field is not None:
        with pytest.raises(ValueError, match=rf"Config\.{flat_path(field)}"):
            fn(params, cfg)
        return
    new_params, new_cfg = fn(params, cfg)
    before, after = ft.forward(params, tokens, cfg), ft.forward(new_params, tokens, new_cfg)
    if transform == "center_unembed":  # the logits move together: the log-probabilities stay
        before, after = before.log_softmax(-1), after.log_softmax(-1)
    torch.testing.assert_close(after, before, atol=_tol(cfg), rtol=_tol(cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_edges_run_where_writes_are_summands_and_refuse_naming_why_elsewhere(families, family):
    cfg, params = families[family]
    if family in NOT_SUMMANDS:
        with pytest.raises(ValueError, match=rf"norm_position='pre' only, got '{NOT_SUMMANDS[family]}': .*not a sum"):
            edges.graph(cfg)
        return
    clean, corrupt = hf_tiny.tokens(2, 7, seed=4), hf_tiny.tokens(2, 7, seed=5)
    g = edges.graph(cfg)
    _, clean_acts = ft.forward_with_activations(params, clean, cfg)
    _, corrupt_acts = ft.forward_with_activations(params, corrupt, cfg)
    ablated = edges.writer_values(params, corrupt_acts, cfg)
    ones = edges.circuit_logits(params, clean, cfg, torch.ones(g.edges.shape, dtype=torch.float64), ablated)
    torch.testing.assert_close(ones, ft.forward(params, clean, cfg), atol=_tol(cfg), rtol=_tol(cfg))
    zeros = edges.circuit_logits(params, clean, cfg, torch.zeros(g.edges.shape, dtype=torch.float64), ablated)
    torch.testing.assert_close(zeros, ft.forward(params, corrupt, cfg), atol=_tol(cfg), rtol=_tol(cfg))
    assert clean_acts["blocks"][0]["resid_pre"].dtype == torch.float64

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., -1, 3].sum() - logits[..., -1, 5].sum()

    mask = torch.ones(g.edges.shape, dtype=torch.float64, requires_grad=True)
    source = edges.writer_values(params, clean_acts, cfg)
    metric(edges.circuit_logits(params, corrupt, cfg, mask, source)).backward()
    scores = edges.edge_attribution(params, clean, corrupt, metric, cfg)
    torch.testing.assert_close(scores.scores, -mask.grad * g.edges, atol=_tol(cfg), rtol=_tol(cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_and_ov_circuits_are_the_attentions_own_projections(families, family):
    """At position 0 (rotary is the identity there) and without biases, ``x W_Q W_K^T x^T`` is each head's
    ``q . k`` from ``project_qkv`` and ``x W_V W_O`` its ``head_outputs`` of the values."""
    cfg, params = families[family]
    layer = cfg.n_layers - 1
    if cfg.attention.qk_norm:
        with pytest.raises(ValueError, match="qk_norm"):
            interp.qk_circuit(params, cfg, layer)
        return
    attn = {name: w for name, w in params["blocks"][layer]["attn"].items() if not name.startswith("b_")}
    x = torch.randn(5, cfg.d_model, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    q, k, v = project_qkv(attn, x, cfg, rotary_tables(torch.zeros(5, dtype=torch.long), cfg))
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    qk = rearrange(interp.qk_circuit(params, cfg, layer).full(), "kv_heads group d_in d_out -> (kv_heads group) d_in d_out")
    ov = rearrange(interp.ov_circuit(params, cfg, layer).full(), "kv_heads group d_in d_out -> (kv_heads group) d_in d_out")
    torch.testing.assert_close(x @ qk @ x.T, q @ k.mT)
    torch.testing.assert_close(x @ ov, head_outputs(attn, v))
