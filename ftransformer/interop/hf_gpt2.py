"""GPT-2 in the Hugging Face layout under its own names, and GPT-2's byte-level BPE tokenizer files.

``load_hf_gpt2`` takes what a GPT-2 comes as: a model directory (``model.safetensors``, or the older
``pytorch_model.bin``, or a sharded index of either), one weights file, or a state dict in memory (of
a ``GPT2LMHeadModel`` or a ``GPT2Model``, with or without a config). ``to_hf_gpt2`` and
``save_hf_gpt2`` write it back. The conversion itself is the ``gpt2`` entry of ``interop.registry``
(config mapping and tensor slots in ``interop.gpt2``), loaded and saved by ``interop.hf`` like every
family: these functions only find the tensors and the config.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ftransformer.config import Config
from ftransformer.data import BPETokenizer, Tokenizer
from ftransformer.interop.gpt2 import check_gpt2_compatible, config_from_hf
from ftransformer.interop.hf import fill_params, hf_state_dict, read_weights, read_weights_file, save_hf
from ftransformer.interop.registry import FAMILIES

GPT2 = FAMILIES["gpt2"]
# Every released GPT-2 (small, medium, large, xl) has 64-wide heads; a bare state dict does not record
# the head count, so it is inferred from this when no config is given.
_GPT2_HEAD_DIM = 64



def config_to_hf(cfg: Config) -> dict:
    """The Hugging Face ``config.json`` contents (a dict ``GPT2Config(**d)`` accepts) for ``cfg``."""
    return GPT2.config_json(cfg)


# ---------------------------------------------------------------- load


def load_hf_gpt2(
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: Config | Mapping | object | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Config, dict]:
    """``(cfg, params)`` from a GPT-2 in the Hugging Face layout.

    Args:
        path_or_state_dict: a local directory holding ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``, or a sharded index of either), one such weights file, or a state dict
            of a ``GPT2LMHeadModel`` / ``GPT2Model`` (keys with or without ``transformer.``).
        config: overrides the directory's ``config.json``; for a bare state dict or file, without it the
            sizes are inferred from the shapes and the head count from GPT-2's 64-wide heads. A
            ``Config``, a ``config.json`` dict, or a ``transformers.GPT2Config``.
        dtype: cast every floating-point tensor (None keeps the stored dtype).
        device: move every tensor (None: where the state dict's tensors are; the CPU for files).

    Returns:
        The config and the parameter tree ``init_params`` would build for it; a state dict's tensors
        are the parameters themselves where no cast, move or transpose is needed. Missing, unexpected
        or mis-shaped tensors raise ``ValueError`` naming the key (and both shapes).
    """
    state_dict, config = _source(path_or_state_dict, config)
    sd = _checked_entries(state_dict)
    cfg = _resolve_config(sd, config)
    check_gpt2_compatible(cfg)
    where = next((v.device for v in sd.values()), "cpu") if device is None else device
    return cfg, fill_params(sd, GPT2, cfg, dtype=dtype, device=where)


def _source(path_or_state_dict, config) -> tuple[Mapping[str, Tensor], Any]:
    """The state dict, and the config to use (a directory's ``config.json`` unless one is given)."""
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        return path_or_state_dict, config
    path = Path(path_or_state_dict)
    if path.is_file():
        return read_weights_file(path), config
    state_dict = read_weights(path)
    return state_dict, _read_config_json(path) if config is None else config


def _checked_entries(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"state dict entries must be str -> Tensor, got {key!r} -> {type(value).__name__}")
    return dict(state_dict)


def _resolve_config(sd: Mapping[str, Tensor], config) -> Config:
    if config is None:
        return _infer_config({k.removeprefix(GPT2.base_prefix): v for k, v in sd.items()})
    return config if isinstance(config, Config) else config_from_hf(config)


def _infer_config(sd: Mapping[str, Tensor]) -> Config:
    """Sizes from the tensors' shapes (names without ``transformer.``); the head count assumes GPT-2's 64-wide heads."""
    for key in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
        if key not in sd:
            raise ValueError(f"state dict has no {key!r}, needed to infer the config (or pass config=...)")
    vocab, d_model = sd["wte.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h.") and k.split(".")[1].isdigit())
    if d_model % _GPT2_HEAD_DIM:
        raise ValueError(
            f"cannot infer n_heads: d_model={d_model} is not a multiple of GPT-2's head_dim={_GPT2_HEAD_DIM}; "
            "pass config=... (a Config or the model's config.json dict)"
        )
    head = sd.get("lm_head.weight")
    tied = head is None or (head.shape == sd["wte.weight"].shape and bool(torch.equal(head, sd["wte.weight"])))
    return Config.from_flat(
        vocab_size=vocab, d_model=d_model, n_heads=d_model // _GPT2_HEAD_DIM, n_layers=n_layers,
        d_ff=sd["h.0.mlp.c_fc.weight"].shape[1], max_seq_len=sd["wpe.weight"].shape[0], activation="gelu_tanh",
        tie_embeddings=tied,
    )


def _read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json (a Hugging Face GPT-2 directory needs one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------- export


def to_hf_gpt2(params: dict, cfg: Config) -> dict[str, Tensor]:
    """The ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed keys, plus ``lm_head.weight``).

    ``GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg))).load_state_dict(sd, strict=True)`` accepts it.
    Tensors are shared with ``params`` where no transpose is needed (a tied ``lm_head.weight`` is the
    token embedding itself, as in the HF model). Configs GPT-2 cannot express raise ``ValueError``.
    """
    return hf_state_dict(params, cfg, "gpt2")


def save_hf_gpt2(
    params: dict, cfg: Config, directory: str | os.PathLike, *, tokenizer: Tokenizer | None = None
) -> Path:
    """Write a directory ``transformers.GPT2LMHeadModel.from_pretrained`` (and ``load_hf_gpt2``) reads.

    ``config.json`` + ``model.safetensors`` (``save_hf``), and ``vocab.json`` + ``merges.txt`` for a
    byte-level BPE ``tokenizer`` (a ``GPT2BPETokenizer`` or a ``BPETokenizer`` trained by
    ``ftransformer.data``). Returns the directory.
    """
    if tokenizer is not None and not isinstance(tokenizer, BPETokenizer):
        raise ValueError(
            f"a GPT-2 directory holds a byte-level BPE tokenizer (vocab.json + merges.txt), got {tokenizer!r}"
        )
    check_gpt2_compatible(cfg)  # save_hf would write another family for a config GPT-2 cannot express
    directory = save_hf(params, cfg, directory)
    eos = None if tokenizer is None else tokenizer.tokenizer.token_to_id(GPT2BPETokenizer.EOS)
    if tokenizer is not None:
        save_vocab_merges(tokenizer, directory)
    if eos is not None:
        path = directory / "config.json"
        hf = json.loads(path.read_text(encoding="utf-8")) | {"bos_token_id": eos, "eos_token_id": eos}
        path.write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return directory


# ---------------------------------------------------------------- tokenizer


class GPT2BPETokenizer(BPETokenizer):
    """GPT-2's byte-level BPE from a local ``vocab.json`` + ``merges.txt`` (the ``tokenizers`` library).

    A ``BPETokenizer`` of ``ftransformer.data`` (same interface; saved with a checkpoint as
    ``tokenizer.json``). Every string encodes and ``decode(encode(s)) == s``. ``<|endoftext|>`` in the
    vocabulary is a special token, as in GPT-2: the text ``"<|endoftext|>"`` encodes to its one id.
    """

    EOS = "<|endoftext|>"

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> "GPT2BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for path in (vocab_file, merges_file):
            if not Path(path).is_file():
                raise ValueError(f"tokenizer file {path} does not exist")
        try:
            model = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as e:  # the Rust side raises its own exception types for malformed files
            raise ValueError(f"cannot read GPT-2 BPE files {vocab_file} / {merges_file}: {e}") from None
        tok = Tokenizer(model)
        # GPT-2 marks a word's leading space inside the token, and adds none before the first word.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(cls.EOS) is not None:
            tok.add_special_tokens([cls.EOS])
        return cls(tok)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GPT2BPETokenizer":
        """From ``directory/vocab.json`` and ``directory/merges.txt``."""
        directory = Path(directory)
        return cls.from_files(directory / "vocab.json", directory / "merges.txt")

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.EOS)

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer(vocab_size={self.vocab_size})"


def save_vocab_merges(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write a byte-level BPE tokenizer as GPT-2's ``vocab.json`` + ``merges.txt``."""
    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(
            f"a GPT-2 directory holds a byte-level BPE tokenizer (vocab.json + merges.txt), got {tokenizer!r}"
        )
    tokenizer.tokenizer.model.save(str(directory))


def load_hf_gpt2_tokenizer(directory: str | os.PathLike) -> GPT2BPETokenizer | None:
    """The directory's GPT-2 tokenizer if it has ``vocab.json`` and ``merges.txt``, else None."""
    directory = Path(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return GPT2BPETokenizer.load(directory)
    return None


def load_hf_gpt2_dir(
    directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[Config, dict, GPT2BPETokenizer | None]:
    """``(cfg, params, tokenizer)`` from a Hugging Face GPT-2 directory; tokenizer None without vocab/merges."""
    cfg, params = load_hf_gpt2(directory, dtype=dtype, device=device)
    tokenizer = load_hf_gpt2_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{directory}: tokenizer has vocab_size={tokenizer.vocab_size} "
            f"but the model has vocab_size={cfg.vocab_size}"
        )
    return cfg, params, tokenizer


__all__ = [
    "GPT2BPETokenizer", "config_to_hf", "load_hf_gpt2",
    "load_hf_gpt2_dir", "load_hf_gpt2_tokenizer", "save_hf_gpt2", "save_vocab_merges", "to_hf_gpt2",
]
