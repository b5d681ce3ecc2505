"""Step 13: finding a circuit -- the induction circuit of step 9, found again by each method.

Step 9 trained a two-layer attention-only model whose heads copy from context, and found its heads by
looking at their attention. Here the same kind of model is taken apart by the methods that work on any
model, without knowing in advance what to look for:

* *exact activation patching* (``ft.interp.patch_sweep``): run the model on a corrupted prompt, put back
  one slice of the clean run's activations -- one layer and position of the residual stream, one head's
  output, keys, queries or values -- and see how much of the clean behaviour returns. One sweep is one
  call: vmapped runs that start at the patched layer and position;
* *attribution patching* (``ft.interp.attribution_patch``, AtP): the first-order estimate of every patch
  of a sweep from one forward and one backward pass, and AtP*, its fix for queries and keys;
  ``ft.interp.atp_report`` puts the estimate next to the exact sweep;
* *edges* (``ft.interp.edge_attribution``, ``ft.interp.edge_patch_sweep``): which component's write each
  reader uses -- every edge writer -> reader (the embedding and the heads -> each head's query, key and
  value input, and the logits) scored by EAP and EAP-IG from gradients, next to patching every edge
  alone, and the faithfulness of the top-k circuits (``ft.interp.faithfulness``);
* *composition scores* (``ft.interp.composition_scores``): from the weights alone, how much each
  layer-0 head writes into what each layer-1 head reads through its queries, keys or values.

The corruption is chosen so that only one path matters: the prompts are random tokens repeated once, and
the corrupted prompt changes every other token of the FIRST copy. A token of the second copy still finds
the token that followed its first occurrence (the values are intact) and still asks the same question
(its query is intact), but the position it should find no longer *follows* the right token: the
previous-token head of layer 0 wrote the wrong thing there, and the induction head of layer 1 reads that
through its keys. So the circuit shows up as: layer 0's previous-token head, and layer 1's induction
head's keys -- as an edge, previous-token head -> induction head's key input -- K-composition (Olsson et al. 2022, "In-context Learning and Induction Heads").

Each method is one function below; each prints what it found and writes its heatmaps.

Run:  python examples/13_circuits.py [--steps N] [--seed S] [--out DIR]   (about 15 seconds)
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer.config import Embeddings, Layout, Positional
from ftransformer import optim, train

HALF = 10  # the prompts: HALF random tokens, repeated once


def train_model(steps: int, seed: int) -> tuple[ft.Config, dict]:
    """Step 9's attention-only model at a small size (2 layers of 2 heads), trained on
    ``ft.interp.repeated_stretches``; strong weight decay keeps the heads outside the circuit small."""
    cfg = ft.Config(vocab_size=32, d_model=32, n_heads=2, n_layers=2, d_ff=1, max_seq_len=24,
                    bias=False, positional=Positional("rope"), layout=Layout(mlp=False),
                    embeddings=Embeddings(tie=False))
    params = ft.init_params(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(3e-3, 30, steps, 3e-3), weight_decay=1.0))
    state, step = opt.init(params), train.make_train_step(cfg, opt)
    start = time.perf_counter()
    for _ in range(steps):
        params, state, metrics = step(params, state, ft.interp.repeated_stretches(cfg, 64, gen))
    print(f"1. trained a {cfg.n_layers}-layer attention-only model ({cfg.n_heads} heads a layer) for {steps} steps: "
          f"loss {float(metrics['loss']):.3f} ({time.perf_counter() - start:.0f} s)")
    return cfg, params


def prompts(cfg: ft.Config, batch: int = 8, seed: int = 5):
    """``(clean, corrupt, metric)``: HALF random ids repeated once, the same rows with the even positions
    of the first copy changed, and the metric -- the mean log-probability of the right next token where
    the query token sits at an even offset of the second copy (its target follows a changed token)."""
    clean = ft.interp.repeated_random_tokens(cfg, half=HALF, batch=batch, seed=seed)
    shift = torch.randint(1, cfg.vocab_size, (batch, HALF // 2), generator=torch.Generator().manual_seed(seed + 1))
    corrupt = clean.clone()
    corrupt[:, 0:HALF:2] = (clean[:, 0:HALF:2] + shift) % cfg.vocab_size
    queries = torch.arange(HALF, 2 * HALF - 1, 2)
    targets = clean[:, queries + 1]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[..., queries, :], dim=-1)
        return logp.gather(-1, targets[..., None]).mean()

    return clean, corrupt, metric


def table(name: str, values: torch.Tensor, rows: str = "layer", columns: str = "head") -> str:
    cols = values.shape[1]
    lines = [f"   {name}", f"     {rows:>5} " + "".join(f"  {columns} {h:<2}" for h in range(cols))]
    lines += [f"     {i:>5} " + "".join(f"  {float(v):7.3f}" for v in row) for i, row in enumerate(values)]
    return "\n".join(lines)


def exact_patching(params, cfg, clean, corrupt, metric, out: Path) -> dict:
    """Exact patching sweeps, denoising (clean values into the corrupted run): the residual stream by layer
    x position, then every head's output, keys, queries and values by layer x head."""
    base = float(metric(ft.forward(params, corrupt, cfg)))
    print(f"2. exact patching (the metric: clean {float(metric(ft.forward(params, clean, cfg))):.3f}, corrupted {base:.3f}; "
          "below, the change from the corrupted run)")
    resid = ft.interp.patch_sweep(params, clean, corrupt, metric, cfg, site="resid_pre", by=("layer", "position")) - base
    changed = ", ".join(str(p) for p in range(HALF) if p % 2 == 0)
    print(f"   resid_pre: the effect sits where the corrupted tokens are (positions {changed}) entering layer 0, and one")
    print("   position later entering layer 1: the previous-token head has moved it there; largest per layer: "
          + ", ".join(f"layer {i} position {int(resid[i].argmax())}" for i in range(cfg.n_layers)))
    labels = [f"{p}:{int(t)}" for p, t in enumerate(clean[0])]  # position:token id of the first row
    ft.interp.plot_patching(resid, out / "circuit_resid_pre.png", by=("layer", "position"), labels=labels,
                  title="exact patching of resid_pre (denoising): change of the metric", label="change of log-prob")
    effects = {}
    for site in ("attn.head_out", "attn.k", "attn.q", "attn.v"):
        effects[site] = ft.interp.patch_sweep(params, clean, corrupt, metric, cfg, site=site, by=("layer", "head")) - base
        print(table(f"{site}, by layer x head", effects[site]))
    # Layer 0's values carry the changed tokens themselves: the previous-token head moves them one
    # position on. In layer 1 only the keys matter: patching the queries or values changes little.
    ft.interp.plot_patching(effects["attn.head_out"], out / "circuit_head_out.png", by=("layer", "head"),
                  title="exact patching of each head's output", label="change of log-prob")
    ft.interp.plot_patching(effects["attn.k"], out / "circuit_keys.png", by=("layer", "head"),
                  title="exact patching of each head's keys", label="change of log-prob")
    # Which keys: one panel per head, layer x position. The induction head's keys matter at the odd
    # positions of the first copy -- the tokens whose previous token was changed.
    by_position = ft.interp.patch_sweep(params, clean, corrupt, metric, cfg, site="attn.k", by=("layer", "position", "head")) - base
    key_positions = by_position[1, :, int(effects["attn.k"][1].argmax())].topk(HALF // 2).indices.sort().values.tolist()
    print(f"   the induction head's keys that matter most: positions {key_positions}")
    ft.interp.plot_patching(by_position, out / "circuit_keys_by_position.png", by=("layer", "position", "head"), labels=labels,
                  title="exact patching of the keys at each position, one panel per head", label="change of log-prob")
    return effects


def attribution(params, cfg, clean, corrupt, metric, exact: dict, out: Path) -> dict:
    """AtP for the head outputs, AtP and AtP* for the keys, each next to its exact sweep."""
    print("3. attribution patching: every patch estimated from one forward + backward")
    estimates = {}
    for name, site, correction in (("AtP, head outputs", "attn.head_out", False), ("AtP, keys", "attn.k", False),
                                   ("AtP*, keys", "attn.k", True)):
        estimate = ft.interp.attribution_patch(params, clean, corrupt, metric, cfg, site=site, by=("layer", "head"),
                                               correction=correction).detach()
        estimates[name] = estimate
        print(table(name, estimate))
        print("     " + ft.interp.atp_report(exact[site], estimate, top=2).replace("\n", "\n     "))
    ft.interp.plot_patching(estimates["AtP*, keys"], out / "circuit_atp_keys.png", by=("layer", "head"),
                  title="AtP* estimate for each head's keys", label="estimated change of log-prob")
    return estimates


def head_to_head(scores: torch.Tensor, g) -> str:
    """The edge of largest |score| from a head to a head's query, key or value input."""
    heads = torch.tensor([[w.startswith("a") and r.startswith("a") for r in g.readers] for w in g.writers])
    u, v = divmod(int(scores.abs().masked_fill(~(heads & g.edges), -1).argmax()), len(g.readers))
    return f"{g.writers[u]} -> {g.readers[v]}"


def edges(params, cfg, clean, corrupt, metric, out: Path) -> dict:
    """EAP and EAP-IG (edge attribution from gradients) next to exact edge patching, and the faithfulness of
    the circuits of EAP-IG's top edges under corrupted and mean ablation."""
    print("4. edges writer -> reader: EAP, EAP-IG (10 steps) and exact edge patching (denoising)")
    with torch.no_grad():
        exact = ft.interp.edge_patch_sweep(params, clean, corrupt, metric, cfg)
    g = ft.interp.graph(cfg)
    scores = {"EAP": ft.interp.edge_attribution(params, clean, corrupt, metric, cfg, method="eap").scores.detach(),
              "EAP-IG": ft.interp.edge_attribution(params, clean, corrupt, metric, cfg, method="eap-ig", steps=10).scores.detach(),
              "exact": exact}
    print(f"   {int(g.edges.sum())} edges; the largest (exact), each method's value:")
    print(f"     {'edge':<18}" + "".join(f"{m:>9}" for m in scores))
    for j in exact.abs().flatten().argsort(descending=True)[:5].tolist():
        u, v = divmod(j, len(g.readers))
        print(f"     {g.writers[u] + ' -> ' + g.readers[v]:<18}" + "".join(f"{float(s[u, v]):9.3f}" for s in scores.values()))
    on = g.edges
    for method in ("EAP", "EAP-IG"):
        print(f"   {method:<6} vs exact: " + ft.interp.atp_report(exact[on], scores[method][on], top=1).splitlines()[0]
              .replace(" patches,", " edges,"))
    first = {method: head_to_head(s, g) for method, s in scores.items()}
    for method, edge in first.items():
        print(f"   {method:<6} first head -> head edge: {edge}")
    ig = ft.interp.EdgeScores(scores["EAP-IG"], g)
    ft.interp.plot_edges(ig, out / "circuit_edges.png", k=8, title="the top 8 edges by EAP-IG (denoising)")
    with torch.no_grad():
        curves = [ft.interp.faithfulness(params, clean, corrupt, metric, cfg, ig, ablation=a) for a in ("corrupt", "mean")]
    print("   faithfulness of the circuits of EAP-IG's top k edges, the rest ablated (1: the whole model's metric, 0: none)")
    print("     k        " + "".join(f"{c.ablation + ' ablation':>18}" for c in curves))
    for j, k in enumerate(curves[0].ks):
        print(f"     {k:<8} " + "".join(f"{float(c.normalized[j]):18.3f}" for c in curves))
    ft.interp.plot_faithfulness(curves, out / "circuit_faithfulness.png", title="faithfulness of EAP-IG's top-k circuits")
    # Mean ablation also removes what both prompts share, which no score of this pair can see (0 by EAP-IG):
    # the induction head's query (the token it looks up) and value (the token it copies) inputs.
    shared = scores["EAP-IG"].clone()
    induction = edge_heads(first["EAP-IG"])[1]
    for reader in (f"a1.h{induction}.q", f"a1.h{induction}.v"):
        shared[g.writers.index("embed"), g.readers.index(reader)] = shared.abs().max() + 1
    kept = ft.interp.faithfulness(params, clean, corrupt, metric, cfg, ft.interp.EdgeScores(shared, g), ks=(7,), ablation="mean")
    print(f"   the top 5 and the embedding -> the induction head's query and value inputs, mean ablation: "
          f"{float(kept.normalized[0]):.3f}")
    return {"scores": scores, "first": first, "faithfulness": curves, "shared": kept}


def composition(params, cfg) -> dict:
    """Q, K and V composition scores from layer-0 heads (rows) into layer-1 heads (columns), from the weights
    alone, next to the same scores of an untrained model. The norms' scales are folded into the weights
    first (``fold_layer_norm``: the same logits), so each head's matrices are what it applies."""
    print("5. composition scores, layer-0 heads (rows) into layer-1 heads (columns), from the weights alone")
    folded, folded_cfg = ft.interp.fold_layer_norm(params, cfg)
    scores = {kind: ft.interp.composition_scores(folded, folded_cfg, 0, 1, kind) for kind in "qkv"}
    untrained, untrained_cfg = ft.interp.fold_layer_norm(ft.init_params(cfg, seed=123), cfg)
    random = ft.interp.composition_scores(untrained, untrained_cfg, 0, 1, "k")
    for kind, s in scores.items():
        print(table(f"{kind.upper()}-composition", s, rows="head", columns="into"))
    print(f"   (an untrained model's K-composition scores: {float(random.min()):.2f} .. {float(random.max()):.2f})")
    return scores


def edge_heads(edge: str) -> tuple[int, int]:
    """``"a0.h0 -> a1.h1.k"`` -> ``(0, 1)``: the writer's head and the reader's (-1 where the reader is not a key)."""
    writer, reader = edge.split(" -> ")
    return int(writer.split(".h")[1]), int(reader.split(".h")[1].split(".")[0]) if reader.endswith(".k") else -1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    parser.add_argument("--out", metavar="DIR", help="write the heatmaps here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is fastest
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ft-example-13-"))

    cfg, params = train_model(args.steps, args.seed)
    scores = ft.interp.head_scores(params, cfg, batch=16, seed=1)
    previous, induction = int(scores["previous_token"][0].argmax()), int(scores["induction"][1].argmax())
    print(f"   step 9's attention scores: previous-token head layer 0 head {previous}, induction head layer 1 head {induction}")
    clean, corrupt, metric = prompts(cfg)
    print()
    exact = exact_patching(params, cfg, clean, corrupt, metric, out)
    print()
    estimates = attribution(params, cfg, clean, corrupt, metric, exact, out)
    print()
    edge = edges(params, cfg, clean, corrupt, metric, out)
    print()
    comp = composition(params, cfg)

    found = {
        "exact patching": (int(exact["attn.head_out"][0].argmax()), int(exact["attn.k"][1].argmax())),
        "AtP, AtP*": (int(estimates["AtP, head outputs"][0].argmax()), int(estimates["AtP*, keys"][1].argmax())),
        "EAP-IG edges": edge_heads(edge["first"]["EAP-IG"]),
        "K-composition": divmod(int(comp["k"].argmax()), cfg.n_heads),
    }
    print()
    print(f"6. the circuit, by each method (layer-0 head, layer-1 head whose keys read it); the attention scores say "
          f"({previous}, {induction})")
    for method, (writer, reader) in found.items():
        print(f"   {method:<15} previous-token head L0H{writer} -> K-composition -> induction head L1H{reader}")
    print(f"   heatmaps: {out}")
    # One character per id makes the model usable from the command line: `ftransformer inspect patching`.
    letters = ft.data.CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEF"[: cfg.vocab_size]))
    model_dir = ft.save_checkpoint(out / "model", params=params, config=cfg, step=args.steps, tokenizer=letters)
    print(f"   the model: {model_dir} -- try `ftransformer inspect patching --checkpoint {model_dir} --clean "
          "pqkdmzfbxwpqkdmzfbx --corrupt pqkdmzfbawpqkdmzfbx --metric logprob --answer w --site attn.k --out keys.png`")
    return {"previous": previous, "induction": induction, "found": found, "exact": exact, "estimates": estimates,
            "edges": edge, "composition": comp, "out": out}


if __name__ == "__main__":
    main()
