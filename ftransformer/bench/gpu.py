"""``ftransformer bench gpu``: training throughput and MFU, decoding speed and peak memory, against nanoGPT-style
``torch.nn`` code in the same run.

On a CUDA device (the default when there is one) it times GPT-2 124M at sequence 1024 with the library's
GPU settings: bf16 compute with fp32 master weights (``precision.BF16``), the whole train step under
``torch.compile``, SDPA attention, TF32 for what stays fp32, multi-tensor optimizer math; decoding with
the step captured as a CUDA graph (``generate(step="compile")`` on CUDA). The baseline is nanoGPT's recipe
on the same weights and batches: ``torch.nn`` modules, ``torch.autocast`` bf16, ``torch.compile(model)``,
fused AdamW; its decoding is nanoGPT's ``generate``, the whole context through the model for every token.

MFU is model FLOPs per token (``flops_per_token``: 6N + the attention term, as in PaLM's appendix B and
nanoGPT's ``estimate_mfu``) times tokens/s over the card's dense bf16 peak (``PEAK_TFLOPS``); for a
card not in the table MFU is left out with a note. On a CPU it runs a tiny preset in a few seconds (a
check that everything runs, not a measurement worth a table).
"""

import json
import resource
import statistics
import sys
import time

import torch

from ftransformer import precision
from ftransformer import validate
from ftransformer.bench.timing import interleaved, sync
from ftransformer.bench.train_steps import (
    check_supported,
    make_functional_step,
    make_nn_step,
    nn_from_params,
    random_batches,
)
from ftransformer.checkpoint import expected_param_shapes
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.generation import generate
from ftransformer.params import init_params
from ftransformer.sampling import GREEDY

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets. Matched against
# torch.cuda.get_device_name in order: the first key whose words all appear in the name wins.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
}
OURS, NANOGPT = "functional", "torch.nn (nanoGPT)"
# What each device runs by default: CUDA the real thing, CPU a few-second check that everything runs.
DEFAULTS = {
    "cuda": dict(preset="gpt2", batch_size=12, seq_len=1024, steps=20, warmup=3, new_tokens=256, prompt_len=16),
    "cpu": dict(preset="tiny", batch_size=2, seq_len=16, steps=3, warmup=1, new_tokens=6, prompt_len=4),
}


def matmul_params(cfg: Config) -> int:
    """N of 6N: the parameters that take part in a product per token (not the position table, nor an
    untied input embedding, which are looked up)."""
    shapes = expected_param_shapes(cfg)
    skip = {"embed.positions"} | (set() if cfg.embeddings.tie else {"embed.tokens"})
    return sum(s.numel() for name, s in shapes.items() if name not in skip)


def flops_per_token(cfg: Config, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L H Q T`` (PaLM, nanoGPT's ``estimate_mfu``).

    ``6 N``: two FLOPs per weight per token forward, four backward. ``12 L H Q T``: the query-key scores
    and the weighted values, ``2 * 2 * H Q T`` per layer forward and twice that backward, counted over
    the full ``T x T`` square (as the formula does, although causal kernels skip half of it).
    """
    validate.int_at_least("seq_len", seq_len, 1)
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from ``PEAK_TFLOPS``, or None for a card the table does not know."""
    for key, value in PEAK_TFLOPS.items():
        if all(word in device_name for word in key.split()):
            return value
    return None


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda if available, else cpu with a tiny preset)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model sizes (default: gpt2 on cuda, tiny on cpu); dropout is set to 0")
    parser.add_argument("--batch-size", type=int, default=None, help="training sequences per step (default: 12 on cuda)")
    parser.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: 1024 on cuda)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per contender (default: 20 on cuda)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per contender first, compilation included (default: 3 on cuda)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens each decode run adds (default: 256 on cuda)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens of each decode run (default: 16 on cuda)")
    parser.add_argument("--decode-batches", default="1,16", help="decode batch sizes, comma-separated (default: 1,16)")
    parser.add_argument("--dtype", choices=precision.CHOICES, default="auto",
                        help="compute dtype (default auto: bf16 on a CUDA card that supports it, else fp32)")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                        help="torch.compile the train steps and decode steps (default auto: on cuda only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and batches (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def _settings(args) -> dict:
    """The run's settings: the flags, with the device's defaults where a flag was left out."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    s = {k: getattr(args, k) if getattr(args, k) is not None else v
         for k, v in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items()}
    for name in ("batch_size", "seq_len", "steps", "new_tokens", "prompt_len"):
        if s[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if s["warmup"] < 0:
        raise ValueError(f"--warmup must be >= 0, got {s['warmup']}")
    try:
        batches = [int(b) for b in args.decode_batches.split(",")]
    except ValueError:
        batches = [0]
    if not batches or min(batches) < 1:
        raise ValueError(f"--decode-batches must be comma-separated ints >= 1, got {args.decode_batches!r}")
    cfg = get_preset(s["preset"]).replace(dropout=0.0)
    check_supported(cfg)
    if s["seq_len"] > cfg.max_seq_len or s["prompt_len"] + s["new_tokens"] > cfg.max_seq_len:
        raise ValueError(f"--seq-len and --prompt-len + --new-tokens must be <= max_seq_len={cfg.max_seq_len}, got "
                         f"{s['seq_len']} and {s['prompt_len'] + s['new_tokens']}")
    compile = device.type == "cuda" if args.compile == "auto" else args.compile == "yes"
    return {**s, "device": device, "cfg": cfg, "decode_batches": batches, "compile": compile,
            "precision": precision.resolve(args.dtype, device), "seed": args.seed}


def _peak_memory_start(device: torch.device) -> int:
    """Reset CUDA's peak counter; the bytes allocated now, which ``_peak_memory_mib`` leaves out."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_memory_mib(device: torch.device, before: int) -> float:
    """CUDA: the peak allocated since ``_peak_memory_start`` above the ``before`` bytes held then (what one
    contender added); on a CPU the process's peak RSS so far (one figure for all)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _nanogpt_step(s: dict, params: dict):
    """nanoGPT's GPU training recipe on a copy of ``params``: autocast, ``torch.compile(model)``, fused AdamW."""
    policy, device = s["precision"], s["device"]
    model = nn_from_params(params, s["cfg"]).to(device)
    return make_nn_step(model, autocast=policy.compute if policy.casts else None, fused=device.type == "cuda",
                        forward=torch.compile(model) if s["compile"] else None)


