"""``ftransformer bench finetune``: full fine-tuning, LoRA and DoRA, ours vs ``transformers`` + PEFT, side by side.

One random Llama-architecture checkpoint (``--size``: ``135m`` is SmolLM2-135M's shape, ``1b`` a ~1B Llama
shape, ``tiny`` for tests) is written once by ``transformers`` (``save_pretrained``) into a temporary
directory. Every configuration then runs in a fresh Python process (so its peak resident memory,
``resource.getrusage``'s ``ru_maxrss``, is its own; "training peak" is the peak of the steps alone, the
process's peak reset after loading through ``/proc/self/clear_refs``; ours copies the memory-mapped weights
first, so pages of the file that quantizing has replaced are not counted), loads that checkpoint, and trains ``--steps`` AdamW steps
(no weight decay, no clipping, constant ``--lr``) on the same random batch of ``--batch`` x ``--seq`` tokens
with ``--threads`` torch threads:

* **full**: every weight trains. Ours: ``load_hf`` + ``train.make_train_step(cfg, optim.adamw(lr))``; theirs:
  ``AutoModelForCausalLM.from_pretrained`` + ``loss.backward()`` + ``torch.optim.AdamW`` (torch's default,
  per-tensor on a CPU) + ``zero_grad(set_to_none=True)``, the loop a new user writes.
* **lora** / **dora**: rank ``--rank`` adapters (alpha = 2 x rank) on ``o_proj``, ``gate_proj``, ``up_proj``,
  ``down_proj`` (ours: ``w_o``, ``w_gate``, ``w_in``, ``w_out``; q/k/v are one fused matrix here, three in
  PEFT, so they are left out to keep the two models the same function). Ours: ``peft.lora`` +
  ``peft.make_adapter_step``; theirs: ``peft.get_peft_model(LoraConfig(..., use_dora=))``. Both sides set every
  ``a`` (``lora_A``) to the same numbers drawn from one seed per matrix, so the runs are the same
  computation: the losses of every step are checked equal (step 0 to 1e-5, later steps to 1e-3 relative)
  before any number is printed.
* **qlora**: our LoRA on a 4-bit NF4 base (``peft.lora(..., base="nf4")``), ours only: PEFT's QLoRA runs on
  bitsandbytes' 4-bit layers, whose kernels are CUDA's. Its losses are checked close to the float LoRA's (the
  base is rounded: 1e-1 relative at step 0). Compared with our LoRA's peak memory.
* **stack8**: 8 LoRA adapters (seeds 0-7, each its own ``--batch`` x ``--seq`` batch and AdamW state) on ONE
  base, trained by one vmapped step (``peft.stack_adapters`` + ``peft.make_stack_step``), against 8 runs of the
  ``lora`` row one after another (8 x its step time, the same tokens), and its peak memory against one run's.

Step times are CPU seconds of the process (``time.process_time``; on a shared machine wall time measures
the neighbours), the median over the steps after the first (the first allocates the optimizer state).
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    # name -> Llama shape: (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff, tied)
    "135m": (49152, 576, 30, 9, 3, 1536, True),  # SmolLM2-135M
    "1b": (128256, 2048, 16, 32, 8, 8192, True),  # Llama-3.2-1B
    "tiny": (97, 48, 2, 4, 2, 80, True),
}
# our parameter path (in a block) -> the transformers module name it is
TARGETS = {"attn.w_o": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_in": "mlp.up_proj",
           "mlp.w_out": "mlp.down_proj"}
ROWS = ("full", "lora", "dora", "qlora", "stack8")
STACK = 8  # adapters in the stack8 row


def add_arguments(parser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="135m", help="model shape (default: 135m, SmolLM2-135M's)")
    parser.add_argument("--steps", type=int, default=4, help="train steps per configuration (default: 4)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (default: 2)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process (default: 1)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default: 16)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default: 5e-5)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")


def hf_config(size: str) -> dict:
    vocab, d, layers, heads, kv, ff, tied = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ff,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "dtype": "float32",
    }


# ---------------------------------------------------------------- what runs in each child process


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
    import torch

    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def shared_a(layer: int, name: str, d_in: int, rank: int):
    """The ``a`` (``[d_in, rank]``) both sides give the adapter of ``name`` in block ``layer``: PEFT's
    kaiming-uniform range, drawn from a seed of its own."""
    import torch

    gen = torch.Generator().manual_seed(1000 * layer + sorted(TARGETS).index(name))
    return (torch.rand(d_in, rank, generator=gen) * 2 - 1) / d_in**0.5


def _timed_steps(step, steps: int) -> dict:
    """Run ``step()`` (which returns the loss before its update) ``steps`` times on the CPU clock."""
    import time

    losses, times = [], []
    for _ in range(steps):
        start = time.process_time()
        loss = step()
        times.append(time.process_time() - start)
        losses.append(float(loss))
    return {"losses": losses, "times": times}


def _ours(kind: str, directory: str, opts: dict):
    import torch

    from ftransformer import optim, peft, random, tree
    from ftransformer.interop.hf import load_hf
    from ftransformer.train import make_train_step

    cfg, params = load_hf(directory)
    # load_hf maps the file: its pages would stay resident (and counted) after quantizing replaced the tensors
    # that read them. Owned copies make every row's training peak the memory it needs (the mapping is dropped).
    params = tree.map(torch.clone, params)
    opt = optim.adamw(opts["lr"], weight_decay=0.0)
    targets = [f"blocks.*.{name}" for name in TARGETS]
    batch = _batch(cfg.vocab_size, opts["batch"], opts["seq"])
    if kind == "full":
        ts = make_train_step(cfg, opt, donate=True)
    elif kind == "stack8":
        stack = peft.stack_adapters(params, cfg, seeds=range(STACK), ranks=[opts["rank"]] * STACK,
                                    alpha=2 * opts["rank"], targets=targets)
        del params  # the stack holds the one base
        params, ts = stack.trainable, peft.make_stack_step(cfg, stack, opt)
        batches = [_batch(cfg.vocab_size, opts["batch"], opts["seq"], seed=i) for i in range(STACK)]
        batch = tuple(torch.stack(part) for part in zip(*batches))
    else:
        params = peft.lora(params, cfg, rank=opts["rank"], alpha=2 * opts["rank"], targets=targets,
                           key=random.key(0), dora=kind == "dora", base="nf4" if kind == "qlora" else None)
        for i, block in enumerate(params["blocks"]):
            for name in TARGETS:
                part, leaf = name.split(".")
                w = block[part][leaf]
                block[part][leaf] = w._replace(a=shared_a(i, name, w.a.shape[0], opts["rank"]))
        params, frozen = peft.split(params)
        ts = peft.make_adapter_step(cfg, opt, frozen)
    state = {"params": params, "opt": ts.init(params)}

    def step():
        state["params"], state["opt"], metrics = ts(state["params"], state["opt"], batch)
        return metrics["loss"].mean()  # stack8: the members' mean

    trained = sum(x.numel() for x in tree.leaves(params))
    return step, trained


def _theirs(kind: str, directory: str, opts: dict):
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    if kind != "full":
        import peft

        config = peft.LoraConfig(r=opts["rank"], lora_alpha=2 * opts["rank"], lora_dropout=0.0,
                                 target_modules=[m.split(".")[-1] for m in TARGETS.values()], use_dora=kind == "dora")
        model = peft.get_peft_model(model, config)
        layers = model.base_model.model.model.layers
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for name, module_path in TARGETS.items():
                    module = layer.get_submodule(module_path)
                    a = module.lora_A["default"].weight
                    a.copy_(shared_a(i, name, a.shape[1], opts["rank"]).t())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=opts["lr"], weight_decay=0.0)
    tokens, targets = _batch(model.config.vocab_size, opts["batch"], opts["seq"])

    def step():
        logits = model(input_ids=tokens).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, sum(p.numel() for p in trainable)


def write_checkpoint(directory: str, size: str) -> None:
    """The random checkpoint of ``size``, written by ``transformers`` (seed 0)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(size).items()
                                      if k not in ("architectures", "model_type", "dtype")})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)


