"""Hugging Face GPT-2 weights in and out, and GPT-2's byte-level BPE tokenizer from local files.

GPT-2 and ftransformer store the same model in nearly the same way. GPT-2's projections are ``Conv1D``
modules whose weight is ``[d_in, d_out]`` -- transposed relative to ``nn.Linear`` but exactly the order
``linear`` uses here -- and ``c_attn`` is the fused q|k|v projection like ``w_qkv``. So every tensor
maps one to one with no copy, except an untied ``lm_head`` (an ``nn.Linear``, ``[vocab, d_model]``)
which is transposed into ``unembed.w``.

::

    HF key (prefix "transformer." optional)   ftransformer path
    wte.weight                                embed.tokens
    wpe.weight                                embed.positions
    h.{i}.ln_1.weight / .bias                 blocks.{i}.ln1.scale / .bias
    h.{i}.attn.c_attn.weight / .bias          blocks.{i}.attn.w_qkv / .b_qkv
    h.{i}.attn.c_proj.weight / .bias          blocks.{i}.attn.w_o / .b_o
    h.{i}.ln_2.weight / .bias                 blocks.{i}.ln2.scale / .bias
    h.{i}.mlp.c_fc.weight / .bias             blocks.{i}.mlp.w_in / .b_in
    h.{i}.mlp.c_proj.weight / .bias           blocks.{i}.mlp.w_out / .b_out
    ln_f.weight / .bias                       ln_f.scale / .bias
    lm_head.weight                            unembed.w (transposed; untied models only)

Only the architecture GPT-2 can express round-trips: learned positions, pre-LN LayerNorm with biases,
a GELU MLP, full multi-head attention. Anything else is refused with a ``ValueError`` naming the field.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ftransformer import tree
from ftransformer.config import Config
from ftransformer.data import BPETokenizer, Tokenizer

# HF activation names -> ftransformer's. "gelu_new", "gelu_fast" and the pytorch tanh variants are all
# the tanh approximation (they differ only in rounding); "gelu" is the exact erf form.
_ACTIVATIONS_IN = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}
_ACTIVATIONS_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# Buffers older transformers versions saved next to the weights (the causal mask and the -1e4 fill
# value). They hold no learned numbers; ftransformer builds its mask on the fly.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# Every released GPT-2 (small, medium, large, xl) has 64-wide heads; a bare state dict does not record
# the head count, so it is inferred from this when no config is given.
_GPT2_HEAD_DIM = 64

# Looked for in this order; an index names the shards of a checkpoint split over several files.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


# ---------------------------------------------------------------- configs


def config_from_hf(hf_config: Mapping | object) -> Config:
    """A ``Config`` from a Hugging Face GPT-2 config (``config.json`` as a dict, or a ``GPT2Config``).

    ftransformer has one dropout rate where GPT-2 has three; ``resid_pdrop`` is used.
    """
    d = _as_dict(hf_config)
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config has model_type={model_type!r}; expected 'gpt2'")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in d]
    if missing:
        raise ValueError(
            f"GPT-2 config is missing {missing}; expected vocab_size, n_positions, n_embd, n_layer, n_head"
        )
    activation = d.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS_IN:
        raise ValueError(
            f"GPT-2 config has activation_function={activation!r}, which ftransformer cannot express; "
            f"supported: {', '.join(map(repr, _ACTIVATIONS_IN))}"
        )
    # Flags that change the computation in ways ftransformer's attention does not model.
    unsupported = {
        "scale_attn_weights": (True, "attention scores are always scaled by 1/sqrt(head_dim)"),
        "scale_attn_by_inverse_layer_idx": (False, "attention is never scaled by 1/(layer index + 1)"),
        "add_cross_attention": (False, "a decoder-only model has no cross-attention"),
    }
    for key, (expected, why) in unsupported.items():
        if key in d and bool(d[key]) != expected:
            raise ValueError(f"GPT-2 config has {key}={d[key]!r} but ftransformer needs {expected} ({why})")
    n_embd = d["n_embd"]
    n_inner = d.get("n_inner")
    return Config.from_flat(
        vocab_size=d["vocab_size"],
        d_model=n_embd,
        n_heads=d["n_head"],
        n_layers=d["n_layer"],
        d_ff=4 * n_embd if n_inner is None else n_inner,
        max_seq_len=d["n_positions"],
        dropout=float(d.get("resid_pdrop", 0.1)),
        bias=True,
        norm="layernorm",
        norm_position="pre",
        positional="learned",
        activation=_ACTIVATIONS_IN[activation],
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        init_std=float(d.get("initializer_range", 0.02)),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
    )


def check_gpt2_compatible(cfg: Config) -> None:
    """Raise ``ValueError`` naming the first ``Config`` field GPT-2's architecture cannot represent."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a Config, got {type(cfg).__name__}")
    rules = (
        ("positional", "learned", "GPT-2 has a learned position table (wpe)"),
        ("norm", "layernorm", "GPT-2 uses LayerNorm"),
        ("norm_position", "pre", "GPT-2 normalises before each sublayer (pre-LN) and has a final ln_f"),
        ("bias", True, "GPT-2 has biases in every projection and LayerNorm"),
        ("n_kv_heads", cfg.n_heads, "GPT-2 has one key/value head per query head (no GQA/MQA)"),
        ("mlp", True, "every GPT-2 block has an MLP"),
    )
    for field, expected, why in rules:
        got = cfg.to_flat()[field]
        if got != expected:
            raise ValueError(f"Config.{field}={got!r} cannot be expressed in GPT-2: expected {expected!r} ({why})")
    if cfg.activation not in _ACTIVATIONS_OUT:
        raise ValueError(
            f"Config.activation={cfg.activation!r} cannot be expressed in GPT-2: expected one of "
            f"{', '.join(map(repr, _ACTIVATIONS_OUT))} (GPT-2's MLP is c_fc -> GELU -> c_proj)"
        )


