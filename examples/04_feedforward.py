"""Step 4 of the learning path: the feed-forward network -- GELU MLP and SwiGLU.

Attention moves information *between* positions; the feed-forward network then works on each position
*alone*: widen the vector to d_ff (4 x d_model is the classic choice), apply a non-linearity, narrow it
back. Most of a transformer's parameters live here, and much of what it "knows" is thought to be
stored in these weights.

* GELU MLP (GPT-2):          w_out( gelu(w_in x) )
* SwiGLU (PaLM, Llama):      w_out( silu(w_gate x) * (w_in x) ) -- a second projection *gates* each
  hidden unit. It has three matrices instead of two, so Llama shrinks d_ff to 2/3 of 4 x d_model to
  keep the parameter count equal.

Run:  python examples/04_feedforward.py [--plot activations.png]
"""

import argparse

import torch
import torch.nn.functional as F

import ftransformer as ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also save a PNG of the activation functions")
    args = parser.parse_args()

    # ---------------------------------------------------------------- 1. shapes and parameters
    d_model = 64
    gelu_cfg = ft.Config(vocab_size=100, d_model=d_model, n_heads=4, n_layers=1, d_ff=4 * d_model, max_seq_len=16)
    # 2/3 of 4 x d_model keeps SwiGLU's three matrices the size of GELU's two (3 * 2/3 = 2).
    swiglu_cfg = gelu_cfg.replace(activation="swiglu", d_ff=2 * 4 * d_model // 3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d_model, generator=gen)  # (batch, seq, d_model)

    print(f"1. feed-forward networks on x of shape {tuple(x.shape)} (batch, seq, d_model)")
    mlps = {}
    for name, cfg in (("GELU", gelu_cfg), ("SwiGLU", swiglu_cfg)):
        mlp = ft.init_params(cfg, seed=0)["blocks"][0]["mlp"]
        mlps[name] = mlp
        y = ft.layers.feedforward(mlp, x, cfg)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in mlp.items())
        print(f"   {name:<7} d_ff={cfg.d_ff:<4} output {tuple(y.shape)}  parameters {ft.count_params(mlp):>6,}")
        print(f"           {shapes}")
    # What to look at: both map d_model -> d_model; the parameter counts match to within the biases
    # and the rounding of 2/3.

    # ---------------------------------------------------------------- 2. position-wise
    # The same weights are applied to every position independently: shuffling the positions shuffles
    # the outputs and nothing else. (Attention is the only place positions talk to each other.)
    mlp = mlps["SwiGLU"]
    perm = torch.randperm(x.shape[-2], generator=gen)
    y = ft.layers.swiglu_mlp(mlp, x)
    y_perm = ft.layers.swiglu_mlp(mlp, x[:, perm])
    one = ft.layers.swiglu_mlp(mlp, x[0, 3:4])  # a single position, no batch axis
    print()
    print("2. position-wise: every position is processed on its own")
    print(f"   max |f(shuffled x) - shuffled f(x)| = {float((y_perm - y[:, perm]).abs().max()):.1e}")
    print(f"   max |f(x[0, 3]) alone - f(x)[0, 3]| = {float((one[0] - y[0, 3]).abs().max()):.1e}")

    # ---------------------------------------------------------------- 3. the non-linearities
    # Without the bend in the middle, w_out(w_in x) would be a single linear map. GELU is a smooth
    # ReLU: x * P(N(0,1) < x), slightly negative just below zero. SiLU (x * sigmoid(x)) is its close
    # cousin used as SwiGLU's gate. GPT-2 used a tanh approximation of GELU ("gelu_tanh").
    xs = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    print()
    print("3. activation functions")
    print(f"   {'x':>10}" + "".join(f"{v:>7.1f}" for v in xs.tolist()))
    for name, fn in (
        ("relu", F.relu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("silu", F.silu),
    ):
        print(f"   {name:>10}" + "".join(f"{v:>7.3f}" for v in fn(xs).tolist()))
    grid = torch.linspace(-6, 6, 1001)
    gap = float((F.gelu(grid) - F.gelu(grid, approximate="tanh")).abs().max())
    print(f"   largest |gelu - gelu_tanh| on [-6, 6]: {gap:.1e}")


    # ---------------------------------------------------------------- 4. where the parameters are
    # The claim at the top, checked on GPT-2 small: per block, the MLP has 2 * d_model * 4 d_model
    # weights against attention's 4 * d_model^2 -- twice as many.
    rows = dict(ft.params.param_breakdown(ft.PRESETS["gpt2"])["rows"])
    total = sum(rows.values())
    print()
    print("4. GPT-2 small's parameters by part")
    for part in ("feed-forward weights", "attention weights", "token embeddings", "position embeddings"):
        print(f"   {part:<22} {rows[part]:>12,}  {rows[part] / total:>4.0%}")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        xs = torch.linspace(-4, 4, 401)
        # matplotlib wants numpy arrays; torch tensors work but trip a numpy 2 deprecation warning.
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs.numpy(), F.relu(xs).numpy(), label="relu", linestyle=":")
        ax.plot(xs.numpy(), F.gelu(xs).numpy(), label="gelu")
        ax.plot(xs.numpy(), F.silu(xs).numpy(), label="silu (SwiGLU gate)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title="feed-forward non-linearities", xlabel="x", ylabel="f(x)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
