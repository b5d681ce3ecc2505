"""Writes tests/data/checkpoint_v1/ with the code of commit 1f2cddd (checkpoint format version 1).

Run once, against that commit's package, to (re)create the files test_checkpoint.py reads::

    git worktree add /tmp/oldtree 1f2cddd
    PYTHONPATH=/tmp/oldtree python3 tests/data/make_checkpoint_v1.py tests/data/checkpoint_v1

``float/``: params and a chain(clip, AdamW) state after one update, a char tokenizer; ``int8/``: the
same params quantized. ``expected.safetensors``: the tensors the v1 files must load as, named by path.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import ftransformer as ft
from ftransformer import checkpoint, data, optim
from ftransformer.quantize import quantize

CFG = ft.Config(vocab_size=7, d_model=6, n_heads=2, n_layers=1, d_ff=10, max_seq_len=5)


def make_optimizer():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-2, 2, 10, 1e-3)))


def main(out: Path) -> None:
    params = ft.init_params(CFG, seed=3)
    opt = make_optimizer()
    state = opt.init(params)
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    grads = torch.func.grad(ft.loss_fn)(params, tokens, tokens.roll(-1, dims=-1), CFG)
    updates, state = opt.update(grads, state, params)
    params = optim.apply_updates(params, updates)
    tok = data.CharTokenizer.from_text("abcdef ")
    checkpoint.save_checkpoint(out / "float", params=params, config=CFG, step=1, opt_state=state, tokenizer=tok,
                               metrics=[{"step": 1, "val_loss": 1.5}], extra={"note": "v1"})
    checkpoint.save_checkpoint(out / "int8", params=quantize(params, CFG), config=CFG, step=1)
    flat_state, _ = checkpoint.flatten_state(state)
    expected = {f"params.{k}": v for k, v in ft.tree_flatten_with_paths(params).items()}
    expected.update({f"opt_state.{k}": v for k, v in flat_state.items()})
    expected.update({f"int8.{k}": v for k, v in ft.tree_flatten_with_paths(quantize(params, CFG)).items()})
    save_file({k: v.clone() for k, v in expected.items()}, out / "expected.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
