"""``ftransformer generate``: continue a prompt with a trained model, printing the text as it is produced.

The model comes from a *source* -- a checkpoint directory (``--checkpoint``) or a Hugging Face model
directory (``--hf-dir``: any family of ``interop.registry.FAMILIES``) or a GGUF file -- that yields a config, parameters and a
tokenizer; ``load_model`` picks the one the flags name, so another source is one more flag and one
more branch there. ``--chat`` wraps the prompt in the tokenizer's chat template as one user turn and
prints the reply alone; a tokenizer's stop tokens (``generation_config.json``'s EOS ids) end the text.
"""

import sys
from pathlib import Path

import torch

from ftransformer import precision, tree
from ftransformer.checkpoint import load_checkpoint, run_checkpoint
from ftransformer.config import Config
from ftransformer.generation import generate_stream_sliding
from ftransformer.quantization import SCHEMES, is_quantized, quantize
from ftransformer.sampling import Sampling

DEVICES = ("cpu", "cuda", "mps")
# --compile VALUE -> the decode step's kind (decode_steps.decode_step_for)
COMPILE = {"torch": "compile", "aot": "aot"}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", metavar="DIR", default=None,
        help="a checkpoint directory, or a run directory of `ftransformer train` (its best/, else latest/)",
    )
    parser.add_argument(
        "--hf-dir", metavar="DIR", default=None,
        help="a Hugging Face model directory: config.json, model.safetensors (or shards), and tokenizer.json "
        f"(GPT-2: or vocab.json + merges.txt); families: {hf_families()}",
    )
    add_gguf_argument(parser)
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="put a LoRA / DoRA adapter on the model first: a PEFT adapter directory or a run of "
                        "`ftransformer finetune` (merged into the weights for decoding; a QLoRA adapter's NF4 base "
                        "is dequantized first)")
    parser.add_argument("--member", type=int, metavar="I", default=None,
                        help="with --adapter RUN of `finetune --adapters`: use stack member I")
    parser.add_argument("--prompt", metavar="TEXT", required=True, help="text to continue (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template as one user turn and print the reply")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=200,
                        help="tokens to add (default: 200); past max_seq_len the context slides: the model "
                        "restarts from the last max_seq_len // 2 tokens")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.8,
                        help="softmax temperature; 0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, metavar="K", default=None, help="sample among the K likeliest tokens only")
    parser.add_argument("--top-p", type=float, metavar="P", default=None,
                        help="sample among the likeliest tokens holding probability P only (nucleus sampling)")
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="random seed: the same seed gives the same text")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to run (default: cpu)")
    parser.add_argument(
        "--quantize", choices=SCHEMES, default=None,
        help="decode with the weight matrices quantized: int8 = one byte a weight, a scale per output channel "
        "(a model saved quantized is used as it is)",
    )
    parser.add_argument(
        "--dtype", choices=precision.CHOICES, default="auto",
        help="compute dtype of the weights and the KV-cache: auto (default): bf16 on a CUDA device that supports "
        "it (fp32 with --quantize), else fp32",
    )
    parser.add_argument(
        "--compile", nargs="?", const="torch", choices=tuple(COMPILE), default=None, metavar="{torch,aot}",
        help="decode with the compiled step: torch (torch.compile, the default with no value) or aot "
        "(AOTInductor, float params only); faster per token, worth it for long texts after a one-off build",
    )


SOURCES = ("checkpoint", "hf_dir", "gguf")  # the flags that name a model: --checkpoint DIR, --hf-dir DIR, --gguf FILE


def hf_families() -> str:
    """The Hugging Face families ``--hf-dir`` reads, from the one registry (``interop.registry.FAMILIES``)."""
    from ftransformer.interop.registry import FAMILIES

    return ", ".join(FAMILIES)


def add_gguf_argument(parser) -> None:
    """``--gguf FILE``: the model and its tokenizer from one GGUF file (what llama.cpp and Ollama run)."""
    parser.add_argument("--gguf", metavar="FILE", default=None,
                        help="a GGUF file (llama.cpp's format): weights dequantized to float32, the tokenizer and "
                        "chat template from its metadata; architectures: llama (SmolLM, Mistral), qwen2, qwen3, "
                        "gemma 1-3, phi3, olmo2, gpt-neox, gpt2")


def load_model(args, device: torch.device) -> tuple[Config, dict, object]:
    """(config, params, tokenizer) from the source the flags name."""
    given = [f"--{name.replace('_', '-')}" for name in SOURCES if getattr(args, name, None) is not None]
    if len(given) > 1:
        raise ValueError(f"give one model source: {' or '.join(given)}, not {'both' if len(given) == 2 else 'all'}")
    if getattr(args, "gguf", None) is not None:
        return load_gguf_model(args.gguf, device)
    if args.hf_dir is not None:
        return load_hf_model(args.hf_dir, device)
    if args.checkpoint is not None:
        ckpt = load_checkpoint(run_checkpoint(args.checkpoint), device=device, with_opt_state=False)
        if ckpt.tokenizer is None:
            raise ValueError(f"the checkpoint at {str(ckpt.path)!r} holds no tokenizer, so text cannot be encoded")
        return ckpt.config, ckpt.params, ckpt.tokenizer
    raise ValueError("say which model to use: --checkpoint DIR, --hf-dir DIR or --gguf FILE")


