"""GPT-2 as ``Config`` choices and tensor names (``model_type`` ``gpt2``).

GPT-2 and ftransformer store the same model in nearly the same way. GPT-2's projections are ``Conv1D``
modules whose weight is ``[d_in, d_out]`` -- transposed relative to ``nn.Linear`` but exactly the order
``linear`` uses here, so those slots are not transposed -- and ``c_attn`` is the fused q|k|v projection
like ``w_qkv``. Only an untied ``lm_head`` (an ``nn.Linear``) is transposed into ``unembed.w``; a tied
one is a copy of ``wte`` (``Slot.tied``). ``GPT2LMHeadModel`` names the body ``transformer.``;
``GPT2Model`` and the hub's own files leave the prefix out (the registry's ``base_prefix``).

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
    lm_head.weight                            unembed.w (transposed; untied models), else a copy of wte

Only the architecture GPT-2 can express round-trips: learned positions, pre-LN LayerNorm with biases,
a GELU MLP, full multi-head attention. Anything else is refused with a ``ValueError`` naming the field.
"""

from collections.abc import Mapping

from ftransformer.config import Config, flat_path
from ftransformer.interop.families import Slot, head_slot

# HF activation names -> ftransformer's. "gelu_new", "gelu_fast" and the pytorch tanh variants are all
# the tanh approximation (they differ only in rounding); "gelu" is the exact erf form.
ACTIVATIONS_IN = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}
ACTIVATIONS_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# Flags that change the computation in ways ftransformer's attention does not model: the value it needs, and why.
_FIXED = {
    "scale_attn_weights": (True, "attention scores are always scaled by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "attention is never scaled by 1/(layer index + 1)"),
    "add_cross_attention": (False, "a decoder-only model has no cross-attention"),
}


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
    if activation not in ACTIVATIONS_IN:
        raise ValueError(
            f"GPT-2 config has activation_function={activation!r}, which ftransformer cannot express; "
            f"supported: {', '.join(map(repr, ACTIVATIONS_IN))}"
        )
    for key, (expected, why) in _FIXED.items():
        if key in d and bool(d[key]) != expected:
            raise ValueError(f"GPT-2 config has {key}={d[key]!r} but ftransformer needs {expected} ({why})")
    n_embd, n_inner = d["n_embd"], d.get("n_inner")
    return Config.from_flat(
        vocab_size=d["vocab_size"], d_model=n_embd, n_heads=d["n_head"], n_layers=d["n_layer"],
        d_ff=4 * n_embd if n_inner is None else n_inner, max_seq_len=d["n_positions"],
        dropout=float(d.get("resid_pdrop", 0.1)), bias=True, norm="layernorm", norm_position="pre",
        positional="learned", activation=ACTIVATIONS_IN[activation],
        tie_embeddings=bool(d.get("tie_word_embeddings", True)), init_std=float(d.get("initializer_range", 0.02)),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
    )


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a GPT-2 config dict or an object with to_dict(), got {type(hf_config).__name__}")


def expresses(cfg: Config) -> bool:
    """Whether ``cfg`` is meant as a GPT-2: learned positions (``check_gpt2_compatible`` says if it can be)."""
    return cfg.positional.kind == "learned"


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
            raise ValueError(f"Config.{flat_path(field)}={got!r} cannot be expressed in GPT-2: expected {expected!r} ({why})")
    if cfg.activation not in ACTIVATIONS_OUT:
        raise ValueError(
            f"Config.activation={cfg.activation!r} cannot be expressed in GPT-2: expected one of "
            f"{', '.join(map(repr, ACTIVATIONS_OUT))} (GPT-2's MLP is c_fc -> GELU -> c_proj)"
        )


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` keys (all but ``model_type`` and ``architectures``) ``GPT2Config`` reads as ``cfg``."""
    check_gpt2_compatible(cfg)
    return {
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
        "activation_function": ACTIVATIONS_OUT[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm.eps, "initializer_range": cfg.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.embeddings.tie,
        # GPT-2's <|endoftext|> is its last id, 50256; another vocabulary has no known end token.
        "bos_token_id": 50256 if cfg.vocab_size == 50257 else None,
        "eos_token_id": 50256 if cfg.vocab_size == 50257 else None,
    }


def tensor_slots(cfg: Config) -> list[Slot]:
    """Every tensor of a ``GPT2LMHeadModel`` for ``cfg``, in the order the model has them."""
    d, ff, t = cfg.d_model, cfg.d_ff, "transformer."
    slots = [Slot(t + "wte.weight", "embed.tokens", (cfg.vocab_size, d)),
             Slot(t + "wpe.weight", "embed.positions", (cfg.max_seq_len, d))]
    for i in range(cfg.n_layers):
        h, b = f"{t}h.{i}.", f"blocks.{i}."
        for hf_name, weight, bias, shape in (
            ("ln_1", "ln1.scale", "ln1.bias", (d,)), ("attn.c_attn", "attn.w_qkv", "attn.b_qkv", (d, 3 * d)),
            ("attn.c_proj", "attn.w_o", "attn.b_o", (d, d)), ("ln_2", "ln2.scale", "ln2.bias", (d,)),
            ("mlp.c_fc", "mlp.w_in", "mlp.b_in", (d, ff)), ("mlp.c_proj", "mlp.w_out", "mlp.b_out", (ff, d)),
        ):  # Conv1D weights are [d_in, d_out], as linear takes them: no transpose
            slots += [Slot(h + hf_name + ".weight", b + weight, shape), Slot(h + hf_name + ".bias", b + bias, shape[-1:])]
    final = [Slot(t + "ln_f.weight", "ln_f.scale", (d,)), Slot(t + "ln_f.bias", "ln_f.bias", (d,))]
    return [*slots, *final, head_slot("lm_head.weight", cfg)]
