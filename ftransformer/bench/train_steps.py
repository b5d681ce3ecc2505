"""What the training benchmarks time: a plain ``torch.nn`` GPT holding the functional model's weights, and
one training step of each (``bench train`` in one process, ``bench train --nproc`` across processes).

The baseline is the GPT everyone writes first (nanoGPT's shape): ``nn.Embedding``, ``nn.Linear``,
``nn.LayerNorm``, ``F.scaled_dot_product_attention``, tied embeddings, trained with
``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW``. Both steps use the same recipe.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftransformer import optim
from ftransformer.config import Config, flat_path
from ftransformer.model import loss_fn
from ftransformer.train import make_train_step

# The preset's training recipe (nanoGPT's shakespeare_char): the step being timed is the real one.
LR, WARMUP, TOTAL, FINAL_LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, 100, 2000, 1e-4, (0.9, 0.99), 0.1, 1.0


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
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.bias)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.bias)
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
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.bias)

    def logits(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(pos)
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.tokens.weight)

    def forward(self, tokens, targets):
        logits = self.logits(tokens)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def check_supported(cfg: Config) -> None:
    """The baseline covers the GPT-2 family's architecture; anything else raises ``ValueError``."""
    wanted = dict(positional="learned", norm="layernorm", norm_position="pre", tie_embeddings=True)
    flat = cfg.to_flat()
    for name, value in wanted.items():
        if flat[name] != value:
            raise ValueError(f"bench train's torch.nn baseline needs {flat_path(name)}={value!r}, got {flat[name]!r}")
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


def make_nn_step(model: NNGPT, *, autocast: torch.dtype | None = None, fused: bool | None = None, forward=None):
    """The classic imperative step: backward, clip, set lr, AdamW, zero the gradients.

    nanoGPT's GPU settings are the options: ``autocast`` (e.g. bf16, under ``torch.autocast``), ``fused``
    AdamW, and ``forward`` (e.g. ``torch.compile(model)``; default: ``model``).
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=fused)
    forward = model if forward is None else forward
    device = next(model.parameters()).device.type
    schedule = _schedule()
    lrs = [schedule(i) for i in range(TOTAL + 1)]  # looked up, so the timed step pays nothing for it
    count = 0

    def step(batch):
        nonlocal count
        tokens, targets = batch
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            loss = forward(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for group in opt.param_groups:
            group["lr"] = lrs[min(count, TOTAL)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        count += 1
        return loss

    return step


def make_functional_step(params: dict, cfg: Config, *, compile: bool, all_reduce=None, precision=None):
    """The library's pure step, holding its own params and optimizer state between calls.

    ``all_reduce`` is ``make_train_step``'s hook for data parallelism (``bench train --nproc``);
    ``precision`` its mixed-precision policy (``bench gpu``).
    """
    opt = optim.chain(
        optim.clip_by_global_norm(CLIP), optim.adamw(_schedule(), betas=BETAS, weight_decay=WEIGHT_DECAY)
    )
    train_step = make_train_step(cfg, opt, compile=compile, all_reduce=all_reduce, precision=precision)
    state = {"params": params, "opt": opt.init(params)}

    def step(batch):
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], batch, None)
        return metrics["loss"]

    step.state = state  # the trained params, for callers that score them afterwards (bench quality)
    return step


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
