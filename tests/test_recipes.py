"""The shakespeare-char-cpu recipe is nanoGPT's, written out here from its description, not from our code."""

import math

import pytest
import torch

import ftransformer as ft
from ftransformer.bench.train import nn_from_params
from ftransformer.recipes import get_recipe, optimizer_for, schedule_for

RECIPE = get_recipe("shakespeare-char-cpu")


def nanogpt_lr(it, lr=1e-3, warmup=100, decay_iters=2000, min_lr=1e-4):
    """nanoGPT's get_lr: linear warm-up to lr at (it+1)/(warmup+1), cosine to min_lr at decay_iters, then flat."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_schedule_is_nanogpts_at_every_update():
    schedule = schedule_for(RECIPE)
    for it in range(0, 2101):
        assert schedule(it) == pytest.approx(nanogpt_lr(it), rel=1e-12, abs=1e-15), it
    steps = torch.arange(0, 2101)
    # the tensor path (compiled and vmapped steps) agrees in float32
    got = torch.stack([schedule(s) for s in steps[:: 37]])
    want = torch.tensor([nanogpt_lr(int(s)) for s in steps[:: 37]], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert schedule(0) > 0  # the first update already moves (the "zero" form's first lr is 0)
    zero = schedule_for(RECIPE.replace(warmup_form="zero"))
    assert zero(0) == 0.0 and zero(50) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="warmup_form must be one of 'nanogpt', 'zero', got 'cubic'"):
        RECIPE.replace(warmup_form="cubic")


def test_init_is_gpt2s():
    """N(0, 0.02) everywhere; residual output projections N(0, 0.02 / sqrt(2 n_layers)); unit norm scales."""
    cfg = ft.get_preset("shakespeare-char-cpu")
    flat = ft.tree.flatten_with_paths(ft.init_params(cfg, seed=0))
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, x in flat.items():
        if x.ndim < 2:
            assert torch.equal(x, torch.ones_like(x)), name  # no biases in this preset: only norm scales
            continue
        want = out_std if name.endswith(("attn.w_o", "mlp.w_out")) else 0.02
        # >= 8192 draws each: the sample std is within 2% of the true one far beyond 5 sigma
        assert x.std().item() == pytest.approx(want, rel=0.05), name
        assert abs(x.mean().item()) < 5 * want / math.sqrt(x.numel()), name


def test_optimizer_matches_nanogpts_torch_adamw_step_for_step():
    """Decay on every >= 2-D tensor (embeddings included) and nothing else, clipping, betas, eps and lr:
    a few updates of ``optimizer_for`` equal torch.optim.AdamW set up as nanoGPT sets it up."""
    cfg = ft.get_preset("shakespeare-char-cpu").replace(n_layers=2, d_model=32, d_ff=48, n_heads=2)
    recipe = RECIPE.replace(warmup_steps=2, steps=5, lr=3e-2)
    params = ft.init_params(cfg, seed=1)
    model = nn_from_params(params, cfg).double()
    params = ft.tree.to(params, dtype=torch.float64)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    assert len(decay) == 2 + 4 * cfg.n_layers and len(no_decay) == 2 * cfg.n_layers + 1  # embeddings, matrices; norms
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    opt = optimizer_for(recipe)
    step = ft.make_train_step(cfg, opt)
    state = opt.init(params)
    g = torch.Generator().manual_seed(0)
    for it in range(6):
        data = torch.randint(0, cfg.vocab_size, (3, 9), generator=g)
        batch = data[:, :-1], data[:, 1:]
        params, state, _ = step(params, state, batch, None)
        model(*batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in ref.param_groups:
            group["lr"] = nanogpt_lr(it, lr=3e-2, warmup=2, decay_iters=5, min_lr=3e-3)
        ref.step()
        ref.zero_grad()
    # float64 on both sides: only summation order differs, so the agreement is far tighter than one update
    ours = nn_from_params(ft.tree.to(params, dtype=torch.float32), cfg)
    for (name, a), b in zip(ours.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
