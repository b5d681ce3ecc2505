"""``ftransformer bench generate``: greedy generation with the KV-cache against recomputing the prefix
and against Hugging Face ``transformers``.

Contenders, all greedy from the same prompt, producing exactly ``--new-tokens`` tokens:

* **KV-cache (eager)**: ``ftransformer.generation`` -- prefill once, then one-token decode steps;
* **KV-cache (compiled)** with ``--compile``: the same, its decode step's block under ``torch.compile`` (one
  graph for every layer);
* **KV-cache (compiled, whole graph)** with ``--whole-graph``: the whole decode step as one ``torch.compile``
  graph (``decode_steps.whole_graph_step``: what ``--compile`` ran before; its build grows with depth);
* **KV-cache (AOTInductor)** with ``--aot``: the same, its decode step compiled ahead of time
  (``step="aot"``, ``ftransformer.aot``), called with no dynamo in between;
* **int8 (eager)** / **int8 (compiled)** with ``--int8``: the same on ``quantize(params, cfg, "int8")``
  (weight-only int8, per-channel scales); its tokens may differ from fp32 where the logits nearly tie;
* **no cache**: ``forward`` over the whole sequence so far for every new token (the slow, obvious loop);
* **transformers**: ``GPT2LMHeadModel.generate(use_cache=True)`` on the equivalent ``GPT2Config`` (for another
  architecture, e.g. ``--preset smollm2-135m``, the family's model: ``LlamaForCausalLM``), holding the same
  (random) weights, so all contenders should produce the same tokens.

``--preset`` takes the library's presets and ``SHAPES``: real models' sizes with random weights
(``smollm2-135m``: SmolLM2-135M's Llama shape). Set ``TORCHINDUCTOR_CACHE_DIR`` to an empty folder to time
cold builds (inductor keeps compiled code on disk between runs).

Repetitions are interleaved (each repetition runs every contender once) so drifting machine load hits
all alike; medians are reported. Ops per token count the aten operators one generation dispatches,
divided by the tokens it produced: at batch 1 a decode step is bound by per-op overhead, not arithmetic.
The floor is the time of the fp32 weight products of one decode step alone, timed in the same
interleaved repetitions as the contenders; each contender's "of floor" is the floor's tokens/s share
it reaches (an int8 model reads fewer bytes, so it may pass 100%).
"""

import collections
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftransformer import aot
from ftransformer.bench import torchao_ref
from ftransformer.bench.timing import interleaved, medians, num_threads
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.decode_steps import clear_compiled, untie_for_decoding, whole_graph_step
from ftransformer.generation import generate
from ftransformer.interop.families import config_from_hf
from ftransformer.layers.int8 import product
from ftransformer.model import forward
from ftransformer.params import init_params
from ftransformer.quantization import quantize
from ftransformer.sampling import GREEDY

DEFAULT_PRESET = "seed"
CACHE, COMPILED, NO_CACHE, HF = "KV-cache (eager)", "KV-cache (compiled)", "no cache (forward)", "transformers"
INT8, INT8_COMPILED = "int8 (eager)", "int8 (compiled)"
WHOLE = "KV-cache (compiled, whole graph)"  # decode_steps.whole_graph_step: one graph for the whole step
AOT = "KV-cache (AOTInductor)"  # generate(step="aot"): torch.export + AOTInductor
HF_TORCHAO = "transformers + torchao int8"  # bench.torchao_ref.hf_int8: torchao's int8 weight-only
FLOOR = "floor (weight products alone)"
# Targets (tokens/s ratios) from the issue: the cache path against recomputing and against transformers.
TARGETS = {NO_CACHE: 5.0, HF: 3.0}
INT8_TARGET = 1.6  # int8 weight-only decode against the fp32 decode of the same kind (eager/compiled)
# Real models' shapes, random weights (``--preset``): SmolLM2-135M(-Instruct) is Llama with GQA and tied embeddings.
SHAPES = {
    "smollm2-135m": config_from_hf(dict(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192), "llama"),
}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (views included: each costs a dispatch)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------- contenders