def load_hf_model(directory: str, device: torch.device) -> tuple[Config, dict, object]:
    """(config, params, tokenizer) of a Hugging Face directory, in float32: ``tokenizer.json`` when it has
    one (``load_hf_tokenizer``), else GPT-2's ``vocab.json`` + ``merges.txt``."""
    from ftransformer.interop.hf import load_hf
    from ftransformer.interop.hf_gpt2 import load_hf_gpt2_tokenizer
    from ftransformer.interop.hf_tokenizer import TOKENIZER_JSON, load_hf_tokenizer

    cfg, params = load_hf(directory, dtype=torch.float32, device=device)
    if (Path(directory) / TOKENIZER_JSON).is_file():
        tokenizer = load_hf_tokenizer(directory)
    else:
        tokenizer = load_hf_gpt2_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"{directory!r} has no vocab.json + merges.txt (GPT-2) nor {TOKENIZER_JSON}, so text cannot be encoded")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{directory}: tokenizer has vocab_size={tokenizer.vocab_size} but the model has vocab_size={cfg.vocab_size}")
    return cfg, params, tokenizer


def load_gguf_model(path: str, device: torch.device) -> tuple[Config, dict, object]:
    """(config, params, tokenizer) of a GGUF file, in float32 (``load_gguf`` + ``load_gguf_tokenizer``)."""
    from ftransformer import tree
    from ftransformer.interop.gguf import load_gguf
    from ftransformer.interop.gguf_tokenizer import load_gguf_tokenizer

    cfg, params = load_gguf(path, dtype=torch.float32)
    tokenizer = load_gguf_tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has vocab_size={tokenizer.vocab_size} but the model has vocab_size={cfg.vocab_size}")
    return cfg, tree.to(params, device=device), tokenizer


def prompt_ids(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The prompt's token ids: encoded as text, or (``chat``) as one user turn of the chat template."""
    if not chat:
        ids = tokenizer.encode(prompt)
    elif not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError(f"--chat needs a tokenizer with a chat template (a Hugging Face tokenizer.json), got {tokenizer!r}")
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    if not ids:
        raise ValueError("--prompt encodes to no tokens; give at least one character")
    return ids


def select_device(name: str) -> torch.device:
    """The torch device named by ``--device``, checked to be available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--device mps: the MPS backend is not available to torch")
    return torch.device(name)


class TextStream:
    """Turns a growing list of token ids into text pieces that are safe to print.

    Decoding token by token can split a multi-byte character (byte-level BPE) into replacement
    characters, so each step decodes everything so far and holds back a trailing U+FFFD until the
    next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        return self._advance(text)

    def finish(self) -> str:
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown):  # a decoder that rewrites earlier text: wait for the end
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def _with_dtype(args, params: dict, cfg: Config, device: torch.device) -> dict:
    """``params`` in ``--dtype``'s compute dtype, or quantized (``--quantize``, float32 weights only)."""
    dtype = getattr(args, "dtype", "auto")
    quantized = args.quantize is not None or is_quantized(params)
    if quantized and dtype == "bf16":
        raise ValueError("--quantize (or a quantized checkpoint) decodes from float32 weights; use --dtype fp32 or auto")
    precision.allow_tf32(device)
    if quantized:
        return params if is_quantized(params) else quantize(params, cfg, args.quantize)
    return precision.resolve(dtype, device).compute_params(params)


def run(args) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = select_device(args.device)
    cfg, params, tokenizer = load_model(args, device)
    if getattr(args, "adapter", None) is not None:
        from ftransformer.cli.finetune_cmd import load_adapter
        from ftransformer.layers.nf4 import NF4Weight
        from ftransformer.peft import merge

        adapted = load_adapter(args.adapter, params, cfg, member=args.member)
        if any(isinstance(x, NF4Weight) for x in tree.leaves(adapted, is_leaf=lambda x: isinstance(x, NF4Weight))):
            print("note: a QLoRA adapter: merging dequantizes its NF4 base (the float weights decoded are the "
                  "4-bit base the adapter was trained on plus the adapter, not re-quantized)")
        params = merge(adapted)
    elif getattr(args, "member", None) is not None:
        raise ValueError("--member needs --adapter RUN (a run of `ftransformer finetune --adapters`)")
    params = _with_dtype(args, params, cfg, device)
    ids = prompt_ids(tokenizer, args.prompt, chat=args.chat)
    stop = tuple(getattr(tokenizer, "stop_tokens", ()))
    prompt = torch.tensor(ids, dtype=torch.long, device=device)
    if len(ids) >= cfg.max_seq_len:
        print(f"note: the prompt is {len(ids)} tokens and max_seq_len={cfg.max_seq_len}: the model sees its last "
              f"{cfg.max_seq_len // 2}", file=sys.stderr)
    # Past max_seq_len the context slides: the model always sees at most max_seq_len tokens.
    stream = generate_stream_sliding(
        params, prompt, cfg, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stop_tokens=stop,
        step=COMPILE.get(args.compile, "eager"),
    )
    out = sys.stdout
    out.write("" if args.chat else args.prompt)
    out.flush()
    text = TextStream(tokenizer)
    for token in stream:
        if int(token) in stop:  # the end of the reply, not part of its text
            break
        piece = text.push(int(token))
        if piece:
            out.write(piece)
            out.flush()
    out.write(text.finish() + "\n")
    out.flush()
    return 0


__all__ = ["TextStream", "add_arguments", "add_gguf_argument", "load_gguf_model", "load_hf_model", "load_model",
           "prompt_ids", "run"]
