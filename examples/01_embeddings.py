"""Step 1 of the learning path: tokens become vectors, and positions get a say.

A transformer never sees text. It sees token ids, and the first thing it does is look each id up in a
table: one learned row of ``d_model`` numbers per id. Attention (step 2) is a set operation -- it
cannot tell "dog bites man" from "man bites dog" -- so the model must also be told *where* each token
is. There are three classic answers, all in ``ft.layers``:

* a learned position table (GPT-2): one more row per position, added to the token's row;
* fixed sinusoids (the 2017 paper): sin/cos waves of many frequencies, added the same way;
* rotary embeddings (RoPE, Llama): nothing is added; queries and keys are *rotated* by an angle
  proportional to their position, inside attention.

Run:  python examples/01_embeddings.py [--plot embeddings.png]
"""

import argparse

import torch

import ftransformer as ft

SHADES = " .:-=+*#%@"  # light to dark: a text heat map needs nothing but characters


def heat_row(values: torch.Tensor, lo: float, hi: float) -> str:
    """One character per value, darker for larger."""
    idx = ((values - lo) / (hi - lo) * (len(SHADES) - 1)).round().clamp(0, len(SHADES) - 1).long()
    return "".join(SHADES[i] * 2 for i in idx.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also save a PNG of the position similarity matrices")
    args = parser.parse_args()

    # ---------------------------------------------------------------- 1. the token embedding table
    # A tiny model: 50 token ids, 16 numbers per token. The table is just a tensor in the params pytree.
    cfg = ft.Config(vocab_size=50, d_model=16, n_heads=2, n_layers=1, d_ff=64, max_seq_len=32)
    params = ft.init_params(cfg, seed=0)
    table = params["embed"]["tokens"]
    tokens = torch.tensor([[3, 14, 15, 9], [2, 6, 5, 3]])  # a batch of 2 sequences, 4 tokens each

    x = ft.layers.embed_tokens(table, tokens)
    print("1. token embeddings")
    print(f"   table             {tuple(table.shape)}   (vocab, d_model)")
    print(f"   tokens            {tuple(tokens.shape)}        (batch, seq)")
    print(f"   embedded          {tuple(x.shape)}    (batch, seq, d_model)")
    # A lookup is nothing more than indexing: the same id always gives the same row, wherever it is.
    # Token 3 appears at position 0 of row 0 and position 3 of row 1 -- identical vectors so far.
    same = torch.equal(x[0, 0], x[1, 3])
    print(f"   token 3 at two different positions gives the same vector: {same}")

    # GPT-2's fix: a second learned table, indexed by position, added to the token vectors.
    positions = torch.arange(tokens.shape[-1])
    x_pos = x + ft.layers.learned_positions(params["embed"]["positions"], positions)
    print(f"   ...after adding learned positions: {torch.equal(x_pos[0, 0], x_pos[1, 3])}")

    # ---------------------------------------------------------------- 2. sinusoidal positions
    # Fixed features: channel pair i holds sin/cos of (position * base^(-2i/d_model)). Fast pairs tell
    # neighbours apart, slow pairs tell far-apart positions apart -- like the hands of a clock.
    n_pos, d_model = 24, 64
    pe = ft.layers.sinusoidal_positions(torch.arange(n_pos), d_model)
    unit = pe / pe.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T  # cosine similarity of every pair of positions
    print()
    print(f"2. sinusoidal positions: {tuple(pe.shape)} (seq, d_model), cosine similarity of positions 0..{n_pos - 1}")
    print("   (darker = more similar; the diagonal is each position with itself)")
    lo, hi = float(sim.min()), 1.0
    for i in range(n_pos):
        print(f"   {i:>3} |{heat_row(sim[i], lo, hi)}|")
    print(f"   scale: '{SHADES[0]}' = {lo:.2f} ... '{SHADES[-1]}' = {hi:.2f}")
    # What to look at: every diagonal band has one shade. The similarity of positions i and j depends
    # only on the distance i - j (sum of cos(w * (i - j)) over frequencies w), not on where you are:
    # the model can learn "the previous token" once and use it everywhere.
    offsets = torch.arange(n_pos)[:, None] - torch.arange(n_pos)[None, :]
    spread = max(float(sim[offsets == k].max() - sim[offsets == k].min()) for k in range(n_pos))
    print(f"   largest spread of similarity along any diagonal (same distance): {spread:.1e}")
    print("   similarity by distance:", "  ".join(f"{k}:{float(sim[k, 0]):.2f}" for k in (0, 1, 2, 4, 8, 16)))

    # ---------------------------------------------------------------- 3. rotary positions
    # RoPE rotates each pair of channels of a query or key by (position * frequency). A dot product of
    # two rotated vectors depends only on the *difference* of their angles, so attention scores see
    # relative positions only -- while nothing is added to the residual stream.
    head_dim = 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, head_dim, generator=gen)  # (heads=1, seq=1, head_dim)
    k = torch.randn(1, 1, head_dim, generator=gen)

    def rotated_score(q_pos: int, k_pos: int) -> float:
        cos_q, sin_q = ft.layers.rotary_angles(torch.tensor([q_pos]), head_dim)
        cos_k, sin_k = ft.layers.rotary_angles(torch.tensor([k_pos]), head_dim)
        q_rot = ft.layers.apply_rotary(q, cos_q, sin_q)
        k_rot = ft.layers.apply_rotary(k, cos_k, sin_k)
        return float((q_rot * k_rot).sum())

    print()
    print("3. rotary positions: the score q.k of the same q and k placed at different positions")
    print(f"   {'query pos':>9} {'key pos':>8} {'distance':>9} {'score':>9}")
    for q_pos, k_pos in [(3, 1), (10, 8), (100, 98), (3, 0), (10, 7), (100, 97)]:
        print(f"   {q_pos:>9} {k_pos:>8} {q_pos - k_pos:>9} {rotated_score(q_pos, k_pos):>9.4f}")
    # What to look at: equal distances give equal scores however far along the sequence they sit.
    cos, sin = ft.layers.rotary_angles(torch.tensor([37]), head_dim)
    kept = float(ft.layers.apply_rotary(q, cos, sin).norm() / q.norm())
    print(f"   a rotation keeps lengths: |rotate(q)| / |q| = {kept:.6f}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        fig, (ax_pe, ax_sim) = plt.subplots(1, 2, figsize=(11, 4.5))
        ax_pe.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
        ax_pe.set(title="sinusoidal features", xlabel="position", ylabel="channel")
        im = ax_sim.imshow(sim.numpy(), cmap="viridis", interpolation="nearest")
        ax_sim.set(title="cosine similarity of positions", xlabel="position", ylabel="position")
        fig.colorbar(im, ax=ax_sim)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
