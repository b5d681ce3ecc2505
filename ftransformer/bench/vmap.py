"""``ftransformer bench vmap``: what ``vmap`` over whole models buys, against what people would otherwise use.

Two questions, each answered by contenders timed interleaved in one process (every repetition runs
each contender once, so drifting machine load hits all alike; medians reported):

1. **Per-example gradients** of a batch (default 32 x 64 tokens, preset shakespeare-char-cpu):
   ``ft.per_example.per_example_grads`` (vmap of grad, einsum attention), the same on the SDPA path (where
   ``vmap`` has no batching rule and falls back to a loop), a Python loop of one gradient per example,
   and Opacus' ``GradSampleModule`` (per-sample gradients from module hooks) on the plain ``torch.nn``
   GPT of ``bench train``. Opacus is optional (``pip install 'ftransformer[bench]'``); without it its
   row says so. Before timing, every contender's gradients are checked against the loop's.
2. **An ensemble of 8 models**, each on its own batch: one ``make_ensemble_step`` (vmapped) against 8
   ``make_train_step`` calls in a row.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around each contender; on a CPU, each
contender runs in a fresh process and reports its peak resident set size (``/proc``'s VmHWM) above
that process's peak after setup (``tracemalloc`` sees only Python's own heap, not
torch's tensors, so it would report ~0 for all of them).
"""

import json
import statistics
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftransformer import tree
from ftransformer import optim
from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.layers.attention import attention_kernel
from ftransformer.ensemble import init_ensemble, make_ensemble_step, unstack_params
from ftransformer.model import loss_fn
from ftransformer.params import init_params
from ftransformer.tree import flatten_with_paths
from ftransformer.per_example import per_example_grads
from ftransformer.train import make_train_step

DEFAULT_PRESET = "shakespeare-char-cpu"
GOALS = {"python loop": 3.0, "opacus GradSampleModule": 1.0, "8 x make_train_step": 1.5}
# vmap over SDPA's kernels has no batching rule: vmap loops over the batch for that one op (and warns).
PER_EXAMPLE = ("vmap (einsum attention)", "vmap (sdpa attention)", "python loop", "opacus GradSampleModule")
ENSEMBLE = ("make_ensemble_step (vmap)", "make_ensemble_step (vmap, sdpa)", "8 x make_train_step")


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        return None
    return opacus


# ---------------------------------------------------------------- contenders


def _optimizer():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, betas=(0.9, 0.99), weight_decay=0.1))


