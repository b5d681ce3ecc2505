"""``ftransformer bench int8 --checkpoint DIR --data FILE``: what int8 quantization costs a trained model.

Three measurements, float32 against ``quantize(params, cfg, "int8")`` of the same checkpoint:

* **val loss, weight-only** -- the whole validation split in non-overlapping windows (``evaluate`` on
  ``data.SplitWindows``). Windows are many rows, so the int8 model runs the reference product: this is
  the cost of rounding the weights alone.
* **val loss, decode path** -- ``--windows`` validation windows fed one token at a time through the
  KV-cache (teacher forcing), 16 rows a step: exactly the products generation runs (fbgemm's int8 GEMM,
  which also rounds the activations to 8 bits).
* **greedy agreement** -- greedy continuations of validation prompts: the share of positions where the
  int8 model picks the float model's token, and how many tokens it follows the float model before the
  first difference.

When torchao is installed, each measurement is repeated with the weights rounded by torchao's int8
weight-only quantization (``bench.torchao_ref.scheme_params``) as the reference scheme.
"""

import statistics
import time

import torch
import torch.nn.functional as F

from ftransformer.bench import torchao_ref
from ftransformer.bench.timing import num_threads
from ftransformer.cache import init_cache
from ftransformer.checkpoint import load_checkpoint
from ftransformer.data import SplitWindows, load_dataset
from ftransformer.generation import generate
from ftransformer.layers.int8 import product
from ftransformer.model import forward_with_cache
from ftransformer.quantization import quantize, weight_bytes
from ftransformer.sampling import GREEDY
from ftransformer.train import evaluate

DECODE_ROWS = 16  # rows decoded together: at most layers.int8.FAST_ROWS, so the decode product is fbgemm's
LOSS_TARGET = 0.01  # the bound: int8 val loss within 1% of float32
TORCHAO = "torchao int8"  # our products, torchao's rounding of the weights (bench.torchao_ref)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="a checkpoint written by ftransformer")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="the text it was trained on (default: the built-in corpus); its val split is scored")
    parser.add_argument("--windows", type=int, default=64,
                        help="val windows scored through the decode path (default: 64)")
    parser.add_argument("--prompts", type=int, default=16, help="greedy continuations compared (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens per continuation (default: 100)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def decode_path_loss(params: dict, windows: torch.Tensor, cfg) -> float:
    """Mean loss of ``windows`` ``[n, seq + 1]`` predicted one token at a time through the KV-cache."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in windows.split(DECODE_ROWS):
            tokens, targets = rows[:, :-1], rows[:, 1:]
            cache = init_cache(cfg, rows.shape[0], max_len=tokens.shape[1])
            for t in range(tokens.shape[1]):
                logits, cache = forward_with_cache(params, tokens[:, t:t + 1], cache, cfg)
                total += float(F.cross_entropy(logits[:, 0], targets[:, t], reduction="sum"))
                count += rows.shape[0]
    return total / count


def greedy_agreement(fp32: torch.Tensor, int8: torch.Tensor, prompt_len: int) -> tuple[float, list[int]]:
    """(share of generated positions with equal tokens, each row's tokens before its first difference)."""
    same = fp32[:, prompt_len:] == int8[:, prompt_len:]
    first_diffs = [int(row.numel()) if bool(row.all()) else int((~row).int().argmax()) for row in same]
    return float(same.float().mean()), first_diffs


def run(args) -> int:
    for name in ("windows", "prompts", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with num_threads(args.threads):
        return _measure(args)


def _measure(args) -> int:
    ckpt = load_checkpoint(args.checkpoint, with_opt_state=False)
    if ckpt.tokenizer is None:
        raise ValueError(f"the checkpoint at {args.checkpoint!r} holds no tokenizer, so the data cannot be encoded")
    cfg, params = ckpt.config.replace(dropout=0.0), ckpt.params
    seq = cfg.max_seq_len
    data = load_dataset(args.data, tokenizer=ckpt.tokenizer, seq_len=seq)
    start = time.perf_counter()
    qparams = quantize(params, cfg, "int8")
    print(f"bench int8: {args.checkpoint} ({cfg.n_layers} layers, d_model {cfg.d_model}), quantized in "
          f"{time.perf_counter() - start:.2f} s; weights {weight_bytes(params) / 2**20:.2f} MiB -> "
          f"{weight_bytes(qparams) / 2**20:.2f} MiB; torch {torch.__version__}; decode product: {product()}")

    models = {"float32": params, "int8": qparams}
    if torchao_ref.available():
        models[TORCHAO] = torchao_ref.scheme_params(params, cfg)
    split = SplitWindows(data.val, seq, 32)
    whole = {name: evaluate(p, split, cfg, desc=name) for name, p in models.items()}
    val = torch.as_tensor(data.val[: (len(data.val) - 1) // seq * seq + 1].astype("int64"))
    stride = max((len(val) - 1) // seq // args.windows, 1)
    starts = torch.arange(args.windows) * stride * seq
    windows = torch.stack([val[s:s + seq + 1] for s in starts.tolist()])
    decoded = {name: decode_path_loss(p, windows, cfg) for name, p in models.items()}
    print(format_loss_table({f"whole split, weight-only ({split.n_targets:,})": whole,
                             f"decode path ({args.windows} windows x {seq})": decoded}))
    worst = max(abs(r["int8"] / r["float32"] - 1) for r in (whole, decoded))
    print(f"target: int8 val loss within {LOSS_TARGET:.0%} of float32: {'met' if worst <= LOSS_TARGET else 'missed'} "
          f"(largest change {worst:.2%})")
    if TORCHAO not in models:
        print(f"{TORCHAO}: {torchao_ref.SKIPPED}")

    prompt_len = min(16, seq // 4)
    prompts = windows[: args.prompts, :prompt_len]
    new = min(args.new_tokens, seq - prompt_len)
    outs = {name: generate(p, prompts, cfg, max_new_tokens=new, sampling=GREEDY) for name, p in models.items()}
    for name in (n for n in models if n != "float32"):
        share, first_diffs = greedy_agreement(outs["float32"], outs[name], prompt_len)
        print(f"greedy agreement of {name} over {prompts.shape[0]} val prompts x {new} tokens: {share:.1%} of "
              f"positions equal; it follows the float model for {statistics.mean(first_diffs):.1f} tokens on "
              f"average (median {statistics.median(first_diffs):.0f}) before the first difference")
    return 0


def format_loss_table(rows: dict[str, dict[str, float]]) -> str:
    """One row per measurement: the float32 loss, then each quantized model's loss and change from it."""
    names = [n for n in next(iter(rows.values())) if n != "float32"]
    header = f"{'val loss':<34}{'float32':>9}" + "".join(f"{n:>{max(len(n) + 2, 9)}}{'change':>9}" for n in names)
    lines = [header, "-" * len(header)]
    for label, res in rows.items():
        cells = "".join(f"{res[n]:>{max(len(n) + 2, 9)}.4f}{res[n] / res['float32'] - 1:>+9.2%}" for n in names)
        lines.append(f"{label:<34}{res['float32']:>9.4f}{cells}")
    return "\n".join(lines)
