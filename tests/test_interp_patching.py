"""Exact activation patching sweeps (ftransformer.interp.patching): equal to the loop of single patches."""

import itertools

import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.interp import patching
from tests.test_interp import perturbed_params
from ftransformer.layers import attention_kernel

BATCH, SEQ = 5, 7
TARGET, OTHER = 3, 11


@pytest.fixture(scope="module")
def model():
    """layers 3, heads 4, kv_heads 2, head_dim 6, seq 7, batch 5, d_model 24, d_ff 40, vocab 37; rotary."""
    cfg = ft.PRESETS["tiny"].replace(n_layers=3, n_heads=4, n_kv_heads=2, positional="rope", activation="swiglu")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 5) % cfg.vocab_size
    corrupt[:, 4] = (clean[:, 4] + 9) % cfg.vocab_size
    return cfg, perturbed_params(cfg), clean, corrupt


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[..., -1, TARGET] - logits[..., -1, OTHER]).mean()


def looped(params, clean, corrupt, cfg, site, by, direction="denoise"):
    """The reference: one ``forward_with_activations`` per patch, through ``interp.patch``."""
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, acts = ft.forward_with_activations(params, source, cfg)
    values = []
    for i in range(cfg.n_layers):
        value = acts["blocks"][i]
        for part in site.split("."):
            value = value[part]
        values.append(value)
    heads = values[0].shape[-3] if site.startswith("attn.") else 0
    out = torch.zeros([{"layer": cfg.n_layers, "position": SEQ, "head": heads}[a] for a in by])
    for i, value in enumerate(values):
        sizes = {"layer": [i], "position": range(SEQ), "head": range(heads)}
        for index in itertools.product(*(sizes[a] for a in by)):
            named = dict(zip(by, index))
            fix = interp.patch(f"blocks.{i}.{site}", value, positions=named.get("position"), heads=named.get("head"))
            logits, _ = ft.forward_with_activations(params, base, cfg, interventions=fix)
            out[index] = logit_diff(logits)
    return out


CASES = [
    ("resid_pre", ("layer", "position")),
    ("resid_mid", ("layer", "position")),
    ("resid_post", ("layer", "position")),
    ("mlp.hidden", ("layer", "position")),
    ("attn.head_out", ("layer", "position", "head")),
    ("attn.head_out", ("layer", "head")),
    ("attn.q", ("layer", "head", "position")),
    ("attn.k", ("layer", "position", "head")),
    ("attn.v", ("layer", "head")),
    ("attn.pattern", ("layer", "position", "head")),
]


@pytest.mark.parametrize(("site", "by"), CASES, ids=[f"{s}-{'x'.join(b)}" for s, b in CASES])
def test_sweep_equals_the_loop_of_single_patches(model, site, by):
    cfg, params, clean, corrupt = model
    swept = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by, chunk=5)
    expected = looped(params, clean, corrupt, cfg, site, by)
    assert swept.shape == expected.shape
    torch.testing.assert_close(swept, expected, atol=1e-5, rtol=1e-5)
    # The sweep is not constant: patches at different slices really change the metric differently.
    assert swept.std() > 1e-3


def test_noise_direction_patches_corrupt_values_into_the_clean_run(model):
    cfg, params, clean, corrupt = model
    by = ("layer", "position")
    swept = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="resid_mid", by=by, direction="noise")
    torch.testing.assert_close(swept, looped(params, clean, corrupt, cfg, "resid_mid", by, "noise"), atol=1e-5, rtol=1e-5)


def test_patching_a_whole_layer_with_clean_values_gives_the_clean_metric(model):
    cfg, params, clean, corrupt = model
    swept = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="resid_pre", by=("layer",))
    clean_metric = logit_diff(ft.forward(params, clean, cfg))
    torch.testing.assert_close(swept, clean_metric.expand(cfg.n_layers), atol=1e-5, rtol=1e-5)