def no_cache_generate(params: dict, prompt: torch.Tensor, cfg: Config, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: every step runs ``forward`` over the whole sequence so far."""
    tokens = prompt
    for _ in range(new_tokens):
        nxt = forward(params, tokens, cfg)[..., -1, :].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=-1)
    return tokens


def hf_model(params: dict, cfg: Config):
    """The ``transformers`` model of ``cfg`` (``GPT2LMHeadModel`` where GPT-2 expresses it, else its family's,
    e.g. ``LlamaForCausalLM``) holding a copy of ``params``, or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    from ftransformer.interop import gpt2

    transformers.logging.set_verbosity_error()  # its generation-config notices are not results
    if not gpt2.expresses(cfg):
        return _hf_family_model(transformers, params, cfg)
    from ftransformer.interop.hf_gpt2 import config_to_hf, to_hf_gpt2

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg)))
    model.load_state_dict({k: v.detach().clone() for k, v in to_hf_gpt2(params, cfg).items()}, strict=False)
    model.tie_weights()
    return model.eval().to(params["embed"]["tokens"].device)


def _hf_family_model(transformers, params: dict, cfg: Config):
    """``cfg``'s family's ``transformers`` model (``interop.registry``) holding a copy of ``params``."""
    from ftransformer.interop.hf import hf_state_dict
    from ftransformer.interop.registry import family_for

    hf = dict(family_for(cfg).config_json(cfg))
    hf.pop("architectures")
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    model.load_state_dict({k: v.detach().clone() for k, v in hf_state_dict(params, cfg).items()}, strict=False)
    model.tie_weights()
    return model.eval().to(params["embed"]["tokens"].device)


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` as a user calls it (it runs under its own ``torch.no_grad``), fixed length."""
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
    )


def contenders(
    params: dict, cfg: Config, prompt: torch.Tensor, new_tokens: int, *, compiled: bool, hf=None, int8=None,
    hf_int8=None, aot: bool = False, whole_graph: bool = False, recompute: bool = True,
) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function producing ``prompt`` + ``new_tokens`` greedy tokens (``hf``: a model from ``hf_model``;
    ``int8``: the quantized params; ``hf_int8``: a transformers model quantized by torchao; ``aot``: add
    the decode step compiled ahead of time; ``whole_graph``: add the step compiled as one graph;
    ``recompute``: add the loop without a cache)."""
    def cached(p, step="eager"):
        return lambda: generate(p, prompt, cfg, max_new_tokens=new_tokens, sampling=GREEDY, step=step)

    fns = {CACHE: cached(params)}
    if compiled:
        fns[COMPILED] = cached(params, step="compile")
    if whole_graph:
        fns[WHOLE] = cached(params, step=whole_graph_step())
    if aot:
        fns[AOT] = cached(params, step="aot")
    if int8 is not None:
        fns[INT8] = cached(int8)
        if compiled:
            fns[INT8_COMPILED] = cached(int8, step="compile")
    if recompute:
        fns[NO_CACHE] = lambda: no_cache_generate(params, prompt, cfg, new_tokens)
    if hf is not None:
        fns[HF] = lambda: hf_generate(hf, prompt, new_tokens)
    if hf_int8 is not None:
        fns[HF_TORCHAO] = lambda: hf_generate(hf_int8, prompt, new_tokens)
    return fns


# ---------------------------------------------------------------- timing and reporting


def ops_per_token(fn: Callable[[], torch.Tensor], new_tokens: int) -> float:
    with OpCounter() as counter:
        fn()
    return counter.total / new_tokens


def agreement(outputs: dict, reference: str) -> list[str]:
    """One line per contender whose tokens differ from ``reference``'s (greedy from equal weights)."""
    lines = []
    ref = outputs[reference]
    for name, out in outputs.items():
        out = out.to(ref.device)
        if out.shape != ref.shape:
            lines.append(f"{name}: produced shape {tuple(out.shape)}, {reference} {tuple(ref.shape)}")
        elif not torch.equal(out, ref):
            first = int((out != ref).nonzero()[0, -1])
            lines.append(f"{name}: tokens differ from {reference}'s from position {first} on (float rounding "
                         "can flip a near-tie in the argmax)")
    return lines


def floor_products(params: dict, cfg: Config, batch: int) -> Callable[[], torch.Tensor]:
    """One decode step's weight products alone (random inputs of the right shapes): their time is a
    bound no implementation beats.

    At batch 1 each weight matrix is read once per token for a matrix-vector product, so on a CPU this is
    mostly memory traffic: every contender pays it, and what is left of a step is per-op overhead. The
    matrices are read in the layout the decode step reads (the untied ``[d_model, vocab]`` unembedding).
    """
    params, cfg = untie_for_decoding(params, cfg)
    device = params["embed"]["tokens"].device
    x = torch.randn(batch, cfg.d_model, device=device)
    h = torch.randn(batch, cfg.d_ff, device=device)

    def products():
        for blk in params["blocks"]:
            x @ blk["attn"]["w_qkv"]
            x @ blk["attn"]["w_o"]
            for name in ("w_in", "w_gate"):
                if name in blk["mlp"]:
                    x @ blk["mlp"][name]
            h @ blk["mlp"]["w_out"]
        return x @ params["unembed"]["w"]

    return products


def format_table(times: dict, ops: dict, new_tokens: int, *, floor_tokens_per_s: float | None = None) -> str:
    """Median ms/token and tokens/s, the best repetition's tokens/s, ops per token, the share of the
    floor's tokens/s (when given), and the cache path's speed-up over each baseline (ratio of medians)
    against its target."""
    med = medians(times)
    width = max(len(n) for n in times) + 2
    header = f"{'contender':<{width}}{'ms/token':>10}{'tokens/s':>11}{'best tok/s':>12}{'ops/token':>11}"
    if floor_tokens_per_s is not None:
        header += f"{'of floor':>10}"
    lines = [header, "-" * len(header)]
    for name, ts in times.items():
        op = f"{ops[name]:,.0f}" if name in ops else "n/a"
        line = (
            f"{name:<{width}}{med[name] / new_tokens * 1e3:>10.2f}{new_tokens / med[name]:>11,.0f}"
            f"{new_tokens / min(ts):>12,.0f}{op:>11}"
        )
        if floor_tokens_per_s is not None:
            line += f"{new_tokens / med[name] / floor_tokens_per_s:>10.0%}"
        lines.append(line)
    lines.append("")
    for fast in (CACHE, COMPILED, WHOLE, AOT):
        if fast not in med:
            continue
        for slow, target in TARGETS.items():
            if slow in med:
                ratio = med[slow] / med[fast]
                verdict = "meets" if ratio >= target else "misses"
                lines.append(f"{fast} vs {slow}: {ratio:.2f}x tokens/s ({verdict} the >= {target:g}x target)")
    for q, f in ((INT8, CACHE), (INT8_COMPILED, COMPILED)):
        if q in med and f in med:
            ratio = med[f] / med[q]
            verdict = "meets" if ratio >= INT8_TARGET else "misses"
            lines.append(f"{q} vs {f}: {ratio:.2f}x tokens/s ({verdict} the >= {INT8_TARGET:g}x target)")
        if q in med and HF_TORCHAO in med:
            lines.append(f"{q} vs {HF_TORCHAO}: {med[HF_TORCHAO] / med[q]:.2f}x tokens/s")
    for other in (WHOLE, AOT):
        if other in med and COMPILED in med:
            lines.append(f"{COMPILED} vs {other}: {med[other] / med[COMPILED]:.2f}x tokens/s")
    return "\n".join(lines)


def profile_decode_step(params: dict, cfg: Config, prompt: torch.Tensor, new_tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    generate(params, prompt, cfg, max_new_tokens=8, sampling=GREEDY)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(params, prompt, cfg, max_new_tokens=new_tokens, sampling=GREEDY)
    print(f"\nprofile of {CACHE} ({new_tokens} tokens):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS) + sorted(SHAPES),
                        help=f"model sizes (default: {DEFAULT_PRESET}; {', '.join(SHAPES)}: a real model's shape, "
                        "random weights); dropout is irrelevant at inference")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts generated together (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per contender (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations per contender first (default: 1)")
    parser.add_argument("--compile", action="store_true", help="also time the cache path with a compiled decode step")
    parser.add_argument("--aot", action="store_true",
                        help="also time the decode step exported and compiled ahead of time by AOTInductor "
                        "(float params; ~15-40 s to build)")
    parser.add_argument("--whole-graph", action="store_true",
                        help="also time the decode step compiled as one graph (the old --compile; minutes to build "
                        "for a deep model)")
    parser.add_argument("--no-recompute", action="store_true",
                        help="leave out the loop without a cache (slow for a real-size model)")
    parser.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face transformers baseline")
    parser.add_argument("--int8", action="store_true",
                        help="also time the model quantized to int8 weights (compiled too with --compile)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a busy "
                        "machine when run with --threads 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the prompt (default: 0)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the cache path")


def run(args) -> int:
    for name in ("batch_size", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    with num_threads(args.threads):
        return _measure(args)


def _measure(args) -> int:
    cfg = (SHAPES[args.preset] if args.preset in SHAPES else get_preset(args.preset)).replace(dropout=0.0)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the preset's "
            f"max_seq_len={cfg.max_seq_len}"
        )
    device = torch.device(args.device)
    params = init_params(cfg, seed=args.seed, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=gen).to(device)

    hf = None
    if not args.no_hf:
        try:
            hf = hf_model(params, cfg)
        except ValueError as e:  # a config GPT-2 cannot express
            print(f"the Hugging Face baseline is skipped: {e}")
        else:
            if hf is None:
                print("transformers is not installed: the Hugging Face baseline is skipped (pip install transformers)")
    int8 = quantize(params, cfg, "int8") if args.int8 else None
    hf_int8 = None
    if args.int8 and hf is not None:
        if torchao_ref.available():
            hf_int8 = torchao_ref.hf_int8(hf_model(params, cfg))
        else:
            print(f"{HF_TORCHAO}: {torchao_ref.SKIPPED}")
    fns = contenders(params, cfg, prompt, args.new_tokens, compiled=args.compile, hf=hf, int8=int8, hf_int8=hf_int8,
                     aot=args.aot, whole_graph=args.whole_graph, recompute=not args.no_recompute)
    clear_compiled()  # the compile times printed are fresh compiles
    aot.clear()
    for name in (COMPILED, WHOLE, AOT, INT8_COMPILED):
        if name in fns:
            start = time.perf_counter()
            fns[name]()  # compile before timing, so no repetition waits on inductor
            print(f"compiled the decode step of {name} in {time.perf_counter() - start:.1f} s")
    # Counted on a short generation (the count per token hardly depends on the length); a compiled
    # step's kernels are not aten dispatches, so it has no count.
    count_tokens = min(args.new_tokens, 32)
    short = contenders(params, cfg, prompt, count_tokens, compiled=False, hf=hf, int8=int8, hf_int8=hf_int8,
                       recompute=not args.no_recompute)
    ops = {name: ops_per_token(fn, count_tokens * args.batch_size) for name, fn in short.items()}

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # The floor is timed as one more contender -- the products of as many decode steps as a generation
    # takes -- inside the same interleaved repetitions, so machine drift moves it with the others.
    products = floor_products(params, cfg, args.batch_size)
    timed = {**fns, FLOOR: lambda: [products() for _ in range(args.new_tokens)][-1]}
    times, outputs = interleaved(timed, repeats=args.repeats, warmup=args.warmup, device=device, clock=clock)
    outputs.pop(FLOOR)
    floor = statistics.median(times.pop(FLOOR)) / args.new_tokens
    print(
        f"bench generate: preset {args.preset}, batch {args.batch_size}, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy, device {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.repeats} interleaved repetitions after {args.warmup} warm-up, "
        f"{args.clock} clock"
    )
    print(format_table(times, ops, args.new_tokens * args.batch_size, floor_tokens_per_s=args.batch_size / floor))
    per = "ms/token" if args.batch_size == 1 else f"ms per step of {args.batch_size} tokens"
    line = (f"floor: the weight products alone take {floor * 1e3:.2f} {per} here, so no implementation "
            f"exceeds {args.batch_size / floor:,.0f} tokens/s")
    if HF in times:
        line += f" = {statistics.median(times[HF]) / args.new_tokens / floor:.2f}x transformers"
    print(line)
    reference = NO_CACHE if NO_CACHE in outputs else CACHE
    quantized = {name: outputs.pop(name) for name in (INT8, INT8_COMPILED, HF_TORCHAO) if name in outputs}
    if int8 is not None:
        print(f"int8: every block matrix and the (untied) unembedding are int8; the decode product is {product()}")
    for name, out in quantized.items():
        same = float((out[:, args.prompt_len:] == outputs[reference][:, args.prompt_len:]).float().mean())
        print(f"{name}: {same:.0%} of its greedy tokens equal the fp32 model's (random weights: near-ties are common)")
    differences = agreement(outputs, reference)
    print("all contenders produced the same tokens" if not differences else "\n".join(differences))
    if args.profile:
        profile_decode_step(params, cfg, prompt, args.new_tokens)
    return 0


__all__ = ["OpCounter", "add_arguments", "format_table", "no_cache_generate", "run"]
