"""Splicing SAEs into the model and measuring what they cost it (ftransformer.interp.sae.splice / .metrics)."""

import pytest
import torch

import ftransformer as ft
from ftransformer import random
from ftransformer.tree import stack as stack_params
from ftransformer.interp.sae.architectures import SAEConfig, init_sae
from ftransformer.interp.sae.metrics import evaluate_stack, kl_from, next_token_ce
from ftransformer.interp.sae.splice import reconstruct, splice_sae
from ftransformer.interp.sae.stack import make_hparams

SITES = {"blocks.1.resid_mid": 24, "blocks.0.mlp.hidden": 40}  # tiny: d_model 24, d_ff 40


def _model(cfg: ft.Config) -> dict:
    gen = torch.Generator().manual_seed(100)
    return ft.tree.map(lambda x: x + 0.2 * torch.randn(x.shape, generator=gen), ft.init_params(cfg, seed=0))


def _tokens(cfg: ft.Config) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))


def _identity_sae(d_in: int) -> dict:
    """relu(x) - relu(-x) = x: a 'perfect' SAE with latents +e_i and -e_i."""
    eye = torch.eye(d_in)
    return {"w_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d_in),
            "w_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d_in)}


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("path", sorted(SITES))
def test_error_term_reproduces_the_clean_logits_exactly(path, arch, tiny_cfg):
    params, tokens = _model(tiny_cfg), _tokens(tiny_cfg)
    sae_cfg = SAEConfig(d_in=SITES[path], d_sae=50, architecture=arch, k_max=4)
    sae, hp = init_sae(random.key(0), sae_cfg), make_hparams(k=3)
    clean = ft.forward(params, tokens, tiny_cfg)
    spliced, _ = ft.forward_with_activations(params, tokens, tiny_cfg,
                                             interventions=splice_sae(path, sae, hp, sae_cfg, scale=2.5))
    assert not torch.allclose(spliced, clean)  # the SAE alone changes the model
    exact, _ = ft.forward_with_activations(params, tokens, tiny_cfg,
                                           interventions=splice_sae(path, sae, hp, sae_cfg, scale=2.5, error_term=True))
    assert torch.equal(exact, clean)

    def logit_sum(w_dec):
        splice = splice_sae(path, {**sae, "w_dec": w_dec}, hp, sae_cfg, scale=2.5, error_term=True)
        return ft.forward_with_activations(params, tokens, tiny_cfg, interventions=splice)[0].square().sum()

    assert torch.func.grad(logit_sum)(sae["w_dec"]).abs().sum() > 0  # gradients still reach the SAE


def test_splice_replaces_every_position_but_the_first(tiny_cfg):
    params, tokens, path = _model(tiny_cfg), _tokens(tiny_cfg), "blocks.1.resid_mid"
    sae_cfg = SAEConfig(d_in=24, d_sae=30)
    sae, hp = init_sae(random.key(1), sae_cfg), make_hparams()
    _, clean = ft.forward_with_activations(params, tokens, tiny_cfg)
    _, acts = ft.forward_with_activations(params, tokens, tiny_cfg, interventions=splice_sae(path, sae, hp, sae_cfg))
    x = clean["blocks"][1]["resid_mid"]
    site = acts["blocks"][1]["resid_mid"]
    assert torch.equal(site[:, 0], x[:, 0])
    torch.testing.assert_close(site[:, 1:], reconstruct(sae, x, hp, sae_cfg)[0][:, 1:])
    with pytest.raises(ValueError, match="the SAE reads d_in=24 but the site 'blocks.0.mlp.hidden' has width 40"):
        ft.forward_with_activations(params, tokens, tiny_cfg, interventions=splice_sae("blocks.0.mlp.hidden", sae, hp, sae_cfg))


def test_stack_metrics_in_one_vmap_equal_the_loop(tiny_cfg):
    params, tokens, path = _model(tiny_cfg), _tokens(tiny_cfg), "blocks.1.resid_mid"
    sae_cfg = SAEConfig(d_in=24, d_sae=48, architecture="relu")
    perfect, zero = _identity_sae(24), {**_identity_sae(24), "w_dec": torch.zeros(48, 24)}
    saes = [perfect, init_sae(random.key(2), sae_cfg), zero]
    hp = make_hparams(3)
    out = evaluate_stack(params, tokens, tiny_cfg, path, stack_params(saes), hp, sae_cfg, scale=0.5)
    clean = ft.forward(params, tokens, tiny_cfg)
    ce_clean = next_token_ce(clean, tokens)
    for i, sae in enumerate(saes):
        one = {k: v[i] for k, v in hp.items()}
        logits, _ = ft.forward_with_activations(params, tokens, tiny_cfg,
                                                interventions=splice_sae(path, sae, one, sae_cfg, scale=0.5))
        torch.testing.assert_close(out["ce"][i], next_token_ce(logits, tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["kl"][i], kl_from(clean, logits), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["delta_ce"][i], out["ce"][i] - ce_clean, rtol=1e-4, atol=1e-5)
    # the perfect SAE recovers everything, the zero one is zero-ablation
    torch.testing.assert_close(out["ce_recovered_zero"][[0, 2]], torch.tensor([1.0, 0.0]), rtol=0, atol=1e-4)
    assert out["ce_zero"] != out["ce_clean"] and out["ce_mean"] != out["ce_clean"] and out["ce_zero"] != out["ce_mean"]
    assert out["explained_variance"][0] == pytest.approx(1.0, abs=1e-5) and out["cosine"][0] == pytest.approx(1.0)
    assert out["mse"][0] == pytest.approx(0.0, abs=1e-9) and out["kl"][0] == pytest.approx(0.0, abs=1e-5)
    # the perfect SAE's latent i fires where x_i > 0, latent 24 + i where x_i < 0: 24 per token
    _, acts = ft.forward_with_activations(params, tokens, tiny_cfg)
    x = acts["blocks"][1]["resid_mid"][:, 1:].reshape(-1, 24)
    frequency = torch.cat([(x > 0).float().mean(0), (x < 0).float().mean(0)])
    assert out["l0"][0] == 24
    assert out["dead"][0] == (frequency == 0).sum() and out["dense"][0] == (frequency > 0.1).sum()
    assert out["explained_variance"][2] < 0.5 and out["l0"].shape == (3,)