def bench_train(s: dict, params: dict) -> dict:
    """Median step time, tokens/s, MFU and peak memory of each contender, interleaved on the same batches.

    Each contender is built and warmed up (compiled) alone first, so its peak memory is its own: what it
    allocated above what was held before it was built (the shared initial fp32 weights not counted).
    """
    device, cfg = s["device"], s["cfg"]
    batches = random_batches(cfg, s["batch_size"], s["seq_len"], seed=s["seed"], device=device)
    builders = {OURS: lambda: make_functional_step(params, cfg, compile=s["compile"], precision=s["precision"]),
                NANOGPT: lambda: _nanogpt_step(s, params)}
    steps, out = {}, {name: {} for name in builders}
    for name, build in builders.items():
        before = _peak_memory_start(device)
        start = time.perf_counter()
        steps[name] = step = build()
        for i in range(max(s["warmup"], 1)):
            step(batches[i % len(batches)])
        sync(device)
        out[name]["warmup_s"] = time.perf_counter() - start
        out[name]["peak_memory_mib"] = _peak_memory_mib(device, before)
    times, losses = interleaved(steps, repeats=s["steps"], warmup=0, device=device, inputs=batches)
    tokens = s["batch_size"] * s["seq_len"]
    flops, peak = flops_per_token(cfg, s["seq_len"]), s["peak_tflops"]
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name].update(step_ms=med * 1e3, tokens_per_s=tokens / med, loss=float(losses[name].detach()))
        out[name]["mfu"] = None if peak is None else flops * tokens / med / (peak * 1e12)
    return out


def _nanogpt_generate(model, prompt: torch.Tensor, new_tokens: int, autocast) -> torch.Tensor:
    """nanoGPT's ``generate``, greedy: the whole sequence so far through the model for every new token."""
    tokens = prompt
    with torch.no_grad(), torch.autocast(prompt.device.type, dtype=autocast, enabled=autocast is not None):
        for _ in range(new_tokens):
            logits = model.logits(tokens)[:, -1, :]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def _decoders(s: dict, params: dict) -> dict:
    """Each contender's greedy ``prompt -> tokens`` at the run's dtype."""
    cfg, policy, device = s["cfg"], s["precision"], s["device"]
    ours = policy.compute_params(params)  # inference needs no master weights: the compute dtype throughout
    model = nn_from_params(params, cfg).to(device).eval()
    autocast = policy.compute if policy.casts else None
    n = s["new_tokens"]
    return {
        OURS: lambda prompt: generate(ours, prompt, cfg, max_new_tokens=n, sampling=GREEDY,
                                      step="compile" if s["compile"] else "eager"),
        NANOGPT: lambda prompt: _nanogpt_generate(model, prompt, n, autocast),
    }


