"""Fine-tune a pretrained-shape model with LoRA on a chat set: the base frozen, only the adapters train.

A LoRA adapter is one more kind of weight leaf: ``peft.lora`` wraps the chosen matrices of the parameter tree in
``LoRAWeight(base, a, b, scale)`` (``b = 0``, so step 0 is the base exactly), ``peft.split`` separates the
adapters (what trains) from the frozen rest, and ``peft.make_adapter_step`` is a train step whose gradients,
optimizer state and checkpoints hold the adapters alone. The data is ``data.chat``'s: each conversation rendered
with the model's chat template, the loss on the assistant's tokens only, several conversations packed per row with
a document mask. At the end ``peft.merge`` folds the adapters into plain weights, and ``peft.save_peft`` writes
them as Hugging Face PEFT does (``PeftModel.from_pretrained(base, dir)`` loads them).

Run:  python examples/17_finetune.py [--hf-dir MODEL_DIR] [--steps N] [--quick] [--plot FILE]

Without --hf-dir the script writes a tiny *random* Llama-shaped model (GQA, SwiGLU, RMSNorm, rotary) with a
ChatML tokenizer into a temporary directory: offline, in seconds. Its answers start as noise, and after
fine-tuning follow the chat set. ``ftransformer finetune --hf-dir DIR --data chat.jsonl --out RUN`` is the same
recipe as a command (validation, checkpoints, resume), and ``ftransformer generate --hf-dir DIR --adapter RUN
--chat`` talks to its result.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

import ftransformer as ft
from ftransformer import peft
from ftransformer.config import Norm, Positional
from ftransformer.data.chat import pack, read_chat_jsonl
from ftransformer.interop import load_hf, save_hf
from ftransformer.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRUITS = {"banana": "yellow", "lime": "green", "cherry": "red", "plum": "purple", "orange": "orange",
          "lemon": "yellow", "kiwi": "green", "strawberry": "red", "grape": "purple", "apricot": "orange"}
ASKED = ["banana", "plum", "kiwi"]  # the questions answered before and after


def write_chat_set(path: Path) -> None:
    """A JSONL of short conversations: a question about a fruit's colour, a one-sentence answer."""
    rows = []
    for fruit, colour in FRUITS.items():
        for question in (f"What colour is a {fruit}?", f"Tell me the colour of a {fruit}."):
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": f"A {fruit} is {colour}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_demo_model(directory: Path) -> None:
    """A random Llama-shaped model and a ChatML byte-level BPE tokenizer, saved as Hugging Face files."""
    text = ft.data.builtin_corpus()[:60_000] + " ".join(f"{f} {c}" for f, c in FRUITS.items()) * 20
    backend = ft.data.build_tokenizer("bpe", text, vocab_size=400).tokenizer
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    HFTokenizer(backend, {"eos_token": "<|im_end|>"}, templates={"default": CHATML}, eos_ids=[]).save(directory)
    cfg = ft.Config(
        vocab_size=backend.get_vocab_size(), d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=160,
        max_seq_len=128, bias=False, activation="swiglu", norm=Norm("rmsnorm", float32="normalize"),
        positional=Positional("rope"), init_std=0.1,  # wide enough a random unembedding for confident answers
    )
    save_hf(ft.init_params(cfg, seed=0), cfg, directory)


def answer(params: dict, cfg: ft.Config, tok, fruit: str) -> str:
    """The model's greedy reply to one question, up to its end-of-turn token."""
    prompt = tok.apply_chat_template([{"role": "user", "content": f"What colour is a {fruit}?"}],
                                     add_generation_prompt=True)
    out = ft.generate(params, torch.tensor([prompt]), cfg, max_new_tokens=12, sampling=ft.Sampling(temperature=0),
                      stop_tokens=tok.stop_tokens)
    return tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True).strip()


