"""``ftransformer bench train``: one training step of the functional model against a plain ``torch.nn`` GPT.

The baseline is the GPT everyone writes first (nanoGPT's shape): ``nn.Embedding``, ``nn.Linear``,
``nn.LayerNorm``, ``F.scaled_dot_product_attention``, tied embeddings, trained with
``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW`` (torch's default implementation
for the device). It starts from a copy of the functional model's parameters, both use the same
recipe (AdamW, betas (0.9, 0.99), weight decay 0.1 on matrices, clipping at 1.0, warm-up + cosine
learning rate) and see the same batches. The steps alternate in one process -- warm-up first, then
interleaved repetitions -- so drifting machine load hits both alike; medians are reported.
"""

import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftransformer import optim
from ftransformer.config import PRESETS, Config, get_preset
from ftransformer.model import loss_fn
from ftransformer.params import init_params
from ftransformer.train import make_train_step

DEFAULT_PRESET = "shakespeare-char-cpu"
# The preset's training recipe (nanoGPT's shakespeare_char): the step being timed is the real one.
LR, WARMUP, TOTAL, FINAL_LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, 100, 2000, 1e-4, (0.9, 0.99), 0.1, 1.0
TARGETS = {"functional (eager)": 1.10, "functional (compiled)": 0.90}


# ---------------------------------------------------------------- the torch.nn baseline


class _Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))


class _Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.gelu(self.fc(self.ln2(x))))


class NNGPT(nn.Module):
    """A plain ``torch.nn`` GPT (pre-LN, learned positions, tied embeddings) of ``cfg``'s sizes."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, tokens, targets):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.tokens.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def check_supported(cfg: Config) -> None:
    """The baseline covers the GPT-2 family's architecture; anything else raises ``ValueError``."""
    wanted = dict(positional="learned", norm="layernorm", norm_position="pre", tie_embeddings=True)
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"bench train's torch.nn baseline needs {name}={value!r}, got {getattr(cfg, name)!r}")
    if cfg.activation not in ("gelu", "gelu_tanh"):
        raise ValueError(
            f"bench train's torch.nn baseline needs activation 'gelu' or 'gelu_tanh', got {cfg.activation!r}"
        )
    if cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(
            f"bench train's torch.nn baseline needs n_kv_heads == n_heads, got {cfg.n_kv_heads} != {cfg.n_heads}"
        )


def nn_from_params(params: dict, cfg: Config) -> NNGPT:
    """An ``NNGPT`` holding copies of ``params`` (our ``[d_in, d_out]`` weights become ``nn.Linear``'s transpose)."""
    model = NNGPT(cfg)

    def put(param: nn.Parameter, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise ValueError(f"torch.nn parameter has shape {tuple(param.shape)} but the copy has {tuple(value.shape)}")
        param.data.copy_(value)

    def put_norm(ln: nn.LayerNorm, p: dict) -> None:
        put(ln.weight, p["scale"])
        if cfg.bias:
            put(ln.bias, p["bias"])

    def put_linear(lin: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
        put(lin.weight, w.t())
        if b is not None:
            put(lin.bias, b)

    with torch.no_grad():
        put(model.tokens.weight, params["embed"]["tokens"])
        put(model.positions.weight, params["embed"]["positions"])
        for blk, p in zip(model.blocks, params["blocks"]):
            put_norm(blk.ln1, p["ln1"])
            put_norm(blk.ln2, p["ln2"])
            put_linear(blk.attn.qkv, p["attn"]["w_qkv"], p["attn"].get("b_qkv"))
            put_linear(blk.attn.proj, p["attn"]["w_o"], p["attn"].get("b_o"))
            put_linear(blk.fc, p["mlp"]["w_in"], p["mlp"].get("b_in"))
            put_linear(blk.out, p["mlp"]["w_out"], p["mlp"].get("b_out"))
        put_norm(model.ln_f, params["ln_f"])
    return model


# ---------------------------------------------------------------- contenders


def _schedule():
    return optim.warmup_cosine(LR, WARMUP, TOTAL, FINAL_LR)


def make_nn_step(model: NNGPT):
    """The classic imperative step: backward, clip, set lr, AdamW, zero the gradients."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    schedule = _schedule()
    lrs = [schedule(i) for i in range(TOTAL + 1)]  # looked up, so the timed step pays nothing for it
    count = 0

    def step(batch):
        nonlocal count
        tokens, targets = batch
        loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for group in opt.param_groups:
            group["lr"] = lrs[min(count, TOTAL)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        count += 1
        return loss

    return step


def make_functional_step(params: dict, cfg: Config, *, compile: bool, all_reduce=None):
    """The library's pure step, holding its own params and optimizer state between calls.

    ``all_reduce`` is ``make_train_step``'s hook for data parallelism (``bench train --nproc``).
    """
    opt = optim.chain(
        optim.clip_by_global_norm(CLIP), optim.adamw(_schedule(), betas=BETAS, weight_decay=WEIGHT_DECAY)
    )
    train_step = make_train_step(cfg, opt, compile=compile, all_reduce=all_reduce)
    state = {"params": params, "opt": opt.init(params)}

    def step(batch):
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], batch, None)
        return metrics["loss"]

    step.state = state  # the trained params, for callers that score them afterwards (bench quality)
    return step


# ---------------------------------------------------------------- running and reporting


def random_batches(cfg: Config, rows: int, seq: int, *, seed: int, device: torch.device, count: int = 8) -> list:
    """``count`` batches of uniformly random ``(tokens, targets)``, ``rows x seq`` each (the step's cost
    does not depend on the ids)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        data = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen)
        batches.append((data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)))
    return batches


