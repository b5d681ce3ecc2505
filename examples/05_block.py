"""Step 5 of the learning path: the transformer block, pre-LN and post-LN.

A block is attention (step 3) then a feed-forward network (step 4), each wrapped the same way: a
residual connection (add the sublayer's output to its input) and a normalisation. The model is a
stack of identical blocks, all reading from and writing to one vector per position -- the
*residual stream*. Where the norm goes matters:

* post-LN (the 2017 diagram):  x = norm(x + f(x))   -- the stream is re-normalised after every sublayer;
* pre-LN  (GPT-2 and later):   x = x + f(norm(x))   -- f sees a normalised copy, the stream itself is a
  plain running sum, and an untouched identity path runs from the embeddings to the output.

Deep post-LN stacks are known to need learning-rate warm-up and care; pre-LN trains deep stacks
out of the box, which is why nearly every model since GPT-2 uses it.

Run:  python examples/05_block.py [--plot block.png]
"""

import argparse

import torch

import ftransformer as ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also save a PNG of stream and gradient norms by depth")
    args = parser.parse_args()

    base = ft.Config(vocab_size=200, d_model=64, n_heads=4, n_layers=12, d_ff=256, max_seq_len=32)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (4, 32), generator=gen)  # (batch, seq)
    # One position per token, with the same batch axes as the tokens (the layers' signatures say so),
    # and the causal mask they give, built once and shared by every block.
    positions = torch.arange(tokens.shape[-1]).expand(tokens.shape)
    mask = ft.layers.self_mask(positions)

    # ---------------------------------------------------------------- 1. one block
    # A block's parameters are exactly the pieces steps 3 and 4 used, plus one norm per sublayer.
    params = ft.init_params(base, seed=0)
    blk = params["blocks"][0]
    print("1. one block's parameters (the params pytree mirrors the call tree)")
    for part, leaves in blk.items():
        print(f"   {part:<5} " + ", ".join(f"{name} {tuple(w.shape)}" for name, w in leaves.items()))
    x = ft.layers.embed_tokens(params["embed"]["tokens"], tokens)
    x = x + ft.layers.learned_positions(params["embed"]["positions"], positions)
    y = ft.layers.block(blk, x, base, mask=mask)
    print(f"   block: {tuple(x.shape)} -> {tuple(y.shape)}: same shape in and out, so blocks stack")

    # ---------------------------------------------------------------- 2. the residual stream through depth
    # Run the same 12-block stack in both arrangements, recording the size of the stream after each
    # block, and the gradient each block's parameters receive from the loss of the untrained model.
    results = {}
    for position in ("pre", "post"):
        cfg = base.replace(norm_position=position)
        p = ft.init_params(cfg, seed=0)
        x = ft.layers.embed_tokens(p["embed"]["tokens"], tokens)
        x = x + ft.layers.learned_positions(p["embed"]["positions"], positions)
        stream = [float(x.norm(dim=-1).mean())]
        for block_params in p["blocks"]:
            x = ft.layers.block(block_params, x, cfg, mask=mask)
            stream.append(float(x.norm(dim=-1).mean()))
        # torch.func.grad of the pure loss: the gradient is a pytree shaped exactly like the params.
        grads = torch.func.grad(ft.loss_fn)(p, tokens[:, :-1], tokens[:, 1:], cfg)
        grad = [float(torch.stack([g.norm() for g in ft.tree.leaves(b)]).norm()) for b in grads["blocks"]]
        results[position] = (stream, grad)

    print()
    print(f"2. {base.n_layers} blocks, d_model={base.d_model}: mean |x| of the stream after each block, "
          "and |gradient| of each block's parameters")
    print(f"   {'after block':>11} {'pre-LN |x|':>11} {'post-LN |x|':>12} {'pre-LN |grad|':>14} {'post-LN |grad|':>15}")
    (pre_x, pre_g), (post_x, post_g) = results["pre"], results["post"]
    for i in (0, 1, 2, 3, 4, 6, 8, 10, 12):
        label = "embedding" if i == 0 else str(i)
        grads_row = f"{pre_g[i - 1]:>14.4f} {post_g[i - 1]:>15.4f}" if i else f"{'':>14} {'':>15}"
        print(f"   {label:>11} {pre_x[i]:>11.3f} {post_x[i]:>12.3f} {grads_row}".rstrip())
    # What to look at:
    # * post-LN pins the stream to |x| = sqrt(d_model) = 8 after every block: whatever came before is
    #   rescaled, so no block can simply add to what earlier blocks wrote.
    # * pre-LN's stream is a running sum: it starts at the embeddings' size and grows as blocks add
    #   their outputs -- the identity path keeps the embedding itself in the sum, unchanged.
    # * gradients: pre-LN's shrink smoothly from the first block to the last; post-LN's depend on the
    #   scales entering each norm -- block 1, fed the small raw embedding, gets far more than the rest.
    print(f"   pre-LN  gradient, first / last block: {pre_g[0] / pre_g[-1]:.1f}x")
    print(f"   post-LN gradient, first / last block: {post_g[0] / post_g[-1]:.1f}x")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        fig, (ax_x, ax_g) = plt.subplots(1, 2, figsize=(10, 4))
        for position, (stream, grad) in results.items():
            ax_x.plot(range(len(stream)), stream, marker=".", label=f"{position}-LN")
            ax_g.plot(range(1, len(grad) + 1), grad, marker=".", label=f"{position}-LN")
        ax_x.set(title="residual stream size", xlabel="after block", ylabel="mean |x|", yscale="log")
        ax_g.set(title="gradient per block at init", xlabel="block", ylabel="|grad|", yscale="log")
        ax_x.legend()
        ax_g.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
