"""``ftransformer sae collect | train | eval | features``: sparse autoencoders on a model's activations.

* ``sae collect --checkpoint DIR --site blocks.2.resid_post --out ACTS``: the site's activations on the
  corpus's training split (position 0 of each window dropped) into a memory-mapped file with metadata;
* ``sae train --acts ACTS --out RUN --architecture topk --d-sae 1024 --k 8 16 32``: a stack of SAEs, one
  per value of the longest of ``--k/--l1/--lr/--seeds`` (the others broadcast), trained by one vmapped
  step through ``fit``; ``RUN/metrics.jsonl``, ``RUN/latest`` (a checkpoint); ``--resume`` continues a run
  (0.2's ``RUN/saes.safetensors`` too);
* ``sae eval --checkpoint DIR --saes RUN``: every member spliced into the model on validation windows:
  L0, explained variance, CE recovered (zero and mean ablation), delta-CE, KL, dead and dense latents;
* ``sae features --checkpoint DIR --saes RUN --member I``: each latent's top-activating contexts, the
  token highlighted as ``[[token]]``, and (``--plot FILE.png``) the histogram of latent firing densities.
"""

import sys

ACTIONS = ("collect", "train", "eval", "features")


def add_arguments(parser) -> None:
    from ftransformer.cli.generate_cmd import DEVICES, add_gguf_argument
    from ftransformer.interp.sae.architectures import ARCHITECTURES

    parser.add_argument("action", choices=ACTIONS, help="collect activations, train SAEs, evaluate them, show features")
    model = parser.add_argument_group("the model (collect, eval, features)")
    model.add_argument("--checkpoint", metavar="DIR", default=None, help="a checkpoint or `ftransformer train` run directory")
    model.add_argument("--hf-dir", metavar="DIR", default=None, help="a Hugging Face model directory instead")
    add_gguf_argument(model)
    model.add_argument("--data", metavar="FILE", default=None, help="corpus text file (default: the built-in corpus)")
    model.add_argument("--site", default=None, help="collect: activation path, e.g. blocks.1.resid_post")
    model.add_argument("--tokens", type=int, default=100_000, help="collect: activation rows to store (default: 100000)")
    model.add_argument("--sequences", type=int, default=32, help="eval, features: validation windows used (default: 32)")
    model.add_argument("--device", choices=DEVICES, default="cpu", help="where to run (default: cpu)")
    train = parser.add_argument_group("training (train)")
    train.add_argument("--acts", metavar="DIR", default=None, help="train: a directory written by `sae collect`")
    train.add_argument("--out", metavar="DIR", default=None, help="collect: activations directory; train: run directory")
    train.add_argument("--architecture", choices=ARCHITECTURES, default="topk", help="SAE kind (default: topk)")
    train.add_argument("--d-sae", type=int, default=None, help="latents per SAE (default: 8 x the site's width)")
    train.add_argument("--k", type=int, nargs="+", default=[16], help="topk/batchtopk: latents per token (default: 16)")
    train.add_argument("--l1", type=float, nargs="+", default=[1.0], help="relu: L1 / jumprelu: L0 coefficient (default: 1)")
    train.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="learning rate (default: 1e-3)")
    train.add_argument("--seeds", type=int, nargs="+", default=None, help="one seed per member (default: 0, 1, ...)")
    train.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    train.add_argument("--batch-size", type=int, default=1024, help="activation rows per step (default: 1024)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    look = parser.add_argument_group("eval, features")
    look.add_argument("--saes", metavar="RUN", default=None, help="a `sae train` run directory (or its latest/ checkpoint)")
    look.add_argument("--member", type=int, default=0, help="features: which SAE of the stack (default: 0)")
    look.add_argument("--latents", type=int, nargs="+", default=None, help="features: latents to show (default: 5 most frequent)")
    look.add_argument("--top", type=int, default=5, help="features: contexts per latent (default: 5)")
    look.add_argument("--plot", metavar="FILE.png", default=None, help="features: write the latent density histogram")


def _need(args, *names: str) -> None:
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise ValueError(f"sae {args.action} needs {', '.join(missing)}")


def _windows(ids, seq: int, count: int | None):
    """Non-overlapping windows of ``seq`` token ids, as a ``[windows, seq]`` long tensor."""
    import torch

    n = len(ids) // seq if count is None else min(count, len(ids) // seq)
    if n < 1:
        raise ValueError(f"the corpus split has {len(ids)} tokens, fewer than one window of {seq}")
    return torch.as_tensor(ids[: n * seq].astype("int64")).reshape(n, seq)


def _model_and_data(args):
    from ftransformer.cli.generate_cmd import select_device, load_model
    from ftransformer.data import load_dataset

    device = select_device(args.device)
    cfg, params, tokenizer = load_model(args, device)
    data = load_dataset(args.data, tokenizer=tokenizer, seq_len=cfg.max_seq_len)
    return cfg, params, tokenizer, data, device


def _collect(args) -> int:
    _need(args, "site", "out")
    from ftransformer.interp.sae.activations import collect_activations

    cfg, params, _, data, device = _model_and_data(args)
    windows = _windows(data.train, cfg.max_seq_len, None).to(device)
    batches = (windows[i : i + 16] for i in range(0, windows.shape[0], 16))
    store = collect_activations(params, batches, cfg, args.site, args.out, n_tokens=args.tokens)
    print(f"wrote {store.data.shape[0]} x {store.data.shape[1]} activations of {args.site} to {args.out} "
          f"(normalization scale {store.scale:.4g})")
    return 0


def _members(args) -> int:
    given = {"--k": len(args.k), "--l1": len(args.l1), "--lr": len(args.lr)}
    if args.seeds is not None:
        given["--seeds"] = len(args.seeds)
    n = max(given.values())
    bad = {flag: count for flag, count in given.items() if count not in (1, n)}
    if bad:
        raise ValueError(f"each of --k/--l1/--lr/--seeds takes 1 value or {n} (one per member), got {bad}")
    return n


def _train(args) -> int:
    _need(args, "acts", "out")
    from ftransformer.interp.sae.activations import open_activations
    from ftransformer.interp.sae.architectures import SAEConfig
    from ftransformer.interp.sae.stack import make_hparams
    from ftransformer.interp.sae.train import fit_stack

    n = _members(args)
    acts = open_activations(args.acts)
    d_in = acts.data.shape[1]
    d_sae = args.d_sae or 8 * d_in
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=args.architecture, k_max=min(max(args.k), d_sae))
    hp = make_hparams(n, k=[float(k) for k in args.k] if len(args.k) > 1 else float(args.k[0]),
                      l1=args.l1 if len(args.l1) > 1 else args.l1[0], lr=args.lr if len(args.lr) > 1 else args.lr[0])
    seed = (args.seeds or [0])[0]
    state = fit_stack(acts, cfg, hp, args.out, steps=args.steps, batch_size=args.batch_size, seed=seed,
                      resume=args.resume, progress=sys.stderr.isatty())
    print(f"trained {n} {args.architecture} SAEs ({d_in} -> {d_sae}) on {acts.path} for {args.steps} steps; "
          f"wrote {args.out}/latest and metrics.jsonl")
    del state
    return 0


