"""``ftransformer bench interp``: our interpretability sweeps side by side with TransformerLens' loops.

One random GPT-2 checkpoint (Hugging Face ``GPT2LMHeadModel`` from a config, saved to a temporary
directory) is loaded by both libraries: ``ft.load_hf`` here, ``TransformerBridge.boot_transformers`` over
the same directory and model (TransformerLens 4.3, offline). Values are checked equal first (the logits,
then each exact sweep against TransformerLens', to ``TOL``), then every contender is timed, interleaved
(``bench.timing``), medians reported. The tasks, each with ours and TransformerLens' way:

* ``head ablation``: the loss change from zero-ablating each head (layer x head): ``interp.head_ablation_sweep``
  (runs from the ablated layer on, its attention taken from the cached head outputs) vs a ``run_with_hooks``
  loop zeroing one head of ``hook_z`` per run;
* ``resid_pre patching``: clean ``resid_pre`` into the corrupted run, layer x position, a logit difference at
  the last position: ``interp.patch_sweep`` (runs from the patched layer and position bucket on) vs
  ``transformer_lens.patching.get_act_patch_resid_pre``;
* ``head_out patching``: clean ``attn.head_out`` of one head (all positions), layer x head, exact:
  ``patch_sweep(site="attn.head_out", by=("layer", "head"))`` vs ``get_act_patch_attn_head_out_all_pos``;
* ``attribution, all heads``: ``interp.attribution_patch`` (AtP: one forward + backward estimates every head)
  vs the same exact TransformerLens sweep; AtP is an estimate, so its correlation with the exact values is
  printed instead of an equality check.

Goals (issue 22): the exact sweeps >= 2x TransformerLens at GPT-2-small size, >= 3x at 4 layers x 256; the
attribution >= 20x TransformerLens' exact head patching. Without ``transformer_lens`` importable the
TransformerLens rows are skipped with a message, and our sweeps are checked against a loop of single
interventions instead. TransformerLens' calls run under ``torch.no_grad`` (its fastest mode), ours as they are.
``resid_pre, logits_at=-1`` is ``patch_sweep`` told that the metric reads the last position only (so only
that position is unembedded); TransformerLens has no such option, its row is the same sweep as above.
``attribution, logits_at=-1`` is the same for AtP (one position unembedded and differentiated through);
its estimate must equal the plain AtP row's (checked).

Where the vocabulary is large next to the model, the unembedding bounds every exact sweep: a run whose
metric reads every position (the head-ablation loss) must project each position onto 50257 tokens. At
4 layers x 256 that is about 80% of a run's multiply-adds (12.9M per token against 3.1M for the four
blocks), so skipping blocks saves little there, and AtP (about four runs' work: the source run, the base
run's forward and backward) against 32 exact head patches has a ceiling near 8x in FLOPs. At GPT-2-small
size the blocks are 2.2x the unembedding and the skipped prefix (and positions) pay off.
"""

import contextlib
import io
import json
import platform
import statistics
import tempfile
import warnings

import torch

from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.interop.hf import load_hf
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.attribution import atp_report, attribution_patch
from ftransformer.interp.interventions import ablate_heads, head_ablation_sweep, patch
from ftransformer.interp.patching import patch_sweep
from ftransformer.model import cross_entropy

