"""``ftransformer bench influence``: EK-FAC influence (``attribution.ekfac``) against kronfluence on the same model.

kronfluence tracks ``nn.Linear`` modules only (GPT-2's ``Conv1D`` is not one), so the shared model is a tiny
random Llama (``transformers.LlamaForCausalLM``, every projection an ``nn.Linear``) written with
``save_pretrained`` and read into our parameters by ``ft.load_hf`` (transformers' logits exactly; the bench
prints the difference). Both sides fit EK-FAC factors of every projection (q, k, v, o, gate, up, down: our fused
``w_qkv`` split into its q/k/v blocks, kronfluence's modules) over the same training sequences with the
empirical Fisher (the data's targets: sampled labels would differ between the two by chance alone), then score
the same queries against every training sequence with the same damping. Reported: the correlation of the
corrected eigenvalues (each block's, sorted, all blocks together) and of the pairwise scores; the fit and
scoring times; the peak memory. kronfluence is optional (``pip install 'ftransformer[bench]'``): without it the
bench prints why and reports ours alone.

Times are CPU seconds of this process (``time.process_time``) with ``--clock cpu`` (the default: robust on a
shared machine), wall seconds with ``--clock wall``; peak memory on CUDA is ``torch.cuda.max_memory_allocated``
above the start, on a CPU the rise of the peak RSS (``/proc`` VmHWM) over the post-setup peak, each side run again
alone in a fresh process (``--only``; ``--no-memory`` skips it).
"""

import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ftransformer import tree
from ftransformer.attribution import ekfac
from ftransformer.bench.timing import num_threads, sync
from ftransformer.bench.vmap import peak_rss_mib
from ftransformer.model import forward

# our block name (after "blocks.{i}.") -> kronfluence's module name (after "model.layers.{i}.")
MODULES = {"attn.w_qkv.q": "self_attn.q_proj", "attn.w_qkv.k": "self_attn.k_proj", "attn.w_qkv.v": "self_attn.v_proj",
           "attn.w_o": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_in": "mlp.up_proj",
           "mlp.w_out": "mlp.down_proj"}
GOAL_CORRELATION = 0.99


def kronfluence_missing() -> str | None:
    """Why the kronfluence rows cannot run here, or None."""
    try:
        import kronfluence  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} not installed (pip install 'ftransformer[bench]')"
    return None


def tiny_llama(directory: Path, *, vocab: int, d_model: int, layers: int, seed: int):
    """A random ``LlamaForCausalLM`` (float32, eager attention) saved at ``directory``; ours loaded from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftransformer.interop.hf import load_hf

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(directory)
    cfg, params = load_hf(directory)
    return model, cfg, params


def data(vocab: int, n: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences and their next tokens."""
    ids = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _batches(tokens, targets, size):
    return [(tokens[i:i + size], targets[i:i + size]) for i in range(0, len(tokens), size)]


def _kronfluence_task(layers: int):
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            logits = logits.reshape(-1, logits.shape[-1])
            labels = batch["labels"].reshape(-1)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return [f"model.layers.{i}.{m}" for i in range(layers) for m in MODULES.values()]

        def get_attention_mask(self, batch):
            return None

    return LMTask()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokens, targets):
        self.tokens, self.targets = tokens, targets

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.targets[i]}