def _load_saes(path: str):
    from ftransformer.interp.sae.train import load_stack

    return load_stack(path)


def format_eval(out: dict) -> str:
    cols = ("l0", "explained_variance", "cosine", "ce_recovered_zero", "ce_recovered_mean", "delta_ce", "kl", "dead", "dense")
    names = ("L0", "expl.var", "cosine", "CE rec(0)", "CE rec(mean)", "dCE nats", "KL", "dead", "dense")
    lines = ["member" + "".join(f"{n:>13}" for n in names)]
    for i in range(out["l0"].shape[0]):
        lines.append(f"{i:>6}" + "".join(f"{float(out[c][i]):>13.4g}" for c in cols))
    lines.append(f"clean CE {float(out['ce_clean']):.4f}, zero-ablated {float(out['ce_zero']):.4f}, "
                 f"mean-ablated {float(out['ce_mean']):.4f} (nats)")
    return "\n".join(lines)


def _eval(args) -> int:
    _need(args, "saes")
    import torch

    from ftransformer.interp.sae.metrics import evaluate_stack

    state, hp, sae_cfg, meta = _load_saes(args.saes)
    cfg, params, _, data, device = _model_and_data(args)
    tokens = _windows(data.val, cfg.max_seq_len, args.sequences).to(device)
    with torch.no_grad():
        out = evaluate_stack(params, tokens, cfg, meta["site"], state.params, hp, sae_cfg, scale=meta["scale"])
    print(f"{sae_cfg.architecture} SAEs at {meta['site']}, {tokens.numel()} validation tokens")
    print(format_eval(out))
    return 0