# attn.head_out: the patched block i is finished from its cached head outputs (patching.from_head_out, no
# queries/keys/pattern), so ``block`` runs from i + 1 on, as for resid_post.
@pytest.mark.parametrize(("site", "first"), [("resid_pre", 0), ("attn.head_out", 1), ("resid_post", 1)])
def test_each_layer_runs_only_the_blocks_and_queries_after_the_patch(model, monkeypatch, site, first):
    """Neither the layers before the patched one nor the positions before the patch are recomputed: per
    position bucket [a, b) and group of layers (``chunk`` bounds the runs of a pass), block j runs ONCE on
    the queries at positions a..seq-1 of every run alive there (the runs of the group's layers before j),
    and once more (vmapped) for the runs patched at j, where full runs would run all L on all seq per patch."""
    cfg, params, clean, corrupt = model
    called = []
    block = patching.block

    def counting(block_params, x, *args, **kwargs):
        called.append((next(i for i, p in enumerate(params["blocks"]) if p is block_params), x.shape[-2]))
        return block(block_params, x, *args, **kwargs)

    monkeypatch.setattr(patching, "block", counting)
    by = ("layer", "position", "head") if site.startswith("attn.") else ("layer", "position")
    heads = cfg.n_heads if "head" in by else 1
    assert len(patching.position_buckets(SEQ, by)) == min(SEQ, patching.BUCKETS)
    # corrupt differs from clean at positions 2 and 4: the patches at 0 and 1 replace values by equal ones (no run)
    buckets = patching.position_buckets(SEQ, by, start=2)
    assert buckets[0][0] == 2 and buckets[-1][1] == SEQ
    chunk = 2 * heads  # a one-position bucket at two layers a pass
    jobs = patching.sweep_jobs(cfg.n_layers, buckets, heads, chunk)
    assert all(len(layers) * heads * (b - a) <= chunk or len(layers) == 1 for a, b, layers in jobs)
    assert len(jobs) > len(buckets)  # the chunk cut the layers into groups
    interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by, chunk=chunk)
    expected = []
    for a, b, layers in jobs:
        for j in range(layers[0], cfg.n_layers):
            expected += [(j, SEQ - a)] * ((j > layers[0]) + (j in layers and first == 0))
    assert called == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(site="embed"), "site must be one of"),
        (dict(by=("position",)), "by must hold 'layer'"),
        (dict(by=("layer", "layer")), "by must hold 'layer'"),
        (dict(site="resid_pre", by=("layer", "head")), "by='head' needs an attn"),
        (dict(direction="sideways"), "direction must be one of"),
        (dict(chunk=0), "chunk must be None or a positive int, got 0"),
    ],
)
def test_bad_arguments_say_what_was_expected(model, kwargs, message):
    cfg, params, clean, corrupt = model
    with pytest.raises(ValueError, match=message):
        interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, **kwargs)


def test_mismatched_tokens_and_non_scalar_metrics_are_refused(model):
    cfg, params, clean, corrupt = model
    with pytest.raises(ValueError, match="same shape"):
        interp.patch_sweep(params, clean, corrupt[:, :-1], logit_diff, cfg)
    with pytest.raises(ValueError, match=r"scalar tensor \(shape \(\)\), got shape \(5,\)"):
        interp.patch_sweep(params, clean, corrupt, lambda logits: logits[..., -1, 0], cfg)