def measure_one(mode: str, directory: str, opts: dict) -> dict:
    """One configuration (``ours:full``, ``theirs:lora``, ...): losses and CPU seconds of every step, the trained
    parameters and the process's peak RSS so far."""
    import gc
    import resource

    side, kind = mode.split(":")
    step, trained = (_ours if side == "ours" else _theirs)(kind, directory, opts)
    gc.collect()
    reset = reset_peak_rss()  # from here on, the peak of the training steps alone (loading not counted)
    result = _timed_steps(step, opts["steps"])
    result["trained"] = trained
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["train_rss"] = read_peak_rss() if reset else result["peak_rss"]
    return result


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux: ``5`` into ``/proc/self/clear_refs``); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def read_peak_rss() -> int:
    """This process's peak resident set since the last reset, in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def child_main(mode: str, directory: str, opts_json: str) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    import torch

    opts = json.loads(opts_json)
    torch.set_num_threads(opts["threads"])
    if mode == "write":
        write_checkpoint(directory, opts["size"])
        print(json.dumps({"written": directory}))
        return
    print(json.dumps(measure_one(mode, directory, opts)))


# ---------------------------------------------------------------- the parent: children, checks, table


def _child(mode: str, directory: Path, opts: dict) -> dict:
    code = f"from ftransformer.bench.finetune import child_main; child_main({mode!r}, {str(directory)!r}, {json.dumps(opts)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_agree(ours: dict, theirs: dict, what: str, *, first: float = 1e-5, later: float = 1e-3) -> None:
    """``ValueError`` unless the two runs' losses agree: step 0 to ``first``, later steps to ``later`` (relative)."""
    for i, (a, b) in enumerate(zip(ours["losses"], theirs["losses"])):
        tol = first if i == 0 else later
        if abs(a - b) > tol * max(abs(b), 1.0):
            raise ValueError(f"{what}: ours and the baseline disagree at step {i}: loss {a!r} vs {b!r}")