def highlight(tokenizer, ids: list[int], at: int, before: int = 12, after: int = 4) -> str:
    """The tokens around position ``at`` decoded, the one at ``at`` in ``[[...]]``."""
    def text(part):
        return tokenizer.decode(part).replace("\n", "\\n")

    lo = max(0, at - before)
    return f"{text(ids[lo:at])}[[{text(ids[at:at + 1])}]]{text(ids[at + 1:at + 1 + after])}"


def plot_density(frequency, path: str, title: str) -> str:
    """Histogram of log10 firing frequency per latent (dead latents counted at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftransformer.io import save_figure

    values = frequency.clamp_min(1e-7).log10().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=50)
    ax.set_xlabel("log10 fraction of tokens the latent fires on")
    ax.set_ylabel("latents")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _features(args) -> int:
    _need(args, "saes")
    import torch

    from ftransformer.tree import unstack as unstack_params
    from ftransformer.interp.sae.activations import site_activations
    from ftransformer.interp.sae.architectures import encode

    state, hp, sae_cfg, meta = _load_saes(args.saes)
    members = state.params["w_dec"].shape[0]
    if not 0 <= args.member < members:
        raise ValueError(f"--member must lie in [0, {members}), got {args.member}")
    sae, one = unstack_params(state.params)[args.member], unstack_params(hp)[args.member]
    cfg, params, tokenizer, data, device = _model_and_data(args)
    tokens = _windows(data.val, cfg.max_seq_len, args.sequences).to(device)
    with torch.no_grad():
        x = site_activations(params, tokens, cfg, meta["site"])[:, 1:]
        latents = encode(sae, x * meta["scale"], one, sae_cfg).cpu()
    frequency = (latents > 0).float().reshape(-1, sae_cfg.d_sae).mean(0)
    chosen = args.latents or frequency.argsort(descending=True)[:5].tolist()
    for latent in chosen:
        if not 0 <= latent < sae_cfg.d_sae:
            raise ValueError(f"--latents must lie in [0, d_sae={sae_cfg.d_sae}), got {latent}")
        values = latents[..., latent]
        print(f"latent {latent}: fires on {float(frequency[latent]):.2%} of tokens")
        for flat in values.flatten().argsort(descending=True)[: args.top].tolist():
            row, pos = divmod(flat, values.shape[1])
            if values[row, pos] <= 0:
                break
            print(f"  {float(values[row, pos]):8.3f}  {highlight(tokenizer, tokens[row].tolist(), pos + 1)}")
    if args.plot:
        title = f"{meta['site']}: member {args.member} latent density"
        print(f"wrote {plot_density(frequency, args.plot, title)}")
    return 0


def run(args) -> int:
    return {"collect": _collect, "train": _train, "eval": _eval, "features": _features}[args.action](args)