def _setup(cfg: Config, batch: int, seq: int, members: int, seed: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    ens = torch.randint(0, cfg.vocab_size, (members, batch, seq + 1), generator=gen)
    return {
        "params": init_params(cfg, seed=seed, device=device),
        "tokens": data[:, :-1].contiguous().to(device), "targets": data[:, 1:].contiguous().to(device),
        "ens_tokens": ens[..., :-1].contiguous().to(device), "ens_targets": ens[..., 1:].contiguous().to(device),
    }


def _loop_grads(params, tokens, targets, cfg):
    """One gradient per example, one after another (vjp: the cheapest first-order pullback)."""
    leaves, spec = tree.flatten(params)
    out = []
    for i in range(tokens.shape[0]):
        def loss_of(leaves, i=i):
            return loss_fn(tree.unflatten(leaves, spec), tokens[i], targets[i], cfg)

        loss, pullback = torch.func.vjp(loss_of, leaves)
        (g,) = pullback(torch.ones_like(loss), retain_graph=False, create_graph=False)
        out.append(g)
    return tree.unflatten([torch.stack(col) for col in zip(*out)], spec)


class _OpacusGPT(nn.Module):
    """``bench train``'s GPT with the unembedding as its own ``nn.Linear`` (a copy of the embedding).

    Opacus computes per-sample gradients in module hooks, so the tied unembedding (``F.linear`` on the
    embedding's weight, outside any module) would be missed; as a module it is captured, and the
    embedding's true per-example gradient is the sum of the two. Positions are looked up per row
    (an ``(batch, seq)`` index), since Opacus reads a hooked module's first axis as the examples.
    """

    def __init__(self, base: nn.Module, cfg: Config):
        super().__init__()
        self.base = base
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(base.tokens.weight)

    def forward(self, tokens, targets):
        b = self.base
        # Positions get the batch axis too: Opacus takes a hooked module's first axis for the examples.
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x = b.tokens(tokens) + b.positions(pos)
        for blk in b.blocks:
            x = blk(x)
        logits = self.head(b.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def _register_layernorm_without_bias():
    """Opacus 1.6's LayerNorm sampler reads ``layer.bias.requires_grad`` and fails on ``bias=False``
    (the preset's choice); the same formulas, with the bias optional, replace it."""
    from opacus.grad_sample import register_grad_sampler
    from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

    @register_grad_sampler(nn.LayerNorm)
    def layer_norm_sampler(layer, activations, backprops):
        a = activations[0]
        out = {}
        if layer.weight.requires_grad:
            normed = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
            out[layer.weight] = sum_over_all_but_batch_and_last_n(normed * backprops, layer.weight.dim())
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, layer.bias.dim())
        return out


def _opacus_contender(params, cfg):
    from opacus import GradSampleModule

    from ftransformer.bench.train import check_supported, nn_from_params

    check_supported(cfg)
    _register_layernorm_without_bias()
    model = GradSampleModule(_OpacusGPT(nn_from_params(params, cfg), cfg).to(params["embed"]["tokens"].device),
                             loss_reduction="mean")

    def run(tokens, targets):
        for p in model.parameters():
            p.grad_sample = None
            p.grad = None
        model(tokens, targets).backward()
        return {n: p.grad_sample for n, p in model.named_parameters()}

    return run


def _check_opacus(grads: dict, ours: dict, cfg: Config) -> float:
    """Largest difference between Opacus' per-sample gradients and ours (mapped to our layout)."""
    flat = flatten_with_paths(ours)
    theirs = {k.removeprefix("_module."): v for k, v in grads.items()}
    worst = 0.0

    def cmp(a, b):
        nonlocal worst
        worst = max(worst, float((a - b).abs().max()))

    cmp(theirs["base.tokens.weight"] + theirs["head.weight"], flat["embed.tokens"])
    cmp(theirs["base.positions.weight"], flat["embed.positions"])
    cmp(theirs["base.blocks.0.attn.qkv.weight"].transpose(1, 2), flat["blocks.0.attn.w_qkv"])
    cmp(theirs[f"base.blocks.{cfg.n_layers - 1}.fc.weight"].transpose(1, 2), flat[f"blocks.{cfg.n_layers - 1}.mlp.w_in"])
    cmp(theirs["base.ln_f.weight"], flat["ln_f.scale"])
    return worst


def _ensemble_contender(cfg: Config, kernel: str, stacked, batch):
    ens_step = make_ensemble_step(cfg, _optimizer())
    ens = {"params": stacked, "opt": ens_step.init(stacked)}

    def vmapped():
        with attention_kernel(kernel):
            ens["params"], ens["opt"], m = ens_step.step(ens["params"], ens["opt"], batch)
        return m["loss"]

    return vmapped


def _contenders(cfg: Config, s: dict, members: int, names=None) -> dict:
    """name -> zero-argument callable, for the per-example and ensemble questions."""
    params, tokens, targets = s["params"], s["tokens"], s["targets"]
    out = {}
    want = set(names or PER_EXAMPLE + ENSEMBLE)
    if "vmap (einsum attention)" in want:
        out["vmap (einsum attention)"] = lambda: per_example_grads(params, tokens, targets, cfg)
    if "vmap (sdpa attention)" in want:
        out["vmap (sdpa attention)"] = attention_kernel("sdpa")(lambda: per_example_grads(params, tokens, targets, cfg))
    if "python loop" in want:
        out["python loop"] = lambda: _loop_grads(params, tokens, targets, cfg)
    if "opacus GradSampleModule" in want and _opacus() is not None:
        run = _opacus_contender(params, cfg)
        out["opacus GradSampleModule"] = lambda: run(tokens, targets)
    if want & set(ENSEMBLE):
        stacked = init_ensemble(cfg, range(members), device=tokens.device)
        batch = (s["ens_tokens"], s["ens_targets"])
        for name, impl in (("make_ensemble_step (vmap)", "auto"), ("make_ensemble_step (vmap, sdpa)", "sdpa")):
            if name in want:
                out[name] = _ensemble_contender(cfg, impl, stacked, batch)
        if "8 x make_train_step" in want:
            single = make_train_step(cfg, _optimizer())
            seq = {"params": unstack_params(stacked)}
            seq["opt"] = [_optimizer().init(p) for p in seq["params"]]

            def sequential():
                losses = []
                for i in range(members):
                    seq["params"][i], seq["opt"][i], m = single(seq["params"][i], seq["opt"][i],
                                                                 (batch[0][i], batch[1][i]))
                    losses.append(m["loss"])
                return torch.stack(losses)

            out["8 x make_train_step"] = sequential
    return out


# ---------------------------------------------------------------- timing, memory, report


def _peak_cuda(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set size. /proc's VmHWM belongs to the process image, while
    ``ru_maxrss`` survives ``exec`` and so starts at the (large) parent's peak in a child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory_here(args_json: str) -> None:
    """Run in a fresh process: one contender twice, print its peak RSS (MiB) above the post-setup peak."""
    a = json.loads(args_json)
    torch.set_num_threads(a["threads"])
    cfg = _config(a["preset"], a["seq"])
    s = _setup(cfg, a["batch"], a["seq"], a["members"], a["seed"], torch.device("cpu"))
    import warnings

    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    fn = _contenders(cfg, s, a["members"], [a["name"]])[a["name"]]
    before = peak_rss_mib()
    for _ in range(2):
        result = fn()
        del result
    print(json.dumps({"peak_mib": max(peak_rss_mib() - before, 0.0)}))


def _peak_cpu(name: str, args, seq: int, threads: int) -> float | None:
    payload = json.dumps({"preset": args.preset, "seq": seq, "batch": args.batch_size, "members": args.members,
                          "seed": args.seed, "name": name, "threads": threads})
    code = f"from ftransformer.bench.vmap import measure_memory_here; measure_memory_here({payload!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        print(f"(memory of {name} not measured: {r.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


def format_table(title: str, times: dict, baseline: str, memory: dict, missing: dict) -> str:
    base = statistics.median(times[baseline])
    width = max(len(n) for n in list(times) + list(missing)) + 2
    head = f"{title:<{width}}{'median ms':>10}{'min ms':>9}{'speed-up':>10}{'goal':>7}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for name, ts in times.items():
        med = statistics.median(ts)
        goal = f">={GOALS[name]:g}x" if name in GOALS else ""
        mem = memory.get(name)
        # speed-up of the vmapped baseline over this contender (>1: vmap is faster)
        lines.append(f"{name:<{width}}{med:>10.1f}{min(ts):>9.1f}{med / base:>9.2f}x{goal:>7}"
                     f"{'' if mem is None else f'{mem:.0f}':>10}")
    for name, why in missing.items():
        lines.append(f"{name:<{width}}{'skipped: ' + why:>36}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model sizes (default: {DEFAULT_PRESET}); dropout is set to 0")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch (default: 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's max_seq_len)")
    parser.add_argument("--members", type=int, default=8, help="ensemble members (default: 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved repetitions (default: 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and batches (default: 0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (on CPU it runs "
                        "each contender again in a fresh process)")
    parser.add_argument("--skip", action="append", default=[], choices=list(PER_EXAMPLE + ENSEMBLE),
                        help="leave a contender out (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's top operators of the two vmapped contenders")


def _config(preset: str, seq: int) -> Config:
    cfg = get_preset(preset).replace(dropout=0.0)
    if not 1 <= seq <= cfg.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, max_seq_len={cfg.max_seq_len}], got {seq}")
    return cfg


def run(args) -> int:
    import warnings

    with warnings.catch_warnings(), num_threads(args.threads):
        # vmap over SDPA's CPU kernel warns of its missing batching rule on every call (its rows show the
        # cost), and Opacus' hooks warn that the inputs need no gradient: both are expected here.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        return _run(args)


def _run(args) -> int:
    for name in ("batch_size", "members", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be >= 2")
    seq = get_preset(args.preset).max_seq_len if args.seq_len is None else args.seq_len
    cfg = _config(args.preset, seq)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    s = _setup(cfg, args.batch_size, seq, args.members, args.seed, device)
    names = [n for n in PER_EXAMPLE + ENSEMBLE if n not in args.skip]
    fns = _contenders(cfg, s, args.members, names)
    missing = {}
    if "opacus GradSampleModule" in names and "opacus GradSampleModule" not in fns:
        missing["opacus GradSampleModule"] = "opacus not installed (pip install 'ftransformer[bench]')"

    # The same numbers first: a fast wrong answer is no answer.
    ref = fns["python loop"]() if "python loop" in fns else per_example_grads(s["params"], s["tokens"], s["targets"],
                                                                             cfg)
    checks = []
    for name in ("vmap (einsum attention)", "vmap (sdpa attention)"):
        if name in fns:
            got = fns[name]()
            diff = max(float((a - b).abs().max()) for a, b in zip(tree.leaves(got), tree.leaves(ref)))
            checks.append(f"{name} {diff:.1e}")
    if "opacus GradSampleModule" in fns:
        checks.append(f"opacus {_check_opacus(fns['opacus GradSampleModule'](), ref, cfg):.1e}")
    print(f"bench vmap: preset {args.preset}, batch {args.batch_size} x {seq} tokens, {args.members} ensemble members, "
          f"device {device}, {threads} threads, torch {torch.__version__}"
          + (f", opacus {_opacus().__version__}" if _opacus() is not None else "")
          + f"; {args.repeats} interleaved repetitions after {args.warmup} warm-up, medians")
    if checks:
        print("per-example gradients vs the loop's, max abs difference: " + ", ".join(checks))

    times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device, unit=1e3)

    memory = {}
    if not args.no_memory:
        for name, fn in fns.items():
            if device.type == "cuda":
                memory[name] = _peak_cuda(fn, device)
            else:
                memory[name] = _peak_cpu(name, args, seq, threads)

    per = {k: v for k, v in times.items() if k in PER_EXAMPLE}
    ens = {k: v for k, v in times.items() if k in ENSEMBLE}
    if per and "vmap (einsum attention)" in per:
        print()
        print(format_table("per-example gradients", per, "vmap (einsum attention)", memory,
                           {k: v for k, v in missing.items() if k in PER_EXAMPLE}))
    if ens and "make_ensemble_step (vmap)" in ens:
        print()
        print(format_table(f"ensemble of {args.members}, one step", ens, "make_ensemble_step (vmap)", memory, {}))
    print("\nspeed-up: this row's median time / the vmapped row's (goal: at least this); peak MiB: "
          + ("torch.cuda.max_memory_allocated above the start" if device.type == "cuda"
             else "peak RSS above the post-setup peak, each contender in a fresh process"))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("vmap (einsum attention)", "make_ensemble_step (vmap)"):
            if name in fns:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fns[name]()
                print(f"\nprofile of {name}:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0