def train(params: dict, cfg: ft.Config, packed, steps: int, lr: float) -> tuple[dict, list[float]]:
    """LoRA on every attention and MLP matrix, AdamW with warm-up: the adapted params and the loss per step."""
    adapted = peft.lora(params, cfg, rank=8, alpha=16, key=ft.random.key(0))  # b = 0: still the base exactly
    trainable, frozen = peft.split(adapted)  # what trains: only the adapters' a and b
    n_train = sum(x.numel() for x in ft.tree.leaves(trainable))
    print(f"LoRA rank 8 on {len(ft.tree.leaves(trainable)) // 2} matrices: {n_train:,} trainable parameters "
          f"({n_train / ft.count_params(params):.1%} of the model's {ft.count_params(params):,})")
    schedule = ft.optim.warmup_cosine(lr, steps // 10, steps, lr / 10)
    step = peft.make_adapter_step(cfg, ft.optim.adamw(schedule, weight_decay=0.0), frozen)
    opt_state = step.init(trainable)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        rows = torch.randint(0, packed.tokens.shape[0], (4,), generator=gen)
        batch = (packed.tokens[rows], packed.targets[rows], packed.documents[rows])  # documents: packed rows
        trainable, opt_state, metrics = step.step(trainable, opt_state, batch)
        losses.append(float(metrics["loss"]))
    return peft.combine(trainable, frozen), losses


def main(directory: Path, args) -> None:
    cfg, params = load_hf(directory)
    tok = load_hf_tokenizer(directory)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "chat.jsonl"
        write_chat_set(data_file)
        examples = read_chat_jsonl(data_file, tok, max_len=64).examples
    packed = pack(examples, 64, pad_id=tok.stop_tokens[0] if tok.stop_tokens else 0)
    trained = sum(sum(e.loss_mask) for e in examples)
    print(f"chat set: {len(examples)} conversations, {sum(len(e.ids) for e in examples)} tokens, "
          f"{trained} of them assistant tokens (the loss is on those), packed into {packed.tokens.shape[0]} rows of 64")
    before = {f: answer(params, cfg, tok, f) for f in ASKED}

    adapted, losses = train(params, cfg, packed, args.steps, args.lr)
    print("\nloss curve (assistant tokens only):")
    for i in range(0, len(losses), max(1, len(losses) // 8)):
        print(f"  step {i:4d}  loss {losses[i]:.3f}  " + "#" * int(40 * losses[i] / losses[0]))
    print(f"  step {len(losses) - 1:4d}  loss {losses[-1]:.3f}")

    merged = peft.merge(adapted)  # plain matrices again: decoding costs what the base's does
    print("\nanswers before -> after fine-tuning:")
    for fruit in ASKED:
        print(f"  What colour is a {fruit}?  {before[fruit]!r} -> {answer(merged, cfg, tok, fruit)!r}")
    x = packed.tokens[:2]
    diff = (ft.forward(merged, x, cfg) - ft.forward(adapted, x, cfg)).abs().max().item()
    print(f"\nmax |merged - adapted logits| = {diff:.1e}")
    with tempfile.TemporaryDirectory() as out:
        peft.save_peft(out, adapted, cfg)
        back = peft.load_peft(out, params, cfg)
        same = (ft.forward(back, x, cfg) - ft.forward(adapted, x, cfg)).abs().max().item()
        print(f"save_peft -> load_peft: {sorted(p.name for p in Path(out).iterdir())}, max |logits change| = {same:.1e}")
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(losses)
        ax.set(xlabel="step", ylabel="loss on assistant tokens", title="LoRA fine-tuning")
        fig.savefig(args.plot, dpi=100)
        print(f"loss curve: {args.plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, default=None, help="a Hugging Face model directory (default: a tiny random one)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2: a tiny model)")
    parser.add_argument("--quick", action="store_true", help="a short run (60 steps)")
    parser.add_argument("--plot", default=None, help="save the loss curve as a PNG")
    args = parser.parse_args()
    if args.quick:
        args.steps = 60
    if args.hf_dir is not None:
        main(args.hf_dir, args)
    else:
        with tempfile.TemporaryDirectory(prefix="ft-finetune-") as tmp:
            write_demo_model(Path(tmp))
            main(Path(tmp), args)
