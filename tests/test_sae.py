"""SAE architectures and the vmapped stack step (ftransformer.interp.sae.architectures / .stack)."""

import pytest
import torch

from ftransformer import random
from ftransformer.tree import stack as stack_params, unstack as unstack_params
from ftransformer.interp.sae.architectures import (
    ARCHITECTURES, SAEConfig, aux_loss, encode, init_sae, jump, jump_l0, kth_largest, sae_loss, sparsity_loss,
)
from ftransformer.interp.sae.stack import init_stack, init_state, make_hparams, sae_step, stack_step

D_IN, D_SAE, BATCH = 6, 20, 14  # every axis a different size


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _cfg(arch: str, **kw) -> SAEConfig:
    return SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k_max=5, dead_tokens=30, **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_ties_encoder_to_unit_decoder(arch):
    p = init_sae(random.key(3), _cfg(arch))
    assert torch.equal(p["w_enc"], p["w_dec"].T)
    torch.testing.assert_close(p["w_dec"].norm(dim=-1), torch.ones(D_SAE))
    assert not p["b_dec"].any() and not p["b_enc"].any()
    assert p["w_dec"].shape == (D_SAE, D_IN)


def test_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match="architecture must be one of .* got 'gated'"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(ValueError, match="k_max=9 must be <= d_sae=8"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk", k_max=9)
    with pytest.raises(ValueError, match=r"hp\['k'\] must hold integers in \[1, k_max=5\], got \[0.0, 3.0\]"):
        init_stack(random.split(random.key(0), 2), make_hparams(2, k=[0, 3]), _cfg("topk"))


def test_kth_largest_per_member_k_under_vmap():
    values = _randn(3, BATCH, D_SAE)
    ks = torch.tensor([1.0, 3.0, 5.0])
    got = torch.func.vmap(lambda v, k: kth_largest(v, k, 5))(values, ks)
    want = torch.stack([values[i].sort(-1, descending=True).values[:, int(k) - 1 : int(k)] for i, k in enumerate(ks)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_kinds_keep_k_per_token_or_k_times_tokens(arch):
    cfg = _cfg(arch)
    p = init_sae(random.key(1), cfg)
    p["b_enc"] = p["b_enc"] + 10.0  # every pre-activation positive, so the ReLU cuts nothing
    x = _randn(BATCH, D_IN)
    acts = encode(p, x, make_hparams(k=3), cfg, training=True)
    if arch == "topk":
        assert ((acts > 0).sum(-1) == 3).all()
    else:
        assert int((acts > 0).sum()) == 3 * BATCH
        assert not torch.equal((acts > 0).sum(-1), torch.full((BATCH,), 3))  # the batch shares its budget


def test_relu_l1_is_weighted_by_decoder_norms():
    cfg = _cfg("relu")
    p = init_sae(random.key(2), cfg)
    p["w_dec"] = p["w_dec"] * torch.linspace(0.5, 2.0, D_SAE)[:, None]
    pre = _randn(BATCH, D_SAE)
    acts = torch.relu(pre)
    got = sparsity_loss(p, pre, acts, make_hparams(l1=0.3), cfg)
    want = 0.3 * sum(float(acts[:, i].sum()) * float(p["w_dec"][i].norm()) for i in range(D_SAE)) / BATCH
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_jumprelu_straight_through_threshold_gradient():
    eps = 0.1
    pre = torch.tensor([[0.52, 0.30, 1.00], [0.46, 0.34, -1.0]])
    theta = torch.tensor([0.5, 0.3, 0.2])
    out = jump(pre, theta, eps)
    assert torch.equal(out, pre * (pre > theta))
    # d/dtheta_i sum(out) = sum over tokens of -(theta_i/eps) * 1{|pre - theta_i| < eps/2}
    grad = torch.func.grad(lambda t: jump(pre, t, eps).sum())(theta)
    torch.testing.assert_close(grad, torch.tensor([-2 * 0.5 / eps, -2 * 0.3 / eps, 0.0]))
    grad_l0 = torch.func.grad(lambda t: jump_l0(pre, t, eps).sum())(theta)
    torch.testing.assert_close(grad_l0, torch.tensor([-2 / eps, -2 / eps, 0.0]))
    # the pre-activations get the plain gradient of pre * H(pre - theta)
    torch.testing.assert_close(torch.func.grad(lambda z: jump(z, theta, eps).sum())(pre), (pre > theta).float())


def test_aux_loss_zero_without_dead_and_trains_only_dead_latents():
    p = init_sae(random.key(4), _cfg("topk"))
    pre, err = _randn(BATCH, D_SAE).abs(), _randn(BATCH, D_IN)
    none = torch.zeros(D_SAE, dtype=torch.bool)
    assert aux_loss(p, pre, err, none, 4).item() == 0.0
    dead = torch.arange(D_SAE) % 3 == 0
    assert aux_loss(p, pre, err, dead, 4).item() > 0.0
    grad = torch.func.grad(lambda w: aux_loss({**p, "w_dec": w}, pre, err, dead, 4))(p["w_dec"])
    assert grad[dead].abs().sum() > 0 and not grad[~dead].any()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stack_step_equals_each_member_trained_alone(arch):
    """Members differ in seed, l1, k and lr. In float64 the vmapped and the lone step run the same
    arithmetic but for one thing: under vmap ``optim.adamw`` computes its bias corrections ``1 - beta**t``
    on tensors in float32 (the eager path uses Python floats), a relative difference of ~1e-7 in each
    update. So the two agree to 1e-6 relative (plus 1e-7 absolute: 12 updates of at most lr=3e-2 each off by ~1e-7 relative) after 12 steps --
    while members differ among themselves by O(0.1)."""
    cfg, n, steps = _cfg(arch), 3, 12
    hp = make_hparams(3, dtype=torch.float64, l1=[0.01, 0.1, 0.5], k=[1, 3, 5], lr=[1e-3, 1e-2, 3e-2])
    keys = random.split(random.key(7), n)
    xs = _randn(steps, BATCH, D_IN, dtype=torch.float64) * torch.linspace(0.5, 3, D_IN, dtype=torch.float64)
    stack = init_stack(keys, hp, cfg, dtype=torch.float64)
    alone = [init_state(keys[i], {k: v[i] for k, v in hp.items()}, cfg, dtype=torch.float64) for i in range(n)]
    for x in xs:
        stack, metrics = stack_step(stack, hp, x, cfg)
        results = [sae_step(s, {k: v[i] for k, v in hp.items()}, x, cfg) for i, s in enumerate(alone)]
        alone = [s for s, _ in results]
        torch.testing.assert_close(metrics["loss"], torch.stack([m["loss"] for _, m in results]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stack, stack_params(alone), rtol=1e-6, atol=1e-7)
    members = unstack_params(stack.params)
    assert (members[0]["w_dec"] - members[2]["w_dec"]).abs().max() > 0.1
    if arch in ("topk", "batchtopk"):
        # at most k latents per token (fewer where a kept pre-activation is negative and the ReLU zeroes it)
        assert (metrics["l0"] <= torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)).all()
        assert metrics["l0"][0] < metrics["l0"][2]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_lowers_the_loss_and_keeps_decoder_unit_norm(arch):
    cfg = _cfg(arch)
    hp = make_hparams(2, l1=[1e-3, 1e-2], k=[3, 5], lr=1e-2)
    state = init_stack(random.split(random.key(0), 2), hp, cfg)
    x = _randn(64, D_IN)
    _, first = stack_step(state, hp, x, cfg)
    for _ in range(40):
        state, last = stack_step(state, hp, x, cfg)
    assert (last["mse"] < 0.7 * first["mse"]).all()
    torch.testing.assert_close(state.params["w_dec"].norm(dim=-1), torch.ones(2, D_SAE))
    loss, parts = sae_loss(unstack_params(state.params)[0], x, {k: v[0] for k, v in hp.items()},
                           torch.zeros(D_SAE, dtype=torch.bool), cfg)
    assert loss.item() >= parts["mse"].item()
