"""Step 9 of the learning path: interpretability -- watch induction heads form, find them, knock them out.

Because the model is a function, its intermediate values are a *return value* and an intervention is
an *argument*::

    logits, acts = ft.forward_with_activations(params, tokens, cfg)            # every activation, named
    acts["blocks"][1]["attn"]["pattern"]                                       # [*batch, heads, seq, kv_seq]
    ft.forward_with_activations(params, tokens, cfg, interventions=ft.interp.ablate_heads(1, [2], cfg))

This script trains a two-layer, *attention-only* model (no MLPs: ``Config(layout=Layout(mlp=False))``) on random
tokens in which a random stretch occurs twice, at random places. The second copy can only be predicted
by looking back: find where the current token occurred before and copy the token that *followed* it.
That takes two heads working together (Olsson et al. 2022, "In-context Learning and Induction Heads"):

* a *previous-token head* in layer 0 writes "the token before me was A" into every position;
* an *induction head* in layer 1 looks for the position whose previous token is the current token,
  and copies what sits there.

Then it scores every head, draws the attention, shows the loss on the repeated half falling far below
the first half, and knocks heads out to see which ones the model needs.

Two choices make the circuit form in a couple of minutes on a CPU (each measured: without either, the
same budget ends with no induction head). Rotary positions (``Positional("rope")``): attention scores
then depend on the *distance* between tokens, so "look one back" is one pattern for every position
instead of one to learn per position. Separate unembedding (``Embeddings(tie=False)``): with a tied
one, the direct path embedding -> unembedding scores each token highest as its own successor (a token's
embedding is closest to itself), a bias the model has to unlearn on random data before copying pays.

Run:  python examples/09_interpretability.py [--steps N] [--seed S] [--out DIR]   (about two minutes)
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ftransformer as ft
from ftransformer.config import Embeddings, Layout, Positional
from ftransformer import optim, train


def format_table(name: str, scores: torch.Tensor) -> str:
    layers, heads = scores.shape
    lines = [f"   {name}", "     layer " + "".join(f"  head {h}" for h in range(heads))]
    lines += [f"     {i:>5} " + "".join(f"  {float(v):6.2f}" for v in scores[i]) for i in range(layers)]
    return "\n".join(lines)


def halves(losses: torch.Tensor, half: int) -> tuple[float, float]:
    """Mean loss predicting the rest of the first copy vs predicting the second copy.

    The target at position ``t`` is token ``t + 1``: positions ``0 .. half-2`` predict the first copy
    (unpredictable), ``half-1`` predicts the start of the second copy (unpredictable too: nothing marks
    where it starts), and ``half .. 2*half-2`` predict the rest of the second copy.
    """
    return float(losses[: half - 1].mean()), float(losses[half:].mean())


def ablated_halves(params, tokens, targets, cfg, interventions, half) -> tuple[float, float]:
    """``halves`` of the loss per position with ``interventions`` applied."""
    with torch.no_grad():
        logits, _ = ft.forward_with_activations(params, tokens, cfg, interventions=interventions)
    return halves(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(0), half)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    parser.add_argument("--out", metavar="DIR", help="write the plots and the model here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and leaves the other cores alone

    # ---------------------------------------------------------------- 1. model and data
    # Attention only: each block is x + attention(norm(x)), so everything the model computes is done
    # by attention heads (and the embeddings).
    cfg = ft.Config(vocab_size=64, d_model=64, n_heads=4, n_layers=2, d_ff=1, max_seq_len=48,
                    bias=False, positional=Positional("rope"), layout=Layout(mlp=False),
                    embeddings=Embeddings(tie=False))
    half = cfg.max_seq_len // 2
    # The ids mean nothing; a character per id only makes the plots and `ftransformer inspect` readable.
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-*/"[: cfg.vocab_size]
    letters = ft.data.CharTokenizer(list(chars))
    params = ft.init_params(cfg, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokens, _ = ft.interp.repeated_stretches(cfg, 1, gen)
    print(f"1. a {cfg.n_layers}-layer attention-only model: {cfg.n_heads} heads a layer, d_model={cfg.d_model}, "
          f"{ft.count_params(params):,} parameters")
    print(f"   a training row, one character per id: {letters.decode(tokens[0].tolist())}")
    print(f"   (somewhere in it a stretch of tokens occurs twice; ln(vocab) = {math.log(cfg.vocab_size):.3f} "
          "is the loss of a uniform guess)")

    # ---------------------------------------------------------------- 2. training
    # Fresh random rows every step, so there is nothing to memorise: the only thing that lowers the loss
    # below ln(vocab) is copying from context. The loss sits on a plateau for a while and then drops
    # quickly once the two layers find each other -- the "phase change" of Olsson et al. Strong weight
    # decay keeps the heads that do not take part small, which makes the circuit easy to read.
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(optim.warmup_cosine(2e-3, min(50, args.steps), args.steps, 2e-3), weight_decay=1.0),
    )
    opt_state = opt.init(params)
    step = train.make_train_step(cfg, opt)
    print()
    print(f"2. {args.steps} steps of 64 fresh rows; the best induction score of any head as it trains")
    start = time.perf_counter()
    every = max(args.steps // 6, 1)
    for s in range(args.steps):
        params, opt_state, metrics = step(params, opt_state, ft.interp.repeated_stretches(cfg, 64, gen))
        if (s + 1) % every == 0 or s == 0:
            induction = ft.interp.head_scores(params, cfg, batch=4, seed=1)["induction"]
            print(f"   step {s + 1:>5}   loss {float(metrics['loss']):.3f}   best induction score "
                  f"{float(induction.max()):.2f}   ({time.perf_counter() - start:.0f} s)")

    # ---------------------------------------------------------------- 3. which heads are they?
    # head_scores runs the model on random tokens repeated once (the whole context: two copies of
    # `half` tokens) and averages, per head, the attention from each token of the second copy to the
    # token after its first occurrence (induction), to the token just before it (previous-token), and
    # the entropy of its rows.
    scores = ft.interp.head_scores(params, cfg, batch=16, seed=2)
    induction, previous = scores["induction"], scores["previous_token"]
    layer, head = divmod(int(induction.argmax()), cfg.n_heads)
    best = float(induction[layer, head])
    # A head attending uniformly would score about 1/seq = 0.02 on each; 0.3 is a head doing the job.
    induction_heads = [h for h in range(cfg.n_heads) if float(induction[layer, h]) > 0.3]
    previous_heads = [h for h in range(cfg.n_heads) if float(previous[0, h]) > 0.25]
    print()
    print("3. every head, on random tokens repeated twice")
    print(format_table("induction score", induction))
    print(format_table("previous-token score", previous))
    print(f"   induction heads (score > 0.3): layer {layer}, heads {induction_heads}; the best is head {head} "
          f"at {best:.2f}")
    print(f"   their partners, previous-token heads (score > 0.25): layer 0, heads {previous_heads}")
    # Often more than one head learns each job: Adam moves every head at once, and nothing in the loss
    # prefers one copier over two. The same redundancy shows up in trained language models (the
    # "backup heads" Wang et al. 2022 found in GPT-2).

    # ---------------------------------------------------------------- 4. pictures
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ft-example-09-"))
    rep = ft.interp.repeated_random_tokens(cfg, half=12, batch=1, seed=3)[0]
    with torch.no_grad():
        _, acts = ft.forward_with_activations(params, rep, cfg)
    labels = [letters.decode([int(t)]) for t in rep]
    attention_png = ft.interp.plot_attention(
        acts["blocks"][layer]["attn"]["pattern"], labels, out / "induction_attention.png",
        title=f"layer {layer} on 12 random tokens repeated: induction heads look at the token after the last occurrence",
    )
    scores_png = ft.interp.plot_head_scores(scores, out / "head_scores.png", title="head scores of the trained model")
    model_dir = ft.save_checkpoint(out / "model", params=params, config=cfg, step=args.steps, tokenizer=letters)
    print()
    print(f"4. plots: {attention_png} (look for the stripe one step right of the second diagonal), {scores_png}")
    print(f"   the model: {model_dir} -- try `ftransformer inspect heads --checkpoint {model_dir} --out heads.png`")

    # ---------------------------------------------------------------- 5. the in-context learning curve
    test = ft.interp.repeated_random_tokens(cfg, half=half, batch=32, seed=4)
    tokens, targets = test[:, :-1], test[:, 1:]
    with torch.no_grad():
        losses = ft.interp.loss_per_position(params, tokens, targets, cfg)
    first, second = halves(losses, half)
    print()
    print(f"5. loss per position on {half} random tokens repeated: first copy {first:.3f} "
          f"(ln(vocab) = {math.log(cfg.vocab_size):.3f}), second copy {second:.3f}")
    print(f"   in-context advantage (first - second): {first - second:.3f}")

    # ---------------------------------------------------------------- 6. knock heads out
    # The intervention is an argument: the chosen heads write zeros to the residual stream, and
    # everything downstream sees that. Nothing is registered, nothing has to be undone.
    knockouts = {
        f"the best induction head (layer {layer} head {head})": ft.interp.ablate_heads(layer, [head], cfg),
        f"every induction head (layer {layer} heads {induction_heads})": ft.interp.ablate_heads(layer, induction_heads, cfg),
        f"every previous-token head (layer 0 heads {previous_heads})": ft.interp.ablate_heads(0, previous_heads, cfg),
    }
    advantage = {}
    print("6. zero-ablated, the in-context advantage becomes:")
    for name, interventions in knockouts.items():
        a_first, a_second = ablated_halves(params, tokens, targets, cfg, interventions, half)
        advantage[name] = a_first - a_second
        print(f"   {name:<52} first copy {a_first:.3f}  second copy {a_second:.3f}  advantage {a_first - a_second:.3f}")
    # One induction head alone is not needed when another does the same job; remove every induction
    # head, or the previous-token heads they read, and the model is back to guessing.
    # Every head at once, in one vmap-ed call: the loss change from ablating each head alone.
    sweep = ft.interp.head_ablation_sweep(params, tokens, targets, cfg)
    print(format_table("loss change from ablating each head alone", sweep))

    return {
        "induction": induction, "previous_token": previous, "layer": layer, "head": head, "best": best,
        "induction_heads": induction_heads, "previous_heads": previous_heads, "first": first, "second": second,
        "advantage_best_head": list(advantage.values())[0], "advantage_all_induction": list(advantage.values())[1],
        "advantage_previous_heads": list(advantage.values())[2], "plots": [attention_png, scores_png],
    }


if __name__ == "__main__":
    main()
