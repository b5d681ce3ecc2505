"""Ground truth for the circuit-finding methods (issue 22 item 5): on a trained two-layer induction model
(``tests/induction.py``) whose circuit is known -- a previous-token head in layer 0 feeding the keys of an
induction head in layer 1 (K-composition) -- exact patching and attribution patching must both point at it.

What the other test files already cover is not repeated here: every sweep equals its loop on a random
model with an MLP, GQA and rotary positions (test_interp_patching.py); AtP equals exact patching where
the metric is linear in the site (test_interp_attribution.py). Here the same identities are checked on
a *trained* model, whose saturated softmaxes are what makes first-order estimates miss.
"""

import itertools

import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from tests.induction import induction_metric, induction_model, induction_prompts


@pytest.fixture(scope="module")
def circuit():
    model = induction_model()
    clean, corrupt = induction_prompts(model.cfg)
    return model, clean, corrupt, induction_metric(clean)


def base_metric(model, tokens, metric) -> torch.Tensor:
    return metric(ft.forward(model.params, tokens, model.cfg))


def best(scores: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(scores.argmax(), scores.shape))


@pytest.mark.parametrize("method", ["exact", "atp"])
def test_the_previous_token_head_is_layer_0s_most_important_head(circuit, method):
    """Restoring the clean output of layer 0's previous-token head recovers most of the clean metric; the
    other head of layer 0 does next to nothing. AtP ranks it first too (with a smaller size: the induction
    head's softmax is saturated, so the first-order estimate undershoots)."""
    model, clean, corrupt, metric = circuit
    by = ("layer", "head")
    if method == "exact":
        effect = interp.patch_sweep(model.params, clean, corrupt, metric, model.cfg, site="attn.head_out", by=by)
        effect = effect - base_metric(model, corrupt, metric)
    else:
        effect = interp.attribution_patch(model.params, clean, corrupt, metric, model.cfg, site="attn.head_out", by=by)
    gap = base_metric(model, clean, metric) - base_metric(model, corrupt, metric)
    layer0 = effect[0]
    assert int(layer0.argmax()) == model.previous_head, f"{method}: layer 0 effects {layer0.tolist()}"
    others = torch.cat([layer0[: model.previous_head], layer0[model.previous_head + 1:]])
    assert layer0[model.previous_head] > 0.2 * gap and others.abs().max() < 0.25 * layer0[model.previous_head]
    if method == "exact":
        assert layer0[model.previous_head] > 0.8 * gap  # the previous-token head carries nearly all of it


@pytest.mark.parametrize("method", ["exact", "atp*", "atp"])
def test_the_induction_heads_keys_are_the_most_important_keys_of_all(circuit, method):
    """Among the keys of every (layer, head), the induction head's (layer 1) matter most: that is where the
    previous-token head's writes are read (K-composition). Its queries do nothing here -- the corruption
    leaves every query token of the metric unchanged -- and exact patching and AtP* both see that."""
    model, clean, corrupt, metric = circuit
    by = ("layer", "head")

    def effects(site: str) -> torch.Tensor:
        if method == "exact":
            swept = interp.patch_sweep(model.params, clean, corrupt, metric, model.cfg, site=site, by=by)
            return swept - base_metric(model, corrupt, metric)
        return interp.attribution_patch(model.params, clean, corrupt, metric, model.cfg, site=site, by=by,
                                        correction=method == "atp*")

    keys = effects("attn.k")
    assert best(keys) == (1, model.induction_head), f"{method}: key effects {keys.tolist()}"
    rest = keys.flatten()[torch.arange(keys.numel()) != model.cfg.n_heads + model.induction_head]
    assert rest.abs().max() < 0.25 * keys[1, model.induction_head]
    if method != "atp":  # plain AtP through a saturated softmax need not get small effects right
        queries = effects("attn.q")
        assert queries.abs().max() < 0.05 * keys[1, model.induction_head], f"{method}: query effects {queries.tolist()}"


def test_the_trained_model_sweeps_like_its_loop(circuit):
    """The sweeps of the two sites the circuit shows up in equal the loop of single patches on the trained
    model (attention-only, no biases, separate unembedding, saturated patterns)."""
    model, clean, corrupt, metric = circuit
    params, cfg = model.params, model.cfg
    _, acts = ft.forward_with_activations(params, clean, cfg)
    for site, by in (("attn.k", ("layer", "head")), ("attn.head_out", ("layer", "position", "head"))):
        swept = interp.patch_sweep(params, clean, corrupt, metric, cfg, site=site, by=by)
        positions = [3, 11, 16]  # a few positions of each copy: the loop is a full run per patch
        for layer, head in itertools.product(range(cfg.n_layers), range(cfg.n_heads)):
            value = acts["blocks"][layer]
            for part in site.split("."):
                value = value[part]
            for p in positions if "position" in by else [None]:
                fix = interp.patch(f"blocks.{layer}.{site}", value, positions=p, heads=head)
                logits, _ = ft.forward_with_activations(params, corrupt, cfg, interventions=fix)
                got = swept[layer, head] if p is None else swept[layer, p, head]
                torch.testing.assert_close(got, metric(logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_every_position_of_a_residual_site_gives_the_source_runs_output(circuit, direction):
    """A whole residual stream (every position, every batch row) patched with the source run's values
    makes the rest of the run the source run: the metric of each layer's patch is the source's metric --
    the clean one when denoising, the corrupted one when noising -- for every residual site and layer."""
    model, clean, corrupt, metric = circuit
    source = clean if direction == "denoise" else corrupt
    expected = base_metric(model, source, metric).expand(model.cfg.n_layers)
    for site in ("resid_pre", "resid_mid", "resid_post"):
        swept = interp.patch_sweep(model.params, clean, corrupt, metric, model.cfg, site=site, by=("layer",),
                                   direction=direction)
        torch.testing.assert_close(swept, expected, atol=1e-5, rtol=1e-5)
    assert (base_metric(model, clean, metric) - base_metric(model, corrupt, metric)).abs() > 1.0  # not vacuous
