"""A pretrained Hugging Face model: load it, chat with it, look inside it, write it back.

A model directory from the Hugging Face Hub (``config.json``, ``model.safetensors`` or shards,
``tokenizer.json``, ``tokenizer_config.json``, a chat template) becomes a ``Config`` and a parameter
pytree, like any model here::

    cfg, params = load_hf("Qwen2.5-0.5B-Instruct")          # Llama, Mistral, Qwen2, Qwen3, GPT-2
    tok = load_hf_tokenizer("Qwen2.5-0.5B-Instruct")

The family only switches features on in the config -- a head width of its own, q/k biases, q/k norms,
sliding windows, rope scaling -- so ``generate``, ``forward_with_activations`` and training work on it
unchanged.

Run:  python examples/12_pretrained.py [MODEL_DIR]

Without MODEL_DIR the script writes a tiny *random* Qwen3-style model (q/k norms, 32-wide heads on a
64-wide stream, a 16-token window on its second layer) with a ChatML tokenizer into a temporary
directory and uses that: it runs offline in seconds, and its replies are noise. Give it a real
directory to chat for real (a 0.5B model needs about 2 GB of memory in float32).
"""

import sys
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer.config import Attention, Norm, Positional
from ftransformer.interop import load_hf, save_hf
from ftransformer.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_demo_model(directory: Path) -> None:
    """A random Qwen3-style model and a ChatML byte-level BPE tokenizer, saved as Hugging Face files."""
    text = ft.data.builtin_corpus()[:200_000]
    backend = ft.data.build_tokenizer("bpe", text, vocab_size=512).tokenizer
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    HFTokenizer(backend, {"eos_token": "<|im_end|>"}, templates={"default": CHATML}, eos_ids=[]).save(directory)
    cfg = ft.Config(
        vocab_size=backend.get_vocab_size(), d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=128,
        max_seq_len=256, bias=False, activation="swiglu", norm=Norm("rmsnorm", float32="normalize"),
        positional=Positional("rope"), attention=Attention(head_dim=32, qk_norm=True, window=(None, 16)),
    )
    save_hf(ft.init_params(cfg, seed=0), cfg, directory)


def main(directory: Path) -> None:
    cfg, params = load_hf(directory)
    tok = load_hf_tokenizer(directory)
    print(f"{directory}: {ft.count_params(params):,} parameters, {cfg.n_layers} layers, "
          f"{cfg.n_heads} query heads / {cfg.n_kv_heads} key-value heads of width {cfg.head_dim}")
    print(f"  features: {cfg.attention}, rope_base={cfg.positional.base:g}, rope_scaling={cfg.positional.scaling}")

    # 1. Chat: the template writes the conversation in the model's own format; generation stops at the
    #    end of the assistant's turn (the tokenizer's stop tokens).
    messages = [{"role": "user", "content": "In one sentence: what does attention do in a transformer?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = ft.generate(params, torch.tensor([prompt]), cfg, max_new_tokens=40, sampling=ft.Sampling(temperature=0),
                      stop_tokens=tok.stop_tokens)
    reply = out[0, len(prompt):].tolist()
    print(f"\nprompt ({len(prompt)} tokens):\n{tok.decode(prompt)}")
    print(f"reply: {tok.decode(reply, skip_special_tokens=True)!r}")

    # 2. Look inside: every intermediate value is a return value. The last layer's attention pattern
    #    obeys its sliding window, if it has one.
    tokens = torch.tensor(prompt[: cfg.max_seq_len])
    logits, acts = ft.forward_with_activations(params, tokens, cfg)
    diff = (logits - ft.forward(params, tokens, cfg)).abs().max().item()
    print(f"\nmax |activations logits - forward logits| = {diff:.1e}")
    for layer in range(cfg.n_layers):
        pattern = acts["blocks"][layer]["attn"]["pattern"]  # [heads, seq, kv_seq]
        widest = int((pattern > 0).sum(-1).max())
        print(f"layer {layer}: pattern {tuple(pattern.shape)}, window {cfg.layer_window(layer)}, "
              f"keys seen by a query: at most {widest}")
    top = logits[-1].topk(5).indices.tolist()
    print(f"next-token guesses after the prompt: {[tok.decode([t]) for t in top]}")

    # 3. Write it back: transformers reads the directory, and so does load_hf, bit for bit.
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(params, cfg, tmp)
        cfg2, params2 = load_hf(tmp)
        a, b = ft.tree.flatten_with_paths(params), ft.tree.flatten_with_paths(params2)
        same = cfg2 == cfg and list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(f"\nsave_hf -> load_hf: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="ft-demo-model-") as tmp:
            write_demo_model(Path(tmp))
            main(Path(tmp))