def check_same_model(params: dict, model: nn.Module, cfg: Config, batch) -> tuple[float, float]:
    """Both losses on ``batch``; ``RuntimeError`` unless they agree (the two must be the same model)."""
    with torch.no_grad():
        ours = float(loss_fn(params, *batch, cfg))
        theirs = float(model(*batch))
    if not math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-5):
        raise RuntimeError(f"the baseline disagrees with the functional model: loss {theirs} vs {ours}")
    return ours, theirs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_steps(
    steps: dict, batches: list, *, repeats: int, warmup: int, device: torch.device, clock=time.perf_counter
) -> dict:
    """Milliseconds per call of each step, interleaved: every repetition runs each contender once."""
    for i in range(warmup):
        for step in steps.values():
            step(batches[i % len(batches)])
    _sync(device)
    times = {name: [] for name in steps}
    for i in range(repeats):
        batch = batches[i % len(batches)]
        for name, step in steps.items():
            _sync(device)
            start = clock()
            step(batch)
            _sync(device)
            times[name].append((clock() - start) * 1e3)
    return times


def format_table(times: dict, tokens_per_step: int, baseline: str) -> str:
    """Median and min ms/step, tokens/s and the ratio to ``baseline`` for every contender."""
    base = statistics.median(times[baseline])
    width = max(len(n) for n in times) + 2
    lines = [f"{'step':<{width}}{'median ms':>10}{'min ms':>9}{'tokens/s':>11}{'vs torch.nn':>13}{'target':>8}"]
    lines.append("-" * len(lines[0]))
    for name, ts in times.items():
        med = statistics.median(ts)
        target = f"<={TARGETS[name]:.2f}x" if name in TARGETS else ""
        lines.append(
            f"{name:<{width}}{med:>10.2f}{min(ts):>9.2f}{tokens_per_step / med * 1e3:>11,.0f}"
            f"{med / base:>12.2f}x{target:>8}"
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model sizes to time (default: {DEFAULT_PRESET}); dropout is set to 0")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per contender (default: 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first (default: 5)")
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per step (default: 12)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the functional step under torch.compile (the first call compiles: a minute)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a busy "
                        "machine when run with --threads 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and batches (default: 0)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's top operators for each contender")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="data-parallel scaling instead: time 1 and then N torchrun processes (each its own "
                        "--batch-size rows, --threads default 1), the functional step against DDP; "
                        "see ftransformer.bench.scaling")


def _profile(steps: dict, batches: list) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[:5]:
                step(batch)
        print(f"\nprofile of {name} (5 steps):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def run(args) -> int:
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    cfg = get_preset(args.preset).replace(dropout=0.0)
    check_supported(cfg)
    seq = cfg.max_seq_len if args.seq_len is None else args.seq_len
    if not 1 <= seq <= cfg.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, max_seq_len={cfg.max_seq_len}], got {seq}")
    if args.nproc is not None:
        if args.nproc < 2:
            raise ValueError(f"--nproc must be >= 2 (it compares N processes with one), got {args.nproc}")
        if args.profile:
            raise ValueError("--profile times one process; it does not combine with --nproc")
        from ftransformer.bench import scaling  # here, not at the top: scaling builds on this module

        scaling.run(args, seq)
        return 0
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        _run(args, cfg, seq)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(args, cfg: Config, seq: int) -> None:
    device = torch.device(args.device)
    params = init_params(cfg, seed=args.seed, device=device)
    model = nn_from_params(params, cfg).to(device)
    batches = random_batches(cfg, args.batch_size, seq, seed=args.seed, device=device)
    ours, theirs = check_same_model(params, model, cfg, batches[0])

    steps = {
        "torch.nn + AdamW": make_nn_step(model),
        "functional (eager)": make_functional_step(params, cfg, compile=False),
    }
    if args.compile:
        steps["functional (compiled)"] = make_functional_step(params, cfg, compile=True)
        # Compile before the warm-up, so the first timed repetitions do not wait on inductor.
        start = time.perf_counter()
        steps["functional (compiled)"](batches[0])
        print(f"compiled the functional step in {time.perf_counter() - start:.1f} s")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_steps(steps, batches, repeats=args.steps, warmup=args.warmup, device=device, clock=clock)
    tokens = args.batch_size * seq
    print(
        f"bench train: preset {args.preset}, batch {args.batch_size} x {seq} tokens, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} interleaved steps "
        f"after {args.warmup} warm-up, {args.clock} clock"
    )
    print(f"initial loss: functional {ours:.6f}, torch.nn {theirs:.6f}")
    print(format_table(times, tokens, "torch.nn + AdamW"))
    if args.profile:
        _profile(steps, batches)
