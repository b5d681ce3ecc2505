"""Step 6 of the learning path: the complete model, and its loss before any training.

The model is the previous steps in a row:

    tokens -> embeddings (+ positions) -> n_layers blocks -> final norm -> unembed -> logits

The logits are one score per vocabulary entry, at every position: the model's guess for the *next*
token. The loss is the cross-entropy of those guesses against the tokens that actually come next.
``ft.forward`` and ``ft.loss_fn`` are pure functions of (params, tokens, config).

Run:  python examples/06_model.py
"""

import math
import textwrap

import torch

import ftransformer as ft


def main() -> None:
    # ---------------------------------------------------------------- 1. where the parameters are
    # The "seed" preset: 4 blocks of width 256, a 10,000-token vocabulary. The table compares the exact
    # count with the classic back-of-the-envelope estimate V*d + L*(4*d^2 + 2*d*d_ff).
    cfg = ft.PRESETS["seed"]
    print(f'1. the "seed" model: {cfg.n_layers} layers, d_model={cfg.d_model}, {cfg.n_heads} heads, '
          f"d_ff={cfg.d_ff}, vocab={cfg.vocab_size:,}, max_seq_len={cfg.max_seq_len}")
    print(textwrap.indent(ft.params.format_breakdown(cfg), "   "))
    params = ft.init_params(cfg, seed=0)
    n = ft.count_params(params)
    print(f"   count_params(init_params(seed)) = {n:,} (equals the exact total: "
          f"{n == ft.params.param_breakdown(cfg)['total']})")
    # What to look at: with a 10k vocabulary, embeddings are almost half of this small model; the
    # output projection costs nothing because it is tied to (is the same tensor as) the embedding.

    # ---------------------------------------------------------------- 2. a forward pass
    gen = torch.Generator().manual_seed(0)
    batch, seq = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # predict token t+1 from tokens 0..t
    logits = ft.forward(params, inputs, cfg)  # no key: dropout off (evaluation mode)
    print()
    print("2. forward pass")
    print(f"   tokens {tuple(inputs.shape)} (batch, seq) -> logits {tuple(logits.shape)} (batch, seq, vocab)")
    # Leading batch axes are free-form: one sequence, a batch, a batch of batches.
    single = ft.forward(params, inputs[0], cfg)
    nested = ft.forward(params, inputs.reshape(2, 1, seq), cfg)
    print(f"   one sequence {tuple(inputs[0].shape)} -> {tuple(single.shape)}; "
          f"nested batch {(2, 1, seq)} -> {tuple(nested.shape)}; "
          f"same numbers: {torch.allclose(single, logits[0], atol=1e-5)}")
    # Causality end to end: changing the token at position 40 changes no logits before position 40.
    changed = inputs.clone()
    changed[:, 40] = (changed[:, 40] + 1) % cfg.vocab_size
    diff = (ft.forward(params, changed, cfg) - logits).abs().amax(dim=(0, 2))
    print(f"   change token 40: logits at positions 0..39 move by {float(diff[:40].max()):.1e}, "
          f"at 40..63 by up to {float(diff[40:].max()):.2f}")

    # ---------------------------------------------------------------- 3. the loss of an untrained model
    # At init every weight is small, so the logits are all close to 0 and the softmax is close to
    # uniform: probability 1/V for every token. The cross-entropy of a uniform guess is -log(1/V) =
    # ln(V). Small random logits cost a little more (about std^2 / 2 nats), so expect a loss just
    # above ln(V); a fresh model far from it has an initialisation bug.
    loss = float(ft.loss_fn(params, inputs, targets, cfg))
    probs = logits.softmax(dim=-1)
    print()
    print("3. loss before training")
    print(f"   logits: mean {float(logits.mean()):+.3f}, std {float(logits.std()):.3f}; "
          f"largest probability {float(probs.max()):.6f} vs uniform 1/V = {1 / cfg.vocab_size:.6f}")
    print(f"   loss = {loss:.4f}   ln(vocab_size) = ln({cfg.vocab_size}) = {math.log(cfg.vocab_size):.4f}")
    # Perplexity exp(loss) reads as "choosing uniformly among this many tokens": about all of them.
    print(f"   perplexity exp(loss) = {math.exp(loss):,.0f} of {cfg.vocab_size:,} tokens")

    # Padding: targets equal to ignore_index (-100 by default) count for nothing in the mean, so
    # hiding the second half gives exactly the loss of the first half.
    padded = targets.clone()
    padded[:, 32:] = -100
    masked = float(ft.loss_fn(params, inputs, padded, cfg))
    first_half = float(ft.model.cross_entropy(logits[:, :32], targets[:, :32]))
    print(f"   targets 32..63 set to -100: loss {masked:.4f} = loss of positions 0..31 alone {first_half:.4f}")


if __name__ == "__main__":
    main()