def summary(result: dict, tokens: int) -> dict:
    """Median step time (after the first step when there are more), tokens/s and peak RSS of one run."""
    times = result["times"][1:] or result["times"]
    t = statistics.median(times)
    return {"step_s": t, "tok_s": tokens / t, "rss_gb": result["peak_rss"] / 1e9,
            "train_gb": result["train_rss"] / 1e9, "trained": result["trained"]}


def goal(name: str, ratio: float, limit: float) -> str:
    return f"{name}: {ratio:.2f}x (goal <= {limit:g}x) {'PASS' if ratio <= limit else 'MISS'}"


def measure(args, directory: Path, child=None) -> tuple[dict, list[str]]:
    """Every asked row's runs (``{label: summary}``) and the notes of the ours-only rows;
    ``child(mode, directory, opts)`` runs one configuration (None: in a fresh process)."""
    child = child or _child
    opts = {k: getattr(args, k) for k in ("steps", "batch", "seq", "threads", "rank", "lr", "size")}
    tokens = args.batch * args.seq
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"--rows takes names from {', '.join(ROWS)}, got {', '.join(bad)}")
    runs, notes = {}, []
    for row in rows:
        if row in ("qlora", "stack8"):
            notes.append(_ours_only_row(row, child, directory, opts, tokens, runs))
            continue
        ours, theirs = child(f"ours:{row}", directory, opts), child(f"theirs:{row}", directory, opts)
        check_agree(ours, theirs, row)
        base = "transformers" if row == "full" else "PEFT"
        runs[f"{row} ours"] = summary(ours, tokens)
        runs[f"{row} {base}"] = summary(theirs, tokens)
        runs[f"{row} ours"]["losses"] = ours["losses"]
    return runs, notes