def config_to_hf(cfg: Config) -> dict:
    """The Hugging Face ``config.json`` contents (a dict ``GPT2Config(**d)`` accepts) for ``cfg``."""
    check_gpt2_compatible(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": _ACTIVATIONS_OUT[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm.eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.embeddings.tie,
        # GPT-2's <|endoftext|> is its last id, 50256; another vocabulary has no known end token.
        "bos_token_id": 50256 if cfg.vocab_size == 50257 else None,
        "eos_token_id": 50256 if cfg.vocab_size == 50257 else None,
    }


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a GPT-2 config dict or an object with to_dict(), got {type(hf_config).__name__}")


def _infer_config(sd: Mapping[str, Tensor]) -> Config:
    """Sizes from the tensors' shapes; the head count assumes GPT-2's 64-wide heads."""
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
    tied = "lm_head.weight" not in sd or _same_values(sd["lm_head.weight"], sd["wte.weight"])
    return Config.from_flat(
        vocab_size=vocab,
        d_model=d_model,
        n_heads=d_model // _GPT2_HEAD_DIM,
        n_layers=n_layers,
        d_ff=sd["h.0.mlp.c_fc.weight"].shape[1],
        max_seq_len=sd["wpe.weight"].shape[0],
        activation="gelu_tanh",
        tie_embeddings=tied,
    )


def _same_values(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b)))


# ---------------------------------------------------------------- key table


def _table(cfg: Config) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """``(hf_key, ft_path, hf_shape, transposed)`` for every tensor of a GPT-2 with this config."""
    d, ff, qkv = cfg.d_model, cfg.d_ff, 3 * cfg.d_model
    rows = [
        ("wte.weight", "embed.tokens", (cfg.vocab_size, d), False),
        ("wpe.weight", "embed.positions", (cfg.max_seq_len, d), False),
    ]
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        rows += [
            (h + "ln_1.weight", b + "ln1.scale", (d,), False),
            (h + "ln_1.bias", b + "ln1.bias", (d,), False),
            (h + "attn.c_attn.weight", b + "attn.w_qkv", (d, qkv), False),
            (h + "attn.c_attn.bias", b + "attn.b_qkv", (qkv,), False),
            (h + "attn.c_proj.weight", b + "attn.w_o", (d, d), False),
            (h + "attn.c_proj.bias", b + "attn.b_o", (d,), False),
            (h + "ln_2.weight", b + "ln2.scale", (d,), False),
            (h + "ln_2.bias", b + "ln2.bias", (d,), False),
            (h + "mlp.c_fc.weight", b + "mlp.w_in", (d, ff), False),
            (h + "mlp.c_fc.bias", b + "mlp.b_in", (ff,), False),
            (h + "mlp.c_proj.weight", b + "mlp.w_out", (ff, d), False),
            (h + "mlp.c_proj.bias", b + "mlp.b_out", (d,), False),
        ]
    rows += [("ln_f.weight", "ln_f.scale", (d,), False), ("ln_f.bias", "ln_f.bias", (d,), False)]
    if not cfg.embeddings.tie:
        rows.append(("lm_head.weight", "unembed.w", (cfg.vocab_size, d), True))
    return rows


