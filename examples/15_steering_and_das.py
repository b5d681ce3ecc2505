"""Step 15: steer a model, then find where a variable lives with distributed alignment search (DAS).

The model is one whose answer we know (``ft.interp.planted``): a Llama-shaped transformer with hand-set weights
that echoes the last token. Token ``t`` of 8 sits at angle ``2 pi t / 8`` on a circle in a PLANTED 2-D subspace of
the 16-wide (8 with ``--quick``) residual stream (random directions, plus noise elsewhere that the unembedding never reads), and its
blocks write nothing, so that circle is in the stream at every layer.

1. *Steering* (``ft.interp.steering_vector``, ``steering_sweep``, ``steering.steer``): the mean difference of the last position's
   activation between prompts ending in token 2 and prompts ending in token 0 is a vector that moves a point
   round the circle. Added at any layer with scale 1, it turns the answer 0 into 2; one vmapped sweep scores
   every (layer, scale), and ``ft.generate(..., interventions=...)`` samples with and without it.
2. *DAS* (``ft.interp.das_sweep``): which (layer, position, subspace size k) holds "the last token"? Train a
   rotation per hypothesis so that swapping the first k rotated coordinates from a source run makes the model
   answer the source's last token -- all hypotheses in ONE stacked step -- and score each by interchange
   intervention accuracy (IIA) on held-out pairs. The heatmap lights up at the last position for k >= 2 only,
   and the learned 2-D subspace lines up with the planted one (principal angles).
3. *Boundless DAS* (``ft.interp.train_boundless_das``): learn k too, as a soft boundary; it settles on 2.

Run:  python examples/15_steering_and_das.py [--quick] [--out DIR]   (about a minute; --quick: seconds)
"""

import argparse
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer.interp import boundless, das, planted
from ftransformer.sampling import GREEDY

FROM, TO = 0, 2  # steer answers from token 0 towards token 2


def ending_in(cfg: ft.Config, token: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random prompts whose last token is ``token``."""
    prompts = torch.randint(0, cfg.vocab_size, (n, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))
    prompts[:, -1] = token
    return prompts


def steering(cfg: ft.Config, params: dict, out: Path) -> None:
    """Build the steering vector at every layer, sweep layer x scale as one vmap, and generate with it."""
    pos, neg = ending_in(cfg, TO, 32, seed=1), ending_in(cfg, FROM, 32, seed=2)
    vectors = {layer: ft.interp.steering_vector(params, cfg, pos, neg, f"blocks.{layer}.resid_post")
               for layer in range(cfg.n_layers)}
    scales = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]

    def answers_to(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1].argmax(-1) == TO).to(logits.dtype).mean()

    grid = ft.interp.steering_sweep(params, cfg, ending_in(cfg, FROM, 64, seed=3), vectors, scales, answers_to)
    print(f"steering: P(answer {TO}) for prompts ending in {FROM}, layer x scale {scales}")
    for layer, row in enumerate(grid.tolist()):
        print(f"  layer {layer}: " + " ".join(f"{v:.2f}" for v in row))
    plot_steering(grid, scales, out / "steering_sweep.png")
    prompt, new = torch.tensor([[FROM]]), cfg.max_seq_len - 1
    steer = ft.interp.steering.steer(vectors[1], "blocks.1.resid_post", 1.0)
    plain = ft.generate(params, prompt, cfg, max_new_tokens=new, sampling=GREEDY)
    print(f"  greedy after {prompt[0].tolist()}: plain {plain[0, -new:].tolist()} (the echo)")
    for rule in ("prompt", "all"):
        steered = ft.generate(params, prompt, cfg, max_new_tokens=new, sampling=GREEDY, interventions=steer, positions=rule)
        print(f"  steered at layer 1, positions={rule!r}: {steered[0, -new:].tolist()}")


def plot_steering(grid: torch.Tensor, scales: list[float], path: Path) -> None:
    """The layer x scale sweep as a heatmap."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(scales)), [str(s) for s in scales])
    ax.set_yticks(range(grid.shape[0]))
    ax.set(xlabel="scale", ylabel="layer", title=f"steering: P(answer {TO})")
    fig.colorbar(image, ax=ax)
    fig.savefig(path)
    print(f"  wrote {path}")


def alignment_search(cfg: ft.Config, params: dict, out: Path, steps: int, n: int, boundless_steps: int) -> None:
    """The (layer x position x k) DAS sweep, its heatmap and the learned subspace; then Boundless DAS."""
    train, test = planted.pairs(n, cfg, seed=5), planted.pairs(256, cfg, seed=6)
    positions, ks = list(range(cfg.max_seq_len)), [1, 2, 3]
    result = ft.interp.das_sweep(params, cfg, train, test, layers=range(cfg.n_layers), positions=positions, ks=ks,
                                 steps=steps, lr=0.1)
    print(f"DAS: IIA per (layer, position) for k = {ks}, {result.params['rotation'].shape[0]} hypotheses in one stacked step")
    for j, k in enumerate(ks):
        print(f"  k = {k}: " + "  ".join(" ".join(f"{v:.2f}" for v in row) for row in result.iia[:, :, j].tolist()))
    print(f"  wrote {ft.interp.plot_iia_heatmap(result.iia, out / 'das_iia.png', positions=positions, ks=ks)}")
    member = (cfg.n_layers - 1) * len(positions) * len(ks) + (len(positions) - 1) * len(ks) + 1  # last layer, last position, k=2
    learned = das.subspace({"rotation": result.params["rotation"][member]}, 2)
    angles = das.principal_angles(learned, planted.planted_basis(cfg.d_model, dtype=learned.dtype)[:, :2])
    print(f"  learned subspace (last layer, last position, k=2) vs planted: principal angles "
          f"{', '.join(f'{a:.1f}' for a in angles.tolist())} degrees")
    params_i, _ = boundless.train_boundless_das(params, cfg, f"blocks.{cfg.n_layers - 1}.resid_post", *train,
                                                positions=[-1], steps=boundless_steps)
    print(f"Boundless DAS at the last layer and position: boundary {float(params_i['boundary']):.2f}, "
          f"learned size {boundless.learned_size(params_i)} (planted: {planted.PLANTED_DIM})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and pairs (the same lesson)")
    parser.add_argument("--out", type=Path, default=None, help="where the plots go (default: a temporary directory)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ft-steer-das-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.quick:  # a narrower, shallower model and fewer pairs: the same lesson in seconds
        cfg = planted.planted_config(vocab=8, d_model=8, n_layers=2, seq=3, n_heads=2)
    else:
        cfg = planted.planted_config(vocab=8, d_model=16, n_layers=3, seq=4, n_heads=2)
    params = planted.planted_model(cfg)
    steering(cfg, params, out)
    alignment_search(cfg, params, out, steps=60 if args.quick else 150, n=32 if args.quick else 64,
                     boundless_steps=150)


if __name__ == "__main__":
    main()