@attention_kernel("einsum")
def test_the_sweep_costs_the_flops_of_suffix_runs_from_the_patched_layer_not_of_full_runs(model):
    """FLOPs (torch's counter): two full runs (base and source) plus, per patch at layer i and position p,
    blocks i..L-1 and the unembedding on the queries from p's bucket on -- under 0.7 of the runs from the
    patched layer over every position (here seq 7 in 4 buckets: about 0.63 of the queries), and so about
    half the loop's one full run per patch."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, params, clean, corrupt = model
    cfg = cfg

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    full = flops(lambda: ft.forward_with_activations(params, corrupt, cfg))
    x = torch.zeros(BATCH, SEQ, cfg.d_model)
    inputs = ft.model.block_inputs(corrupt, cfg)
    from_layer = [flops(lambda i=i: patching.run_from(params, x, cfg, i, inputs)) for i in range(cfg.n_layers)]
    swept = flops(lambda: interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="resid_pre", chunk=3))
    assert from_layer[0] == full and from_layer[-1] < full
    patched = swept - 2 * full
    assert patched < 0.7 * SEQ * sum(from_layer), f"patched runs {patched} FLOPs, from the layer {SEQ * sum(from_layer)}"
    loop = cfg.n_layers * SEQ * full
    assert swept < 0.55 * loop, f"sweep {swept} FLOPs, loop {loop}"


@pytest.mark.parametrize(
    "layout", [dict(residual="parallel"), dict(norm_position="post", norm="rmsnorm"), dict(mlp=False)], ids=str
)
def test_other_block_layouts_sweep_like_their_loops(model, layout):
    """Parallel blocks (resid_mid routed on by the tap), post-LN, attention-only: the sweep still equals the loop."""
    cfg, _, clean, corrupt = model
    cfg = cfg.replace(**layout)
    params = perturbed_params(cfg, seed=1)
    for site in ("resid_mid", "attn.v"):
        by = ("layer", "position")
        swept = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by)
        torch.testing.assert_close(swept, looped(params, clean, corrupt, cfg, site, by), atol=1e-5, rtol=1e-5)


def test_by_may_name_its_axes_in_any_order():
    cfg = ft.PRESETS["tiny"]
    params = ft.init_params(cfg, seed=1)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(0, cfg.vocab_size, (2, 7), generator=gen) for _ in range(2))

    def metric(logits):
        return logits[..., -1, 0].sum()

    first = ft.interp.patch_sweep(params, clean, corrupt, metric, cfg, by=("layer", "position"))
    swapped = ft.interp.patch_sweep(params, clean, corrupt, metric, cfg, by=("position", "layer"))
    assert swapped.shape == (7, cfg.n_layers)
    torch.testing.assert_close(swapped, first.T)


@pytest.mark.parametrize(("site", "by"), [("resid_pre", ("layer", "position")), ("attn.head_out", ("layer", "head")),
                                          ("attn.v", ("layer", "position", "head"))])
def test_logits_at_the_positions_the_metric_reads_gives_the_same_sweep(model, site, by):
    """A metric of the last position: unembedding only that position (``logits_at=[-1]``) changes nothing."""
    cfg, params, clean, corrupt = model
    whole = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by)
    for at in ([-1], SEQ - 1, [2, SEQ - 1]):
        torch.testing.assert_close(interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by, logits_at=at),
                                   whole, atol=1e-5, rtol=1e-5)


def test_logits_at_unembeds_only_those_positions(model, monkeypatch):
    cfg, params, clean, corrupt = model
    rows = []
    unembed = patching.unembed

    def counting(p, x, c):
        rows.append(x.shape[-2])
        return unembed(p, x, c)

    monkeypatch.setattr(patching, "unembed", counting)
    interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="resid_pre", by=("layer",), logits_at=[-1])
    assert rows and set(rows) == {1}  # one position unembedded, once per batched pass
    with pytest.raises(ValueError, match=r"logits_at must be positions in \[-seq, seq\) = \[-7, 7\), at least one, got \[7\]"):
        interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, logits_at=[7])


@attention_kernel("einsum")
def test_replace_sweep_takes_any_values_and_equals_patch_sweep_with_the_source_run(model):
    """replace_sweep is patch_sweep's core: the clean run's values give patch_sweep's result; zeros at
    attn.head_out by layer x head are head_ablation-style patches, checked against single interventions."""
    cfg, params, clean, corrupt = model
    _, acts = ft.forward_with_activations(params, clean, cfg)
    sources = [acts["blocks"][i]["attn"]["v"] for i in range(cfg.n_layers)]
    by = ("layer", "head")
    swept = interp.replace_sweep(params, corrupt, sources, logit_diff, cfg, site="attn.v", by=by)
    torch.testing.assert_close(swept, interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site="attn.v", by=by))
    zeros = [torch.zeros(()) for _ in range(cfg.n_layers)]
    ablated = interp.replace_sweep(params, corrupt, zeros, logit_diff, cfg, site="attn.head_out", by=by)
    layer, head = cfg.n_layers - 1, 1
    logits, _ = ft.forward_with_activations(params, corrupt, cfg, interventions=interp.ablate_heads(layer, [head], cfg))
    torch.testing.assert_close(ablated[layer, head], logit_diff(logits), atol=1e-5, rtol=1e-5)


def test_replace_sweep_refuses_a_wrong_number_of_sources_and_bad_sites(model):
    cfg, params, clean, corrupt = model
    with pytest.raises(ValueError, match=r"one tensor per layer \(\d+\), got 1 of them"):
        interp.replace_sweep(params, corrupt, [torch.zeros(())], logit_diff, cfg, site="resid_pre", by=("layer",))
    with pytest.raises(ValueError, match="site must be one of"):
        interp.replace_sweep(params, corrupt, [torch.zeros(())] * cfg.n_layers, logit_diff, cfg, site="nope", by=("layer",))
