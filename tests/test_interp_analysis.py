"""interp.loss_per_position on exact-evaluation batches: ignore_index padding, cross_entropy's numbers."""

import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.data import SplitWindows
from ftransformer.model import cross_entropy


def test_loss_per_position_takes_split_windows_padding(tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, size=40).astype(np.uint16)
    # 39 targets in windows of 7: five full windows and a tail window whose first 3 targets are padding.
    windows = SplitWindows(ids, seq_len=7, batch_size=8)
    tokens, targets = windows[0]
    assert tokens.shape == (6, 7) and bool((targets == -100).any())

    curve = interp.loss_per_position(params, tokens, targets, tiny_cfg)

    logits = ft.forward(params, tokens, tiny_cfg)
    for p in range(7):
        keep = targets[:, p] != -100
        expected = cross_entropy(logits[keep, p][None], targets[keep, p][None])
        torch.testing.assert_close(curve[p], expected)


def test_loss_per_position_lifts_low_precision_logits(tiny_cfg):
    params = ft.tree.map(lambda x: x.to(torch.bfloat16), ft.init_params(tiny_cfg, seed=4))
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, tiny_cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    curve = interp.loss_per_position(params, tokens, targets, tiny_cfg)
    assert curve.dtype == torch.float32
    expected = cross_entropy(ft.forward(params, tokens, tiny_cfg), targets)
    torch.testing.assert_close(curve.mean(), expected)


def test_loss_per_position_position_with_no_target_is_nan(tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=5)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    targets = torch.tensor([[-100, 1, 2, 3], [-100, 4, 5, 6]])
    curve = interp.loss_per_position(params, tokens, targets, tiny_cfg)
    assert bool(curve[0].isnan()) and bool(torch.isfinite(curve[1:]).all())


def test_loss_per_position_still_rejects_bad_targets(tiny_cfg):
    params = ft.init_params(tiny_cfg, seed=6)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets contains id -1"):
        interp.loss_per_position(params, tokens, torch.tensor([[0, -1, 0, 0]]), tiny_cfg)
    with pytest.raises(ValueError, match="targets contains id 37"):
        interp.loss_per_position(params, tokens, torch.tensor([[0, 37, 0, 0]]), tiny_cfg)
    with pytest.raises(TypeError, match="targets"):  # the annotation under the test hook, the check without it
        interp.loss_per_position(params, tokens, torch.zeros(1, 4), tiny_cfg)