def _measured(fn, device, clock):
    """``fn()``'s result, its seconds on ``clock`` and its peak memory (MiB) above the start."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_rss_mib()
    start = clock()
    out = fn()
    sync(device)
    seconds = clock() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else peak_rss_mib() - base
    return out, seconds, max(peak, 0.0)


def run_ours(cfg, params, train, queries, args, device, clock) -> dict:
    """Our factors and scores, with times and peak memory."""
    batches = _batches(*train, args.batch_size)
    factors, fit_s, fit_mib = _measured(lambda: ekfac.fit_factors(params, cfg, batches, fisher="empirical",
                                                                  progress=False), device, clock)
    scores, score_s, score_mib = _measured(lambda: ekfac.pairwise_scores(
        params, cfg, factors, queries, batches, damping=args.damping, progress=False), device, clock)
    lambdas = {name: f.lambdas for name, f in factors.factors.items()}
    return dict(lambdas=lambdas, scores=scores, fit_s=fit_s, score_s=score_s, peak_mib=max(fit_mib, score_mib))


def run_kronfluence(model, train, queries, args, device, clock, workdir: Path) -> dict:
    """kronfluence's EK-FAC factors and scores on ``model``, with times and peak memory."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    layers = model.config.num_hidden_layers
    task = _kronfluence_task(layers)
    model = prepare_model(model.to(device), task)
    analyzer = Analyzer("bench", model, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=str(workdir))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=args.damping)
    train_rows, query_rows = _Rows(*(t.to(device) for t in train)), _Rows(*(t.to(device) for t in queries))

    def fit():
        analyzer.fit_all_factors("f", train_rows, per_device_batch_size=args.batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)

    def score():
        analyzer.compute_pairwise_scores("s", "f", query_rows, train_rows, per_device_query_batch_size=len(query_rows),
                                         per_device_train_batch_size=args.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("s")["all_modules"]

    with warnings.catch_warnings():  # kronfluence 1.0.1 builds a deprecated torch.cuda.amp.GradScaler per call
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
        _, fit_s, fit_mib = _measured(fit, device, clock)
        scores, score_s, score_mib = _measured(score, device, clock)
    lambdas = analyzer.load_all_factors("f")["lambda_matrix"]
    ours_names = {f"model.layers.{i}.{m}": f"blocks.{i}.{o}" for i in range(layers) for o, m in MODULES.items()}
    return dict(lambdas={ours_names[k]: v.T for k, v in lambdas.items()}, scores=scores, fit_s=fit_s,
                score_s=score_s, peak_mib=max(fit_mib, score_mib))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' values (flattened, in float64)."""
    return float(torch.corrcoef(torch.stack([a.reshape(-1).double(), b.reshape(-1).double()]))[0, 1])


def compare(ours: dict, theirs: dict) -> dict:
    """Eigenvalue (sorted per block, all blocks together) and score correlations of the two results."""
    names = sorted(ours["lambdas"])
    sort = lambda d: torch.cat([d[n].reshape(-1).double().sort().values for n in names])  # noqa: E731
    return {"eigenvalues": correlation(sort(ours["lambdas"]), sort(theirs["lambdas"])),
            "scores": correlation(ours["scores"].cpu(), theirs["scores"].cpu())}


def format_table(rows: dict, corr: dict | None, missing: str | None) -> str:
    head = f"{'influence (EK-FAC)':<34}{'fit s':>9}{'score s':>9}{'peak MiB':>10}{'eig corr':>10}{'score corr':>12}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        ec = sc = ""
        if corr is not None and name != "ftransformer":
            ec, sc = f"{corr['eigenvalues']:.6f}", f"{corr['scores']:.6f}"
        mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{name:<34}{r['fit_s']:>9.2f}{r['score_s']:>9.2f}{mem:>10}{ec:>10}{sc:>12}")
    if missing:
        lines.append(f"{'kronfluence':<34}skipped: {missing}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--train", type=int, default=256, help="training sequences (default: 256)")
    parser.add_argument("--queries", type=int, default=16, help="query sequences (default: 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="training sequences per batch (default: 32)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary of the tiny Llama (default: 512)")
    parser.add_argument("--d-model", type=int, default=64, help="width of the tiny Llama (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the tiny Llama (default: 2)")
    parser.add_argument("--damping", type=float, default=1e-3, help="damping, the same for both (default: 1e-3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU seconds (default); wall: elapsed seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory column on CPU (it reruns each side in a fresh process)")
    parser.add_argument("--only", choices=("ftransformer", "kronfluence"), default=None,
                        help="run one side alone and print its peak RSS as JSON (what the CPU memory column runs)")


def run(args) -> int:
    for name in ("train", "queries", "seq_len", "batch_size", "vocab", "d_model", "layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    missing = kronfluence_missing()
    if missing and missing.startswith("transformers"):
        print(f"bench influence: skipped, the shared Llama needs transformers: {missing}")
        return 0
    with num_threads(args.threads) as threads, tempfile.TemporaryDirectory() as tmp:
        return _run(args, threads, missing, Path(tmp))


def _run(args, threads: int, missing: str | None, tmp: Path) -> int:
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, cfg, params = tiny_llama(tmp / "llama", vocab=args.vocab, d_model=args.d_model, layers=args.layers,
                                    seed=args.seed)
    params = tree.to(params, device=device)
    train = data(args.vocab, args.train, args.seq_len, args.seed + 1)
    queries = data(args.vocab, args.queries, args.seq_len, args.seed + 2)
    with torch.no_grad():
        diff = (forward(params, train[0][:2].to(device), cfg) - model.to(device)(train[0][:2].to(device)).logits).abs().max()
    train, queries = tuple(t.to(device) for t in train), tuple(t.to(device) for t in queries)
    sides = {"ftransformer": lambda: run_ours(cfg, params, train, queries, args, device, clock),
             "kronfluence": lambda: run_kronfluence(model, train, queries, args, device, clock, tmp / "kronfluence")}
    if args.only is not None:  # a fresh process measuring one side's peak RSS for the parent (CPU memory)
        base = peak_rss_mib()
        sides[args.only]()
        print(json.dumps({"peak_mib": max(peak_rss_mib() - base, 0.0)}))
        return 0
    print(f"bench influence: tiny Llama ({args.layers} blocks, d_model {args.d_model}, vocab {args.vocab}, GQA 4/2), "
          f"{args.train} training and {args.queries} query sequences of {args.seq_len} tokens, batch {args.batch_size}, "
          f"damping {args.damping:g}, empirical Fisher, device {device}, {threads} threads, {args.clock} clock, "
          f"torch {torch.__version__}; our logits vs transformers' max |diff| {float(diff):.1e}")
    rows = {"ftransformer": sides["ftransformer"]()}
    corr = None
    if not missing:
        import kronfluence

        rows[f"kronfluence {kronfluence.__version__}"] = theirs = sides["kronfluence"]()
        corr = compare(rows["ftransformer"], theirs)
    if device.type == "cpu":
        for row, side in zip(rows.values(), sides):
            row["peak_mib"] = None if args.no_memory else _peak_in_fresh_process(args, side)
    print(format_table(rows, corr, missing))
    print(f"\ncorrelations: Pearson, against ours (goal >= {GOAL_CORRELATION}); eigenvalues: each block's corrected "
          "eigenvalues sorted, all blocks together; peak MiB: "
          + ("torch.cuda.max_memory_allocated above the start of each step" if device.type == "cuda"
             else "peak RSS (/proc VmHWM) above the post-setup peak, each side in a fresh process"))
    return 0


def _peak_in_fresh_process(args, side: str) -> float | None:
    """One side's peak RSS rise (MiB), measured by this bench run again with ``--only side`` in a new process."""
    argv = [sys.executable, "-m", "ftransformer", "bench", "influence", "--only", side]
    for name in ("train", "queries", "seq_len", "batch_size", "vocab", "d_model", "layers", "damping", "device",
                 "threads", "clock", "seed"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"(memory of {side} not measured: {r.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]