TOL = 1e-4
# name -> (n_layers, d_model, n_heads, vocab): GPT-2-small, the 4-layer size, and one for tests
SIZES = {"gpt2-small": (12, 768, 12, 50257), "4x256": (4, 256, 8, 50257), "tiny": (2, 64, 4, 1000)}
GOALS = {"gpt2-small": 2.0, "4x256": 3.0}  # exact sweeps: TransformerLens' time / ours
ATTRIBUTION_GOAL = 20.0
ABLATION, RESID, RESID_LAST, HEAD_OUT, ATP, ATP_LAST = (
    "head ablation", "resid_pre patching", "resid_pre, logits_at=-1", "head_out patching", "attribution, all heads",
    "attribution, logits_at=-1",
)
TASKS = (ABLATION, RESID, RESID_LAST, HEAD_OUT, ATP, ATP_LAST)
EXACT = TASKS[:4]
ESTIMATES = (ATP, ATP_LAST)
# the TransformerLens contender each task is compared with (it has no logits_at, and no attribution patching)
TL_TASK = {ABLATION: ABLATION, RESID: RESID, RESID_LAST: RESID, HEAD_OUT: HEAD_OUT, ATP: HEAD_OUT, ATP_LAST: HEAD_OUT}
TL_PIP = "pip install 'ftransformer[bench]' (transformer-lens)"


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="gpt2-small", choices=sorted(SIZES),
                        help="gpt2-small: 12 layers x 768, 12 heads; 4x256: 4 layers x 256, 8 heads (vocab 50257 both); "
                             "tiny: 2 x 64 (default: gpt2-small)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the size's)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences (default: 1)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed interleaved repetitions (default: 1; the value check runs each once more before)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed repetitions first (default: 0; the value check runs every contender once before)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    parser.add_argument("--no-tl", action="store_true", help="leave TransformerLens out even when it is installed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def key(who: str, task: str) -> str:
    """A contender's name: ``"ours: head ablation"``, ``"tl: head ablation"``."""
    return f"{who}: {task}"