def _ours_only_row(row: str, child, directory: Path, opts: dict, tokens: int, runs: dict) -> str:
    """The qlora and stack8 rows: ours only, checked against our float LoRA (the ``lora`` row runs first)."""
    if "lora ours" not in runs:
        runs.update(measure_lora_first(child, directory, opts, tokens))
    result = child(f"ours:{row}", directory, opts)
    if row == "qlora":  # an NF4 base is a rounded base: close to the float LoRA's losses, not equal
        check_agree(result, {"losses": runs["lora ours"]["losses"]}, row, first=1e-1, later=1e-1)
        runs["qlora ours"] = summary(result, tokens)
        return "qlora: our LoRA on an NF4 base; PEFT's QLoRA needs bitsandbytes' CUDA kernels (not run)"
    runs["stack8 ours"] = summary(result, tokens * STACK)
    one = runs["lora ours"]
    runs["8 x lora, in turn"] = {"step_s": STACK * one["step_s"], "tok_s": one["tok_s"], "rss_gb": one["rss_gb"],
                                 "train_gb": one["train_gb"], "trained": STACK * one["trained"]}
    return f"stack8: {STACK} adapters, each its own {opts['batch']} x {opts['seq']} batch, one vmapped step"


def measure_lora_first(child, directory: Path, opts: dict, tokens: int) -> dict:
    """Our float LoRA row, which the qlora and stack8 rows are compared with."""
    ours = child("ours:lora", directory, opts)
    return {"lora ours": dict(summary(ours, tokens), losses=ours["losses"])}


def goals(runs: dict) -> list[str]:
    """The goals of issue 30 as ratios measured in this run, each PASS or MISS."""
    lines = []
    if "full ours" in runs:
        o, t = runs["full ours"], runs["full transformers"]
        lines += [goal("full step time ours / transformers", o["step_s"] / t["step_s"], 1.0),
                  goal("full peak RSS ours / transformers", o["rss_gb"] / t["rss_gb"], 1.1)]
    if "lora ours" in runs:
        o, t = runs["lora ours"], runs["lora PEFT"]
        lines += [goal("LoRA step time ours / PEFT", o["step_s"] / t["step_s"], 1.0),
                  goal("LoRA peak RSS ours / PEFT", o["rss_gb"] / t["rss_gb"], 1.0)]
    if "dora ours" in runs and "lora ours" in runs:
        lines.append(goal("DoRA step time / our LoRA", runs["dora ours"]["step_s"] / runs["lora ours"]["step_s"], 1.15))
    if "qlora ours" in runs and "lora ours" in runs:
        lines.append(goal("QLoRA training peak RSS / our LoRA's", runs["qlora ours"]["train_gb"] / runs["lora ours"]["train_gb"], 0.4))
    if "stack8 ours" in runs:
        stack, one = runs["stack8 ours"], runs["lora ours"]
        gain = stack["tok_s"] / one["tok_s"]
        lines += [f"stack8 tokens/s / 8 LoRA runs in turn: {gain:.2f}x (goal >= 1.5x) {'PASS' if gain >= 1.5 else 'MISS'}",
                  goal("stack8 peak RSS / one LoRA run", stack["rss_gb"] / one["rss_gb"], 1.3)]
    return lines


def table(runs: dict) -> list[str]:
    lines = [f"{'config':<20} {'trained':>12} {'step (s)':>10} {'tokens/s':>10} {'peak RSS (GB)':>14} {'training peak (GB)':>19}"]
    for label, r in runs.items():
        lines.append(f"{label:<20} {r['trained']:>12,} {r['step_s']:>10.3f} {r['tok_s']:>10.1f} {r['rss_gb']:>14.2f} "
                     f"{r['train_gb']:>19.2f}")
    return lines


def run(args, child=None) -> int:
    with tempfile.TemporaryDirectory(prefix="ft-bench-finetune-") as tmp:
        directory = Path(args.dir or tmp)
        config = directory / "config.json"
        if config.is_file() and json.loads(config.read_text())["hidden_size"] != hf_config(args.size)["hidden_size"]:
            raise ValueError(f"{directory} holds a checkpoint of another size than --size {args.size}; give another --dir")
        if not config.is_file():
            _child("write", directory, {"size": args.size, "threads": args.threads})
        runs, notes = measure(args, directory, child)
    print(f"bench finetune --size {args.size}: batch {args.batch} x {args.seq} tokens, {args.threads} thread(s), "
          f"{args.steps} AdamW steps (lr {args.lr:g}), rank {args.rank}; losses of every step agree with the baseline")
    print("\n".join(table(runs) + notes + goals(runs)))
    return 0
