"""``ftransformer bench speculative --checkpoint TARGET --draft DRAFT``: speculative decoding on trained models.

Both checkpoints must share a tokenizer (trained on the same text). Prompts are windows of the
validation split. Contenders, interleaved over ``--repeats`` and reported as medians:

* **target alone** -- ``generate`` with the target's KV-cache, one target step per token;
* **speculative, K = ...** -- ``speculative_generate``: the draft proposes K tokens, the target checks
  them in one pass over K + 1 tokens and keeps the agreeing prefix (plus one token of its own).

Greedy decoding makes both produce the same tokens (checked); the acceptance rate is the share of
draft tokens the target kept. Speculation pays when the draft is much cheaper than the target and
agrees with it often: speed-up ~ (accepted per round + 1) / (K x draft cost / target cost + 1).
"""

import statistics

import torch

from ftransformer.bench.timing import interleaved, num_threads
from ftransformer.checkpoint import load_checkpoint
from ftransformer.data import load_dataset
from ftransformer.generation import generate
from ftransformer.sampling import GREEDY
from ftransformer.speculative import Draft, speculative_generate


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="the target model's checkpoint")
    parser.add_argument("--draft", metavar="DIR", required=True, help="the draft model's checkpoint (same tokenizer)")
    parser.add_argument("--data", metavar="FILE", default=None, help="text the prompts come from (default: built-in corpus)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6], metavar="K",
                        help="draft lengths to try (default: 2 4 6)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts generated together (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens to generate (default: as many as the shorter context allows)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, interleaved (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def _load(path: str):
    ckpt = load_checkpoint(path, with_opt_state=False)
    return ckpt.params, ckpt.config.replace(dropout=0.0), ckpt.tokenizer


def run(args) -> int:
    for name in ("batch_size", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with num_threads(args.threads):
        return _measure(args)


def _measure(args) -> int:
    params, cfg, tokenizer = _load(args.checkpoint)
    dparams, dcfg, dtokenizer = _load(args.draft)
    if tokenizer is None or tokenizer != dtokenizer:
        raise ValueError("the target and the draft checkpoints must hold the same tokenizer")
    longest = min(cfg.max_seq_len, dcfg.max_seq_len) - args.prompt_len - max(args.draft_tokens)
    new = longest if args.new_tokens is None else args.new_tokens
    if not 1 <= new <= longest:
        raise ValueError(f"--new-tokens must lie in [1, {longest}] (the shorter context minus prompt and K), got {new}")
    data = load_dataset(args.data, tokenizer=tokenizer, seq_len=args.prompt_len)
    val = torch.as_tensor(data.val.astype("int64"))
    stride = (len(val) - args.prompt_len) // args.batch_size
    prompt = torch.stack([val[i * stride:i * stride + args.prompt_len] for i in range(args.batch_size)])

    contenders = {"target alone": lambda: (generate(params, prompt, cfg, max_new_tokens=new, sampling=GREEDY), None)}
    for k in args.draft_tokens:
        contenders[f"speculative, K={k}"] = (lambda k=k: speculative_generate(
            params, prompt, cfg, draft=Draft(dparams, dcfg, tokens=k), max_new_tokens=new, sampling=GREEDY))
    contenders["draft alone"] = lambda: (generate(dparams, prompt, dcfg, max_new_tokens=new, sampling=GREEDY), None)
    times, results = interleaved(contenders, repeats=args.repeats, warmup=1, device=prompt.device)
    outputs = {name: out for name, (out, _) in results.items()}
    stats = {name: s for name, (_, s) in results.items()}

    tokens = new * args.batch_size
    base = statistics.median(times["target alone"])
    print(f"bench speculative: target {args.checkpoint} ({cfg.n_layers} layers, d_model {cfg.d_model}), draft "
          f"{args.draft} ({dcfg.n_layers} layers, d_model {dcfg.d_model}); batch {args.batch_size}, prompt "
          f"{args.prompt_len}, {new} new tokens, greedy, {args.repeats} interleaved repetitions, torch {torch.__version__}")
    header = f"{'contender':<20}{'ms/token':>10}{'vs target':>11}{'accepted':>10}{'tokens/round':>14}"
    lines = [header, "-" * len(header)]
    for name, ts in times.items():
        med = statistics.median(ts)
        s = stats[name]
        accepted = f"{s.acceptance_rate:.0%}" if s is not None else ""
        per_round = f"{new / s.rounds:.2f}" if s is not None and s.rounds else ""  # per row
        lines.append(f"{name:<20}{med / tokens * 1e3:>10.2f}{base / med:>10.2f}x{accepted:>10}{per_round:>14}")
    print("\n".join(lines))
    differ = [n for n in contenders if n.startswith("speculative") and not torch.equal(outputs[n], outputs["target alone"])]
    print("greedy speculative output equals the target's" if not differ else f"outputs differ from the target's: {differ}")
    return 1 if differ else 0