def _decode_one(s: dict, name: str, decode, prompt: torch.Tensor) -> dict:
    """One contender at one batch size: two warm-up calls, then the median of 3 timed ones."""
    from torch._dynamo.utils import counters

    device, batch = s["device"], prompt.shape[0]
    frames_before, skips_before = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    before = _peak_memory_start(device)
    start = time.perf_counter()
    for _ in range(2):  # warm-up: compile once per shape; CUDA graph trees record on the second call
        decode(prompt)
    sync(device)
    warmup = time.perf_counter() - start
    times, _ = interleaved({name: decode}, repeats=3, warmup=0, device=device, inputs=[prompt])
    med = statistics.median(times[name])
    return {
        "tokens_per_s": batch * s["new_tokens"] / med, "ms_per_token": med * 1e3 / s["new_tokens"],
        "warmup_s": warmup, "peak_memory_mib": _peak_memory_mib(device, before),
        "graphs_compiled": counters["stats"]["unique_graphs"] - frames_before,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
    }


def bench_decode(s: dict, params: dict) -> dict:
    """Decode tokens/s (new tokens of all rows over the whole call, prefill included) and peak memory, per
    contender and batch size; how often dynamo compiled (once per shape is right, not per token) and how
    often inductor fell back from a CUDA graph (0 is right on CUDA).

    A contender that fails is reported as ``{"error": ...}`` and the others still run: on a lent GPU one
    run must bring back every figure it can.
    """
    gen = torch.Generator().manual_seed(s["seed"])
    results = {}
    for name, decode in _decoders(s, params).items():
        for batch in s["decode_batches"]:
            prompt = torch.randint(0, s["cfg"].vocab_size, (batch, s["prompt_len"]), generator=gen).to(s["device"])
            try:
                results[f"{name}, batch {batch}"] = _decode_one(s, name, decode, prompt)
            except Exception as e:  # noqa: BLE001 -- reported in the output, not swallowed
                results[f"{name}, batch {batch}"] = {"error": f"{type(e).__name__}: {e}"}
    return results


def measure(s: dict) -> dict:
    """Everything ``bench gpu`` reports, as one JSON-ready dict."""
    device, cfg = s["device"], s["cfg"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    s["peak_tflops"] = peak_tflops(name) if device.type == "cuda" else None
    tf32 = precision.allow_tf32(device)
    params = init_params(cfg, seed=s["seed"], device=device)
    report = {
        "device": name, "torch": torch.__version__, "preset": s["preset"], "dtype": s["precision"].name,
        "compile": s["compile"], "tf32": tf32, "batch_size": s["batch_size"], "seq_len": s["seq_len"],
        "flops_per_token": flops_per_token(cfg, s["seq_len"]), "peak_tflops": s["peak_tflops"],
        "note": None if s["peak_tflops"] is not None else f"MFU omitted: no bf16 peak known for {name!r}",
    }
    start = time.perf_counter()
    report["train"] = bench_train(s, params)
    report["decode"] = bench_decode(s, params)
    report["total_s"] = time.perf_counter() - start
    return report


def format_report(r: dict) -> str:
    """The report as two tables (train, decode) under a header line."""
    lines = [f"bench gpu: {r['device']}, torch {r['torch']}, preset {r['preset']}, {r['dtype']} compute, "
             f"compile {r['compile']}, TF32 {r['tf32']}, batch {r['batch_size']} x {r['seq_len']}, "
             f"{r['flops_per_token']:,} FLOPs/token, peak {r['peak_tflops']} TFLOP/s, {r['total_s']:.0f} s"]
    if r["note"]:
        lines.append(r["note"])
    lines += ["", f"{'train':<24}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'peak MiB':>10}{'warm-up s':>11}"]
    for name, t in r["train"].items():
        mfu = "-" if t["mfu"] is None else f"{t['mfu']:.1%}"
        lines.append(f"{name:<24}{t['step_ms']:>10.1f}{t['tokens_per_s']:>12,.0f}{mfu:>8}"
                     f"{t['peak_memory_mib']:>10,.0f}{t['warmup_s']:>11.1f}")
    lines += ["", f"{'decode':<33}{'tokens/s':>10}{'ms/token':>10}{'peak MiB':>10}{'warm-up s':>11}{'graphs':>8}"
                  f"{'cg skips':>10}"]
    for name, d in r["decode"].items():
        if "error" in d:
            lines.append(f"{name:<33}failed: {d['error']}")
            continue
        lines.append(f"{name:<33}{d['tokens_per_s']:>10,.0f}{d['ms_per_token']:>10.2f}{d['peak_memory_mib']:>10,.0f}"
                     f"{d['warmup_s']:>11.1f}{d['graphs_compiled']:>8}{d['cudagraph_skips']:>10}")
    return "\n".join(lines)


def run(args) -> int:
    report = measure(_settings(args))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


__all__ = ["PEAK_TFLOPS", "add_arguments", "flops_per_token", "matmul_params", "peak_tflops", "run"]
