"""Activation collection to a memory-mapped file, and the SAE training loop with checkpoints and resume."""

import json

import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer.interp.sae.activations import collect_activations, open_activations, site_activations
from ftransformer.interp.sae.architectures import SAEConfig
from ftransformer.interp.sae.stack import make_hparams
from ftransformer.interp.sae.train import CHECKPOINT_FILE, METRICS_FILE, fit_stack, load_stack



def _batches(cfg: ft.Config, n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (3, 9), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("path", ["embed", "blocks.0.resid_post", "blocks.0.mlp.hidden", "blocks.1.resid_mid", "final"])
def test_site_activations_equal_forward_with_activations(path, tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=0)
    tokens = _batches(tiny_cfg, 1)[0]
    _, acts = ft.forward_with_activations(params, tokens, tiny_cfg)
    want = ft.tree.flatten_with_paths(acts)[path]
    assert torch.equal(site_activations(params, tokens, tiny_cfg, path), want)
    with pytest.raises(ValueError, match="unknown activation path 'blocks.5.resid_post'"):
        site_activations(params, tokens, tiny_cfg, "blocks.5.resid_post")


def test_site_activations_stop_after_the_sites_block(tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=0)
    broken = {**params, "blocks": [params["blocks"][0], "block 1 must never run"], "ln_f": None}
    site_activations(broken, _batches(tiny_cfg, 1)[0], tiny_cfg, "blocks.0.resid_post")


def test_collect_drops_position_zero_and_fits_the_scale(tiny_cfg, tmp_path):
    params, batches = ft.init_params(tiny_cfg, seed=0), _batches(tiny_cfg, 4)
    store = collect_activations(params, iter(batches), tiny_cfg, "blocks.1.resid_post", tmp_path, n_tokens=60)
    assert isinstance(store.data, np.memmap) and store.data.shape == (60, 24)
    want = torch.cat([site_activations(params, b, tiny_cfg, "blocks.1.resid_post")[:, 1:].reshape(-1, 24) for b in batches])
    torch.testing.assert_close(torch.from_numpy(np.array(store.data)), want[:60])
    again = open_activations(tmp_path)
    assert again.path == "blocks.1.resid_post" and again.meta["drop_first"] is True
    norms = again.rows(np.arange(60)).norm(dim=-1)
    assert norms.mean().item() == pytest.approx(24**0.5, rel=1e-4)
    assert json.loads((tmp_path / "activations.json").read_text())["config"]["d_model"] == 24
    with pytest.raises(ValueError, match="the batches gave 96 activation rows, expected n_tokens=100"):
        collect_activations(params, batches, tiny_cfg, "blocks.1.resid_post", tmp_path / "b", n_tokens=100)


def _two_member_run(tiny_cfg, tmp_path, site: str):
    """Activations of ``site`` (192 rows from 8 batches of a seed-0 model) and the hparams of a 2-member stack."""
    params = ft.init_params(tiny_cfg, seed=0)
    store = collect_activations(params, _batches(tiny_cfg, 8), tiny_cfg, site, tmp_path / "acts", 192)
    return store, make_hparams(2, k=[2, 4], lr=[1e-3, 3e-3])


def test_fit_writes_metrics_and_checkpoint_and_resumes_exactly(tiny_cfg, tmp_path):
    store, hp = _two_member_run(tiny_cfg, tmp_path, "blocks.0.mlp.hidden")
    cfg = SAEConfig(d_in=40, d_sae=64, architecture="batchtopk", k_max=4, dead_tokens=200)
    kw = dict(steps=12, batch_size=32, seed=3, log_every=4, progress=False)
    full = fit_stack(store, cfg, hp, tmp_path / "full", **kw)
    lines = [json.loads(line) for line in (tmp_path / "full" / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12] and len(lines[0]["mse"]) == 2
    fit_stack(store, cfg, hp, tmp_path / "cut", **{**kw, "steps": 6})
    resumed = fit_stack(store, cfg, hp, tmp_path / "cut", **kw, resume=True)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    state, hp_back, cfg_back, meta = load_stack(tmp_path / "cut" / CHECKPOINT_FILE)
    assert cfg_back == cfg and meta["step"] == 12 and meta["site"] == "blocks.0.mlp.hidden"
    torch.testing.assert_close(state, full, rtol=0, atol=0)
    assert torch.equal(hp_back["k"], hp["k"]) and (state.params["threshold"] > 0).all()
    with pytest.raises(ValueError, match="SAEConfig.d_in=24 but the activations have width 40"):
        fit_stack(store, SAEConfig(d_in=24, d_sae=8), make_hparams(1), tmp_path / "bad", steps=1, progress=False)


def _write_old_run_dir(directory, state, hp, cfg, step, extra, lines):
    """An ftransformer 0.2 SAE run directory, written by hand as 0.2's ``save_stack`` wrote it: one
    ``saes.safetensors`` (the stacked state and hp as tensors, the rest in its metadata) + ``metrics.jsonl``."""
    import dataclasses

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    flat = {k: v for k, v in ft.tree.flatten_with_paths({"state": state, "hp": hp}).items() if isinstance(v, torch.Tensor)}
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in flat.items()}
    meta = {"config": dataclasses.asdict(cfg), "step": step, "members": int(hp["lr"].shape[0]), **extra}
    save_file(tensors, str(directory / "saes.safetensors"), metadata={"sae": json.dumps(meta)})
    (directory / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_old_sae_run_directories_still_load_and_resume(tiny_cfg, tmp_path):
    store, hp = _two_member_run(tiny_cfg, tmp_path, "blocks.0.resid_post")
    cfg = SAEConfig(d_in=24, d_sae=32, architecture="topk", k_max=4, dead_tokens=200)
    kw = dict(steps=8, batch_size=16, seed=1, log_every=4, progress=False)
    full = fit_stack(store, cfg, hp, tmp_path / "full", **kw)
    half = fit_stack(store, cfg, hp, tmp_path / "half", **{**kw, "steps": 4})
    lines = [{"step": 4, "mse": [0.5, 0.25]}]
    extra = {"site": store.path, "scale": store.scale, "seed": 1, "activations": store.meta.get("config")}
    _write_old_run_dir(tmp_path / "old", half, hp, cfg, 4, extra, lines)
    for where in (tmp_path / "old", tmp_path / "old" / "saes.safetensors"):
        state, hp_back, cfg_back, meta = load_stack(where)
        assert cfg_back == cfg and meta["step"] == 4 and meta["site"] == "blocks.0.resid_post"
        torch.testing.assert_close(state, half, rtol=0, atol=0)
        assert all(torch.equal(hp_back[k], hp[k]) for k in hp)
    # resuming the old run directory continues exactly, and leaves a checkpoint of today's format
    resumed = fit_stack(store, cfg, hp, tmp_path / "old", **kw, resume=True)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    state, _, _, meta = load_stack(tmp_path / "old" / CHECKPOINT_FILE)
    torch.testing.assert_close(state, full, rtol=0, atol=0)
    assert [r["step"] for r in meta["metrics"]] == [4, 8] and meta["metrics"][0]["mse"] == [0.5, 0.25]
    assert ft.checkpoint.read_checkpoint_info(tmp_path / "old" / CHECKPOINT_FILE)["model"] is False
    with pytest.raises(ValueError, match="not a model; read it with checkpoint.load_tree"):
        ft.load_checkpoint(tmp_path / "old")
    with pytest.raises(ValueError, match="no SAE checkpoint"):
        load_stack(tmp_path / "acts")