def _hf_model(args, directory: str):
    """A random ``GPT2LMHeadModel`` of the size asked for, saved to ``directory``."""
    import transformers

    layers, width, heads, vocab = SIZES[args.size]
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=args.vocab or vocab,
        n_positions=max(1024, args.seq_len), bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(args.seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        model.save_pretrained(directory)
    return model


def _tokens(args, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(clean, corrupt, targets)``: random tokens, the same with the middle token changed, the next tokens."""
    gen = torch.Generator().manual_seed(args.seed)
    clean = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
    corrupt = clean.clone()
    corrupt[:, args.seq_len // 2] = (clean[:, args.seq_len // 2] + 1) % vocab
    targets = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
    targets[:, :-1] = clean[:, 1:]
    return clean, corrupt, targets


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    """The patching metric: the last position's logit of token 0 minus token 1, averaged over the batch."""
    return (logits[..., -1, 0] - logits[..., -1, 1]).mean()


def ours(cfg, params, clean, corrupt, targets) -> dict:
    """Our contender of each task (``ATP`` gives AtP's estimate of each patch's change of the metric)."""
    heads = dict(site="attn.head_out", by=("layer", "head"))
    return {
        ABLATION: lambda: head_ablation_sweep(params, clean, targets, cfg),
        RESID: lambda: patch_sweep(params, clean, corrupt, logit_diff, cfg),
        RESID_LAST: lambda: patch_sweep(params, clean, corrupt, logit_diff, cfg, logits_at=-1),
        HEAD_OUT: lambda: patch_sweep(params, clean, corrupt, logit_diff, cfg, **heads),
        ATP: lambda: attribution_patch(params, clean, corrupt, logit_diff, cfg, **heads),
        ATP_LAST: lambda: attribution_patch(params, clean, corrupt, logit_diff, cfg, logits_at=-1, **heads),
    }


def loops(cfg, params, clean, corrupt, targets) -> dict:
    """Each exact task's values by a loop of single ``forward_with_activations`` calls, one intervention each."""
    def run(tokens, fix):
        return forward_with_activations(params, tokens, cfg, interventions=fix)[0]

    _, source = forward_with_activations(params, clean, cfg)
    layers, heads, seq = cfg.n_layers, cfg.n_heads, clean.shape[-1]
    base = cross_entropy(run(clean, None), targets)
    resid = torch.tensor([[logit_diff(run(corrupt, patch(f"blocks.{i}.resid_pre", source["blocks"][i]["resid_pre"], positions=p)))
                           for p in range(seq)] for i in range(layers)])
    return {
        ABLATION: torch.tensor([[cross_entropy(run(clean, ablate_heads(i, h, cfg)), targets) - base for h in range(heads)]
                                for i in range(layers)]),
        RESID: resid,
        RESID_LAST: resid,
        HEAD_OUT: torch.tensor([[logit_diff(run(corrupt, patch(f"blocks.{i}.attn.head_out",
                                                               source["blocks"][i]["attn"]["head_out"], heads=h)))
                                 for h in range(heads)] for i in range(layers)]),
    }


def _quiet(fn):
    """``fn`` under ``torch.no_grad``, with TransformerLens' progress bars (stderr) swallowed."""
    def run():
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return fn()

    return run


def transformer_lens_model(directory: str, hf_model):
    """``(bridge, None)``, or ``(None, why)`` when TransformerLens cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        return None, f"transformer_lens is not importable ({error}); {TL_PIP}"
    with contextlib.redirect_stderr(io.StringIO()):
        bridge = TransformerBridge.boot_transformers(directory, hf_model=hf_model, device="cpu")
    return bridge.eval(), None


def theirs(bridge, clean, corrupt, targets) -> dict:
    """TransformerLens' contenders, keyed by the task each times (``TL_TASK`` maps every task to one)."""
    from transformer_lens import patching

    layers, heads = bridge.cfg.n_layers, bridge.cfg.n_heads

    def ablation():
        base = cross_entropy(bridge(clean), targets)
        out = torch.empty(layers, heads)
        for i in range(layers):
            for h in range(heads):
                def zero(z, hook, h=h):
                    z[:, :, h] = 0.0
                    return z

                logits = bridge.run_with_hooks(clean, fwd_hooks=[(f"blocks.{i}.attn.hook_z", zero)])
                out[i, h] = cross_entropy(logits, targets) - base
        return out

    def resid_pre():
        _, cache = bridge.run_with_cache(clean)
        return patching.get_act_patch_resid_pre(bridge, corrupt, cache, logit_diff)

    def head_out():
        _, cache = bridge.run_with_cache(clean)
        return patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt, cache, logit_diff)

    return {ABLATION: _quiet(ablation), RESID: _quiet(resid_pre), HEAD_OUT: _quiet(head_out)}


def check_values(mine: dict, reference: dict, what: str) -> dict:
    """The largest difference of each task's values in ``reference`` from ours; raises over ``TOL``."""
    diffs = {}
    for task, want in reference.items():
        diff = (mine[task].detach() - want).abs().max().item()
        if diff > TOL:
            raise AssertionError(f"{task}: ours differs from {what} by {diff:.3g} (expected <= {TOL:g})")
        diffs[task] = diff
    return diffs


def _goal(task: str, size: str) -> float | None:
    return ATTRIBUTION_GOAL if task in ESTIMATES else GOALS.get(size)


def rows(times: dict, size: str) -> list[dict]:
    """One row per task: medians (ms), TransformerLens' median over ours, the goal and whether it is met."""
    out = []
    for task in TASKS:
        mine, tl = statistics.median(times[key("ours", task)]), times.get(key("tl", TL_TASK[task]))
        row = {"task": task, "ours_ms": mine, "tl_ms": None, "speedup": None, "goal": _goal(task, size), "met": None}
        if tl is not None:
            row["tl_ms"] = statistics.median(tl)
            row["speedup"] = row["tl_ms"] / mine
            row["met"] = None if row["goal"] is None else row["speedup"] >= row["goal"]
        out.append(row)
    return out


def format_rows(table: list[dict], why_no_tl: str | None) -> str:
    head = f"{'task':<24}{'ours ms':>10}{'TL ms':>10}{'TL/ours':>9}{'goal':>7}  result"
    lines = [head, "-" * len(head)]
    for r in table:
        tl = "" if r["tl_ms"] is None else f"{r['tl_ms']:.0f}"
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        goal = "" if r["goal"] is None else f">={r['goal']:g}x"
        if r["speedup"] is None:
            result = "TL skipped"
        elif r["goal"] is None:
            result = "-"
        else:
            result = "met" if r["met"] else f"missed by {r['goal'] / r['speedup']:.2f}x"
        lines.append(f"{r['task']:<24}{r['ours_ms']:>10.0f}{tl:>10}{ratio:>9}{goal:>7}  {result}")
    if why_no_tl:
        lines.append(f"TransformerLens rows skipped: {why_no_tl}")
    return "\n".join(lines)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return f"{name or platform.processor() or platform.machine()}, torch {torch.__version__}"


def _fns(cfg, params, tokens, bridge) -> tuple[dict, dict]:
    """The contenders keyed ``key(who, task)``, and the value checks' largest differences (raises over ``TOL``)."""
    mine = ours(cfg, params, *tokens)
    values = {task: fn() for task, fn in mine.items()}
    if (diff := (values[ATP_LAST] - values[ATP]).abs().max().item()) > TOL:
        raise AssertionError(f"AtP with logits_at=-1 differs from AtP by {diff:.3g} (expected <= {TOL:g})")
    fns = {key("ours", task): fn for task, fn in mine.items()}
    if bridge is None:  # (with TransformerLens, its loops are the reference: the same runs, another library)
        return fns, {"loop": check_values(values, loops(cfg, params, *tokens), "the loop of single interventions")}
    with torch.no_grad():
        logits = (bridge(tokens[0]) - forward_with_activations(params, tokens[0], cfg)[0]).abs().max().item()
    if logits > TOL:
        raise AssertionError(f"TransformerLens' logits differ from ours by {logits:.3g} (expected <= {TOL:g})")
    tl = theirs(bridge, *tokens)
    theirs_values = {task: fn().to(values[ABLATION].dtype) for task, fn in tl.items()}
    reference = {task: theirs_values[TL_TASK[task]] for task in EXACT}
    base = logit_diff(forward_with_activations(params, tokens[1], cfg)[0])
    diffs = {
        "transformer_lens": {"logits": logits, **check_values(values, reference, "TransformerLens")},
        "atp_vs_exact": atp_report(reference[HEAD_OUT] - base, values[ATP].detach(), top=3),
    }
    fns.update({key("tl", task): fn for task, fn in tl.items()})
    return fns, diffs


def run(args) -> int:
    with warnings.catch_warnings(), num_threads(args.threads) as threads, tempfile.TemporaryDirectory() as directory:
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        hf_model = _hf_model(args, directory)
        cfg, params = load_hf(directory)
        bridge, why = (None, "--no-tl") if args.no_tl else transformer_lens_model(directory, hf_model)
        tokens = _tokens(args, cfg.vocab_size)
        fns, diffs = _fns(cfg, params, tokens, bridge)
        times, _ = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=torch.device("cpu"), unit=1e3)
    table = rows(times, args.size)
    layers, width, heads, _ = SIZES[args.size]
    setup = (f"{args.size}: {layers} layers x {width}, {heads} heads, vocab {cfg.vocab_size}; batch {args.batch_size} x "
             f"{args.seq_len}; {threads} threads; {machine()}; {args.repeats} interleaved repetitions, medians")
    if args.json:
        print(json.dumps({"setup": setup, "rows": table, "checks": diffs, "tl_skipped": why}))
        return 0
    print(setup)
    checks = "; ".join(f"vs {who}: " + ", ".join(f"{k} {v:.2g}" for k, v in d.items())
                       for who, d in diffs.items() if isinstance(d, dict))
    print(f"values equal first (largest differences): {checks}\n")
    print(format_rows(table, why))
    print("\nTL/ours: TransformerLens' median time over ours; attribution: AtP vs TL's exact head patching.")
    if "atp_vs_exact" in diffs:
        print(f"AtP vs exact head patching: {diffs['atp_vs_exact'].splitlines()[0]}")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m ftransformer.bench.interp", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
