"""Step 2 of the learning path: causal scaled dot-product attention, one head.

Attention lets every position gather information from earlier positions. Each position emits

* a query  q -- "what am I looking for?",
* a key    k -- "what do I contain?",
* a value  v -- "what do I hand over if chosen?".

Position i scores every key by q_i . k_j / sqrt(head_dim), hides the future (j > i: a language model
must not peek at the token it is predicting), turns the scores into weights with a softmax, and
returns the weighted sum of the values. ``ft.layers`` has each step as its own function
(``attention_pattern``, ``attend``) and a fused fast path (``scaled_dot_product_attention``).

Run:  python examples/02_attention.py [--plot attention.png]
"""

import argparse
import math

import torch

import ftransformer as ft


def print_pattern(pattern: torch.Tensor, labels: list[str]) -> None:
    """A (seq, seq) attention pattern as a table: rows are queries, columns keys; '.' marks hidden keys."""
    width = max(4, *(len(w) for w in labels)) + 1
    print(" " * (width + 9) + "".join(f"{w:>{width}}" for w in labels))
    for i, row in enumerate(pattern.tolist()):
        cells = "".join(f"{'.':>{width}}" if j > i else f"{w:>{width}.2f}" for j, w in enumerate(row))
        print(f"   {i:>2} {labels[i]:>{width}} | {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also save a PNG of the attention pattern")
    args = parser.parse_args()

    # ---------------------------------------------------------------- 1. a hand-made head
    # A trained head learns its query/key projections. To see a *readable* pattern without training,
    # we build one by hand: every word gets a random unit vector, and both query and key are that
    # vector, scaled. The head then looks for earlier copies of the current word -- a toy version of
    # the "induction"/"duplicate token" heads found in real models.
    words = "the cat sat on the mat and the cat ran".split()
    head_dim = 16
    gen = torch.Generator().manual_seed(0)
    vocab = sorted(set(words))
    word_vec = torch.randn(len(vocab), head_dim, generator=gen)
    word_vec = word_vec / word_vec.norm(dim=-1, keepdim=True)
    x = word_vec[[vocab.index(w) for w in words]]  # (seq, head_dim)

    sharpness = 2.0 * head_dim**0.25  # q.k / sqrt(head_dim) is 4 for the same word, near 0 otherwise
    q = k = (sharpness * x)[None, None]  # (kv_heads=1, group=1, seq, head_dim): one head
    v = torch.randn(1, len(words), head_dim, generator=gen)  # (kv_heads=1, seq, head_dim)

    # Who may see whom is one rule, key position <= query position, built once as a (seq, seq) mask.
    positions = torch.arange(len(words))
    mask = ft.layers.causal_mask(positions, positions)
    # scores -> mask -> softmax, all inside attention_pattern.
    pattern = ft.layers.attention_pattern(q, k[:, 0], mask)
    print(f"1. a single causal head over {len(words)} words: weights of each query (row) on each key (column)")
    print_pattern(pattern[0, 0], words)
    # What to look at: the upper triangle is empty (no peeking ahead). Each repeated word ("the",
    # "cat") splits its attention between itself and its earlier copies; a new word has only itself
    # to match, so it attends to itself. Every row sums to 1 -- it is a probability distribution.
    print(f"   rows sum to 1: {torch.allclose(pattern.sum(-1), torch.ones(len(words)))}")

    # The weighted sum of values is the head's output: one head_dim vector per position.
    out = ft.layers.attend(pattern, v)
    print(f"   output = pattern @ values: {tuple(pattern[0, 0].shape)} x {tuple(v[0].shape)} "
          f"-> {tuple(out[0, 0].shape)}")

    # ---------------------------------------------------------------- 2. why divide by sqrt(head_dim)?
    # For random q, k with unit-variance entries, q.k has variance head_dim. Unscaled, wide heads would
    # feed huge scores to the softmax, which then puts almost all weight on one key (and passes almost
    # no gradient). Dividing by sqrt(head_dim) keeps scores at unit scale whatever the width.
    print()
    print("2. the 1/sqrt(head_dim) scale: random queries and keys over 64 positions")
    print(f"   {'head_dim':>8} {'std(q.k)':>9} {'std(q.k/sqrt(d))':>17} {'max weight unscaled':>20} {'scaled':>7}")
    for d in (4, 64, 1024):
        qr = torch.randn(64, d, generator=gen)
        kr = torch.randn(64, d, generator=gen)
        raw = qr @ kr.T
        top_raw = raw.softmax(-1).max(-1).values.mean()
        top_scaled = (raw / math.sqrt(d)).softmax(-1).max(-1).values.mean()
        print(f"   {d:>8} {float(raw.std()):>9.1f} {float((raw / math.sqrt(d)).std()):>17.2f} "
              f"{float(top_raw):>20.2f} {float(top_scaled):>7.2f}")

    # ---------------------------------------------------------------- 3. two paths, same numbers
    # The written-out einsum path is the one to read (and the one to vmap for per-example gradients);
    # torch's fused scaled_dot_product_attention is the one to run fast. They must agree.
    seq = 7
    q3 = torch.randn(2, 3, seq, head_dim, generator=gen)  # (batch, heads, seq, head_dim)
    k3 = torch.randn(2, 3, seq, head_dim, generator=gen)
    v3 = torch.randn(2, 3, seq, head_dim, generator=gen)
    # self_mask is that mask, marked causal: the fused path then uses its own causal kernel.
    mask3 = ft.layers.self_mask(torch.arange(seq))
    slow = ft.layers.scaled_dot_product_attention(q3, k3, v3, mask3, impl="einsum")
    fast = ft.layers.scaled_dot_product_attention(q3, k3, v3, mask3, impl="sdpa")
    print()
    print("3. einsum path vs fused SDPA path on a (batch=2, heads=3, seq=7, head_dim=16) input")
    print(f"   max |einsum - sdpa| = {float((slow - fast).abs().max()):.1e}")

    # Causality, tested rather than trusted: change the last position's key and value; no earlier
    # output may move.
    k4, v4 = k3.clone(), v3.clone()
    k4[..., -1, :] += 10.0
    v4[..., -1, :] += 10.0
    moved = ft.layers.scaled_dot_product_attention(q3, k4, v4, mask3, impl="einsum")
    earlier = float((moved[..., :-1, :] - slow[..., :-1, :]).abs().max())
    last = float((moved[..., -1, :] - slow[..., -1, :]).abs().max())
    print(f"   after changing the last key/value: earlier outputs moved by {earlier:.1e}, the last by {last:.2f}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(pattern[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(words)), words, rotation=45)
        ax.set_yticks(range(len(words)), words)
        ax.set(title="causal attention pattern", xlabel="key", ylabel="query")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