def _normalise_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys without the ``transformer.`` prefix (GPT2LMHeadModel has it, GPT2Model does not), buffers dropped."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"state dict entries must be str -> Tensor, got {key!r} -> {type(value).__name__}")
        name = key.removeprefix("transformer.")
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        if name in out:
            raise ValueError(f"state dict has {name!r} both with and without the 'transformer.' prefix")
        out[name] = value
    return out


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
            ``pytorch_model.bin``, or a sharded index of either), or a state dict of a
            ``GPT2LMHeadModel`` / ``GPT2Model`` (keys with or without ``transformer.``).
        config: overrides the directory's ``config.json``; for a bare state dict, without it the sizes
            are inferred from the shapes and the head count from GPT-2's 64-wide heads. A ``Config``,
            a ``config.json`` dict, or a ``transformers.GPT2Config``.
        dtype: cast every floating-point tensor (None keeps the stored dtype).
        device: move every tensor (None keeps them on the CPU).

    Returns:
        The config and the parameter tree ``init_params`` would build for it. Missing, unexpected
        or mis-shaped tensors raise ``ValueError`` naming the key (and both shapes).
    """
    state_dict, config = _source(path_or_state_dict, config)
    sd = _normalise_keys(state_dict)
    cfg = _resolve_config(sd, config)
    check_gpt2_compatible(cfg)
    flat = _params_by_path(sd, cfg)
    _check_no_extra_keys(sd, cfg)
    params = tree.unflatten_paths(flat)
    if dtype is not None or device is not None:
        params = tree.to(params, dtype=dtype, device=device)
    return cfg, params


def _source(path_or_state_dict, config) -> tuple[Mapping[str, Tensor], Any]:
    """The state dict, and the config to use (a directory's ``config.json`` unless one is given)."""
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        return path_or_state_dict, config
    directory = Path(path_or_state_dict)
    state_dict = _read_weights(directory)
    return state_dict, _read_config_json(directory) if config is None else config


def _resolve_config(sd: Mapping[str, Tensor], config) -> Config:
    if config is None:
        return _infer_config(sd)
    return config if isinstance(config, Config) else config_from_hf(config)


def _params_by_path(sd: Mapping[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """``{param path: tensor}`` for every row of the table, checked for presence and shape."""
    flat: dict[str, Tensor] = {}
    missing = []
    for hf_key, path, shape, transposed in _table(cfg):
        if hf_key not in sd:
            missing.append(f"{hf_key!r} (expected shape {shape})")
            continue
        tensor = sd[hf_key]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{hf_key!r} has shape {tuple(tensor.shape)} but the config expects {shape} "
                f"(vocab={cfg.vocab_size}, d_model={cfg.d_model}, d_ff={cfg.d_ff}, max_seq={cfg.max_seq_len})"
            )
        # .T of an nn.Linear weight is a view; contiguous() gives unembed.w its own [d_model, vocab] layout.
        flat[path] = tensor.T.contiguous() if transposed else tensor
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} GPT-2 tensor(s): {_first_few(missing)}")
    return flat


def _check_no_extra_keys(sd: Mapping[str, Tensor], cfg: Config) -> None:
    """Every key is one the table reads, or a ``lm_head.weight`` equal to the tied ``wte.weight``."""
    expected_keys = {row[0] for row in _table(cfg)}
    if cfg.embeddings.tie and "lm_head.weight" in sd:
        expected_keys.add("lm_head.weight")
        if not _same_values(sd["lm_head.weight"], sd["wte.weight"]):
            raise ValueError(
                "lm_head.weight differs from wte.weight but the config ties them (tie_word_embeddings=True); "
                "pass a config with tie_word_embeddings=False / tie_embeddings=False"
            )
    unexpected = sorted(set(sd) - expected_keys)
    if unexpected:
        raise ValueError(
            f"state dict has {len(unexpected)} key(s) a GPT-2 LM with n_layers={cfg.n_layers} does not have: "
            f"{_first_few([repr(k) for k in unexpected])}"
        )


def _first_few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json (a Hugging Face GPT-2 directory needs one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_weights(directory: Path) -> dict[str, Tensor]:
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory (expected a Hugging Face GPT-2 model directory)")
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path} has no 'weight_map' (expected a sharded checkpoint index)")
            sd: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_read_file(directory / shard))
            return sd
        return _read_file(path)
    raise ValueError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _read_file(path: Path) -> dict[str, Tensor]:
    """The tensors of one weights file; a damaged file raises ``ValueError`` naming it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # safetensors, pickle and torch each raise their own types
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- export


def to_hf_gpt2(params: dict, cfg: Config) -> dict[str, Tensor]:
    """The ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed keys, plus ``lm_head.weight``).

    ``GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg))).load_state_dict(sd, strict=True)`` accepts it.
    Tensors are shared with ``params`` where no transpose is needed (a tied ``lm_head.weight`` is the
    token embedding itself, as in the HF model). Configs GPT-2 cannot express raise ``ValueError``.
    """
    check_gpt2_compatible(cfg)
    if not isinstance(params, dict):
        raise TypeError(f"params must be the dict init_params returns, got {type(params).__name__}")
    flat = tree.flatten_with_paths(params)
    sd: dict[str, Tensor] = {}
    for hf_key, path, shape, transposed in _table(cfg):
        if path not in flat:
            raise ValueError(f"params has no {path!r} (needed for {hf_key!r}, shape {shape})")
        tensor = flat[path].T.contiguous() if transposed else flat[path]
        if tuple(tensor.shape) != shape:
            got = tuple(flat[path].shape)
            want = tuple(reversed(shape)) if transposed else shape
            raise ValueError(f"params {path!r} has shape {got} but the config expects {want}")
        sd[hf_key if hf_key == "lm_head.weight" else "transformer." + hf_key] = tensor
    known = {row[1] for row in _table(cfg)}
    extra = sorted(set(flat) - known)
    if extra:
        raise ValueError(f"params has entries GPT-2 has no place for: {extra[:5]}")
    if cfg.embeddings.tie:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def save_hf_gpt2(
    params: dict, cfg: Config, directory: str | os.PathLike, *, tokenizer: Tokenizer | None = None
) -> Path:
    """Write a directory ``transformers.GPT2LMHeadModel.from_pretrained`` (and ``load_hf_gpt2``) reads.

    ``config.json`` + ``model.safetensors``, and ``vocab.json`` + ``merges.txt`` for a byte-level BPE
    ``tokenizer`` (a ``GPT2BPETokenizer`` or a ``BPETokenizer`` trained by ``ftransformer.data``).
    Returns the directory.
    """
    from safetensors.torch import save_file

    if tokenizer is not None and not isinstance(tokenizer, BPETokenizer):
        raise ValueError(
            f"a GPT-2 directory holds a byte-level BPE tokenizer (vocab.json + merges.txt), got {tokenizer!r}"
        )
    sd = to_hf_gpt2(params, cfg)
    if cfg.embeddings.tie:
        # safetensors refuses two names for one tensor; HF re-ties lm_head to wte on load.
        del sd["lm_head.weight"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    if tokenizer is not None:
        save_vocab_merges(tokenizer, directory)
        eos = tokenizer.tokenizer.token_to_id(GPT2BPETokenizer.EOS)
        if eos is not None:
            hf["bos_token_id"] = hf["eos_token_id"] = eos
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
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
    "GPT2BPETokenizer", "check_gpt2_compatible", "config_from_hf", "config_to_hf", "load_hf_gpt2",
    "load_hf_gpt2_dir", "load_hf_gpt2_tokenizer", "save_hf_gpt2", "save_vocab_merges", "to_hf_gpt2",
]
