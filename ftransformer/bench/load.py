"""``ftransformer bench load --dir DIR``: loading a Hugging Face checkpoint, ``ft.load_hf`` vs ``transformers``.

A random Llama-like checkpoint is written once by ``transformers`` (``save_pretrained``) into ``DIR``
and reused while its ``config.json`` matches the size asked for. Then each contender loads it in a
fresh Python process (nothing cached in the loader, no memory left over from the other one), and
reports its wall time and its peak resident memory (``resource.getrusage``'s ``ru_maxrss``):

* **ft.load_hf** -- maps the file copy-on-write; a parameter that is one stored tensor is that tensor
  or a transposed view of it (no copy), and only the fused q|k|v is read into a new parameter
  (``interop.hf``);
* **transformers** -- ``AutoModelForCausalLM.from_pretrained(DIR, dtype=<stored dtype>)``.

Imports happen before the clock starts; "load peak" is the peak resident memory minus what the
process held just before loading (Python, torch, and for the baseline transformers itself), and
"/ params" divides it by the parameters' bytes. "after use" is the same ratio once every parameter has
been read once (as a forward pass does): both loaders leave parameters memory-mapped from the file,
resident only when first read (the file's pages count in the resident memory then), so the load peak
alone understates what the loaded model holds. The goals (issue 29): ``ft.load_hf``'s time <= 1.0x
``transformers``' and its "after use" <= 1.05. The Linux page cache is warm for both (the checkpoint was
just written or read), so the times compare the loaders, not the disk.
"""

import json
import subprocess
import sys
from pathlib import Path

SIZES = {
    # name -> Llama-like shape: (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff); "1b" is TinyLlama's 1.1B
    "1b": (32000, 2048, 22, 32, 4, 5632),
    "100m": (32000, 768, 12, 12, 4, 2048),
    "tiny": (61, 24, 2, 4, 2, 40),
}
DTYPES = ("bfloat16", "float32")
CONTENDERS = ("ft.load_hf", "transformers")


def add_arguments(parser) -> None:
    parser.add_argument("--dir", metavar="DIR", required=True,
                        help="where the random checkpoint is written once and then reused")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="checkpoint size (default: 1b, ~1.1B parameters)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored dtype (default: bfloat16)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process loads per contender, median reported (default: 1)")


def hf_config(size: str, dtype: str) -> dict:
    vocab, d, layers, heads, kv, ff = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ff,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype,
    }


def ensure_checkpoint(directory: Path, size: str, dtype: str) -> None:
    """Write the random checkpoint with transformers (in a child process) unless ``directory`` holds it."""
    want = hf_config(size, dtype)
    config = directory / "config.json"
    if config.is_file() and (directory / "model.safetensors").is_file():
        have = json.loads(config.read_text(encoding="utf-8"))
        if all(have.get(k) == v for k, v in want.items() if k != "architectures"):
            return
    print(f"writing a random {size} checkpoint ({dtype}) with transformers into {directory} ...", flush=True)
    _child("write", directory, json.dumps(want))


def _child(mode: str, directory: Path, extra: str = "") -> dict:
    code = f"from ftransformer.bench.load import child_main; child_main({mode!r}, {str(directory)!r}, {extra!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_now() -> int:
    """Bytes resident now (``/proc/self/statm``'s second field, in pages)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(mode: str, directory: str, extra: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import resource
    import time

    import torch

    if mode == "write":
        import transformers

        cfg = transformers.LlamaConfig(**{k: v for k, v in json.loads(extra).items() if k not in ("architectures", "model_type", "dtype")})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, json.loads(extra)["dtype"]))
        model.save_pretrained(directory)
        print(json.dumps({"written": directory}))
        return
    if mode == "transformers":
        import transformers
    else:
        from ftransformer.interop.hf import load_hf
    dtype = getattr(torch, json.loads(Path(directory, "config.json").read_text())["dtype"])
    before = _rss_now()
    start = time.perf_counter()
    if mode == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tensors = list(model.parameters())
    else:
        _, params = load_hf(directory)
        from ftransformer import tree

        tensors = tree.leaves(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with torch.no_grad():
        for t in tensors:  # a memory-mapped parameter becomes resident when a forward pass reads it
            t.sum()
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"seconds": seconds, "peak": peak, "used": used, "before": before, "param_bytes": n_bytes}))


def measure(directory: Path, repeats: int) -> dict[str, dict]:
    """Each contender ``repeats`` times, alternating, in fresh processes; the median run of each."""
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for _ in range(repeats):
        for contender in CONTENDERS:
            runs[contender].append(_child(contender, directory))
    return {c: sorted(r, key=lambda m: m["seconds"])[len(r) // 2] for c, r in runs.items()}


def format_table(results: dict[str, dict]) -> str:
    mib = 2**20
    head = f"{'loader':<14}{'time s':>9}{'peak RSS MiB':>14}{'load peak MiB':>15}{'/ params':>10}{'after use':>11}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        load_peak = m["peak"] - m["before"]
        lines.append(
            f"{name:<14}{m['seconds']:>9.3f}{m['peak'] / mib:>14.0f}{load_peak / mib:>15.0f}"
            f"{load_peak / m['param_bytes']:>10.2f}{(m['used'] - m['before']) / m['param_bytes']:>11.2f}"
        )
    ft_, hf = results["ft.load_hf"], results["transformers"]
    lines += [
        "",
        f"parameters: {ft_['param_bytes'] / mib:.0f} MiB",
        f"ft.load_hf / transformers: time x{ft_['seconds'] / hf['seconds']:.2f}, "
        f"load peak x{(ft_['peak'] - ft_['before']) / max(hf['peak'] - hf['before'], 1):.2f}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(directory, args.size, args.dtype)
    results = measure(directory, args.repeats)
    print(f"loading {directory} ({args.size}, {args.dtype}), each load in a fresh process:")
    print(format_table(results))
    return 0
