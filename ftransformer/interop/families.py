"""The Llama-like Hugging Face families -- Llama, Mistral, Qwen2, Qwen3 -- as ``Config`` choices and tensor names.

Each family is the same pre-norm RMSNorm / rotary / SwiGLU decoder; a family only switches on features,
and ``Config`` names the features, never the family:

============  =========================================================================================
family        features it adds (``config.json`` key -> ``Config`` choice)
============  =========================================================================================
``llama``     ``rope_parameters`` ``linear`` / ``llama3`` -> ``rope_scaling``; ``attention_bias`` and
              ``mlp_bias`` together -> ``bias``
``mistral``   ``sliding_window`` -> ``Attention(window=...)`` on every layer
``qwen2``     q/k/v biases -> ``Attention(qkv_bias=True)``; ``layer_types`` -> per-layer windows
``qwen3``     ``q_norm`` / ``k_norm`` -> ``Attention(qk_norm=True)``; ``head_dim`` -> ``Attention(head_dim=...)``
``olmo2``     norms after the sublayers, ``x + norm(f(x))`` -> ``norm_position="output"``; ``q_norm`` /
              ``k_norm`` over the whole projections -> ``Attention(qk_norm=True, qk_norm_over="projection")``
============  =========================================================================================

Every family: ``head_dim``, ``rope_theta`` -> ``rope_base``, RMSNorm in Hugging Face's cast order
(``norm_upcast=True``). Anything else a ``config.json`` asks for is refused by name, never approximated.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ftransformer.config import Attention, Config, Embeddings, Layout, Norm, Positional, RopeScaling, flat_path

# Families that store q/k/v as one qkv_proj and the SwiGLU's two inputs as one gate_up_proj.
FUSED = ("phi3",)
ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# ---------------------------------------------------------------- config.json -> Config


def config_from_hf(hf: Mapping, family: str) -> Config:
    """A ``Config`` from the ``config.json`` (as a dict) of ``family``, one of the Llama-like families.

    Dropout is 0 (``attention_dropout`` drops attention only, ftransformer's ``dropout`` also drops the
    residual stream: set it with ``cfg.replace(dropout=...)`` to train).
    """
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{family} config.json is missing {missing}; expected all of {list(_REQUIRED)}")
    _refuse_unsupported(hf, family)
    n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    rope_base, rope_scaling = rope_from_hf(hf, family)
    rotary_dim = _rotary_dim(hf, family, head_dim or d_model // n_heads)
    olmo2 = family == "olmo2"
    return Config(
        vocab_size=hf["vocab_size"], d_model=d_model, n_heads=n_heads, n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, dropout=0.0, bias=_all_biases(hf, family),
        activation="swiglu", init_std=float(hf.get("initializer_range", 0.02)),
        norm=Norm("rmsnorm", eps=float(hf.get("rms_norm_eps", 1e-6)),
                  float32="normalize_and_scale" if olmo2 else "normalize"),
        positional=Positional("rope", base=rope_base, scaling=rope_scaling, rotary_dim=rotary_dim, float32=olmo2),
        layout=Layout(norm_position="output" if olmo2 else "pre"),
        embeddings=Embeddings(tie=bool(hf.get("tie_word_embeddings", False))),
        attention=Attention(
            head_dim=None if head_dim in (None, d_model // n_heads) and d_model % n_heads == 0 else head_dim,
            qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "olmo2"), window=_windows(hf, family),
            qk_norm_over="projection" if olmo2 else "head",
        ),
    )


def _rotary_dim(hf: Mapping, family: str, head_dim: int) -> int | None:
    """Phi-3's ``partial_rotary_factor`` as ``Positional.rotary_dim`` (None: all of head_dim)."""
    partial = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    if rotary_dim == head_dim:
        return None
    if family != "phi3":
        raise ValueError(f"{family} config.json has partial_rotary_factor={partial}; supported: 1.0 (rotary on all of head_dim)")
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"phi3 config.json rotates int(head_dim={head_dim} * {partial}) = {rotary_dim} channels; expected an even number > 0")
    return rotary_dim


def _refuse_unsupported(hf: Mapping, family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{family} config.json has hidden_act={act!r}; supported: 'silu' (SwiGLU)")


def _all_biases(hf: Mapping, family: str) -> bool:
    """``bias`` for the families whose biases are a switch: all projections biased, or none."""
    attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "qwen3" and attn:
        raise ValueError("qwen3 config.json has attention_bias=True (q/k/v/o biased, MLP not); supported: False")
    if attn != mlp:
        raise ValueError(
            f"{family} config.json has attention_bias={attn} and mlp_bias={mlp}; supported: both False, or "
            "both True (every projection biased)"
        )
    return attn


def rope_from_hf(hf: Mapping, family: str) -> tuple[float, RopeScaling | None]:
    """``(rope_base, rope_scaling)`` from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is not None and "rope_type" not in params and "rope_theta" not in params:
        raise ValueError(
            f"{family} config.json has per-layer-type rope_parameters {sorted(params)}; supported: one rope for all layers"
        )
    scaling = dict(params if params is not None else hf.get("rope_scaling") or {})
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"{family} config.json asks for rope type {kind!r}, which is not implemented yet; "
            f"supported: {', '.join(map(repr, ROPE_TYPES))}"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    return theta, RopeScaling(
        "llama3", float(scaling["factor"]), low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def _windows(hf: Mapping, family: str) -> int | tuple[int | None, ...] | None:
    """The sliding window(s): Mistral's one for all layers, or Qwen's per ``layer_types``."""
    if family in ("llama", "olmo2"):
        return None
    window = hf.get("sliding_window")
    if family in ("mistral", "phi3"):
        return window
    n_layers = hf["num_hidden_layers"]
    if not hf.get("use_sliding_window", False):
        window = None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", n_layers) else "full_attention"
        for i in range(n_layers)
    ]
    known = ("full_attention", "sliding_attention")
    if len(types) != n_layers or any(t not in known for t in types):
        raise ValueError(f"{family} config.json has layer_types={types!r}; expected {n_layers} of {known}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    if all(w is None for w in windows):
        return None
    return windows[0] if len(set(windows)) == 1 else windows


# ---------------------------------------------------------------- Config -> config.json


def family_for(cfg: Config) -> str:
    """The Llama-like family that can express ``cfg`` (its features decide), or a ``ValueError`` naming why none can."""
    needs = dict(positional="rope", norm="rmsnorm", activation="swiglu", mlp=True,
                 residual="sequential", embed_scale=False, logit_softcap=None)
    if cfg.layout.norm_position == "output" or cfg.attention.qk_norm_over == "projection":
        return _olmo2(cfg, needs | {"norm_scale_in_float32": True, "rope_in_float32": True})
    needs |= {"norm_position": "pre", "norm_scale_in_float32": False, "rope_in_float32": False}
    for field, expected in needs.items():
        if cfg.to_flat()[field] != expected:
            raise ValueError(
                f"Config.{flat_path(field)}={cfg.to_flat()[field]!r} has no Hugging Face family here: expected {expected!r} "
                "(the Llama-like families; GPT-2 needs learned positions and LayerNorm, GPT-NeoX rotary positions "
                "and LayerNorm, Gemma norm_unit_offset=True)"
            )
    a = cfg.attention
    if a.scale is not None or a.softcap is not None:
        raise ValueError(f"Config.attention={a} has a scale or softcap, which no Llama-like family has")
    per_layer = isinstance(a.window, tuple)
    if cfg.positional.rotary_dim is not None:
        return _phi3(cfg)
    if a.qk_norm:
        family = "qwen3"
    elif a.qkv_bias:
        family = "qwen2"
    elif a.window is not None and not per_layer:
        family = "mistral"
    else:
        family = "llama"
    if family in ("qwen3", "qwen2", "mistral") and cfg.bias:
        raise ValueError(f"Config.bias=True (every projection biased) cannot be expressed in {family}: expected False")
    if family == "qwen3" and a.qkv_bias:
        raise ValueError("Config.attention has qk_norm and qkv_bias together, which no supported family has")
    if family == "llama" and per_layer:
        raise ValueError(
            "Config.attention.window per layer needs qwen2 (qkv_bias=True) or qwen3 (qk_norm=True); llama has no windows"
        )
    if per_layer and len({w for w in a.window if w is not None}) > 1:
        raise ValueError(f"Config.attention.window={a.window} mixes window sizes; {family} has one sliding_window")
    return family


def _phi3(cfg: Config) -> str:
    """``phi3`` for partial rotary (the one Llama-like family with it), or why it cannot express ``cfg``."""
    a = cfg.attention
    if cfg.bias or a.qk_norm or a.qkv_bias or isinstance(a.window, tuple) or cfg.head_dim != cfg.d_model // cfg.n_heads:
        raise ValueError(
            f"Config.positional.rotary_dim={cfg.positional.rotary_dim} needs phi3, which cannot express bias={cfg.bias}, attention={a}: "
            "expected no biases, no q/k norm, one window for all layers, head_dim = d_model / n_heads"
        )
    if int(cfg.head_dim * (cfg.positional.rotary_dim / cfg.head_dim)) != cfg.positional.rotary_dim:
        raise ValueError(f"Config.positional.rotary_dim={cfg.positional.rotary_dim} is not int(head_dim * a float) in phi3")
    return "phi3"


def _olmo2(cfg: Config, needs: dict) -> str:
    """``olmo2`` when ``cfg`` is OLMo-2's layout (norms after the sublayers, q/k norms over whole projections)."""
    a = cfg.attention
    needs = needs | dict(norm_position="output", bias=False, head_dim=cfg.d_model // cfg.n_heads, attention=dataclasses.replace(
        a, qk_norm=True, qk_norm_over="projection", qkv_bias=False, window=None, scale=None, softcap=None), rotary_dim=None)
    for field, expected in needs.items():
        if cfg.to_flat()[field] != expected:
            raise ValueError(
                f"Config.{flat_path(field)}={cfg.to_flat()[field]!r} cannot be expressed in olmo2 (norm_position='output' or "
                f"qk_norm_over='projection'): expected {expected!r}"
            )
    return "olmo2"


def common_hf(cfg: Config) -> dict:
    """The ``config.json`` keys every family with Llama's tensor names spells the same way."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm.eps, "tie_word_embeddings": cfg.embeddings.tie,
        "rope_parameters": rope_parameters(cfg), "attention_dropout": 0.0,
    }


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` keys (all but ``model_type`` and ``architectures``, which the registry adds)
    that ``transformers`` reads back as ``cfg``'s model."""
    family = family_for(cfg)
    hf = common_hf(cfg) | {"hidden_act": "silu"}
    if family == "llama":
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if family in ("qwen3", "olmo2"):
        hf["attention_bias"] = False
    if family == "phi3":
        hf["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        hf["sliding_window"] = cfg.attention.window
        hf["pad_token_id"] = None  # transformers' default (32000) is an embedding row only Phi-3's own vocabulary has
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    if family == "mistral":
        hf["sliding_window"] = windows[0]
    elif family in ("qwen2", "qwen3"):
        sliding = [w for w in windows if w is not None]
        hf.update(
            use_sliding_window=bool(sliding), sliding_window=sliding[0] if sliding else None,
            max_window_layers=cfg.n_layers,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        )
    return hf


def rope_parameters(cfg: Config) -> dict:
    """``config.json``'s ``rope_parameters`` for ``cfg``'s rope."""
    s = cfg.positional.scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": cfg.positional.base}
    if s.kind == "linear":
        return {"rope_type": "linear", "rope_theta": cfg.positional.base, "factor": s.factor}
    return {
        "rope_type": "llama3", "rope_theta": cfg.positional.base, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len,
    }


# ---------------------------------------------------------------- tensor names


# The norms after the attention sublayer, by Config.layout.norm_position: (Hugging Face name, params name).
NORMS_AFTER_ATTN = {
    "pre": (("post_attention_layernorm", "ln2"),),
    "sandwich": (("post_attention_layernorm", "ln1_post"), ("pre_feedforward_layernorm", "ln2"),
                 ("post_feedforward_layernorm", "ln2_post")),
    "output": (("post_attention_layernorm", "ln1"), ("post_feedforward_layernorm", "ln2")),
}


@dataclass(frozen=True)
class Slot:
    """One Hugging Face tensor and where it lives in the parameter tree.

    ``leaf[..., cols[0]:cols[1]]`` (the whole leaf when ``cols`` is None) equals the HF tensor, transposed
    when ``transpose`` (``nn.Linear`` stores ``[d_out, d_in]``; ``linear`` here takes ``[d_in, d_out]``).
    ``heads``: the HF tensor's first axis is a fused q/k/v interleaved per head, ``(heads qkv head_dim)``,
    where the leaf has ``(qkv heads head_dim)`` (GPT-NeoX). ``rows``: the slot is rows ``rows[0]:rows[1]``
    of the HF tensor (of shape ``hf_shape``), whose other rows other slots fill (Phi-3's ``gate_up_proj``).
    ``tied``: the HF tensor is a copy of a leaf another slot fills (a tied output head): never read, but
    checked equal to the leaf where a checkpoint stores it anyway; the same tensor in a state dict, left
    out of files (safetensors refuses two names for one tensor; ``transformers`` re-ties it on load).
    """

    hf_key: str
    path: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    cols: tuple[int, int] | None = None
    heads: int | None = None
    rows: tuple[int, int] | None = None
    tied: bool = False


def head_slot(hf_key: str, cfg: Config) -> Slot:
    """The output head: ``unembed.w`` (an ``nn.Linear``, transposed), or a tied copy of the embedding."""
    if cfg.embeddings.tie:
        return Slot(hf_key, "embed.tokens", (cfg.vocab_size, cfg.d_model), tied=True)
    return Slot(hf_key, "unembed.w", (cfg.vocab_size, cfg.d_model), True)


def tensor_slots(cfg: Config, family: str | None = None) -> list[Slot]:
    """Every tensor of a Llama-like checkpoint for ``cfg`` (in ``family``'s names; None: ``family_for(cfg)``),
    in the order the model has them."""
    fused = (family or family_for(cfg)) in FUSED
    d, ff, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    cols = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    slots = [Slot("model.embed_tokens.weight", "embed.tokens", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        if cfg.layout.norm_position != "output":
            slots.append(Slot(h + "input_layernorm.weight", b + "ln1.scale", (d,)))
        if fused:
            slots.append(Slot(h + "self_attn.qkv_proj.weight", b + "attn.w_qkv", (q + 2 * kv, d), True))
        for name, (lo, hi) in () if fused else cols.items():
            slots.append(Slot(h + f"self_attn.{name}_proj.weight", b + "attn.w_qkv", (hi - lo, d), True, (lo, hi)))
            if cfg.bias or cfg.attention.qkv_bias:
                slots.append(Slot(h + f"self_attn.{name}_proj.bias", b + "attn.b_qkv", (hi - lo,), False, (lo, hi)))
        slots.append(Slot(h + "self_attn.o_proj.weight", b + "attn.w_o", (d, q), True))
        if cfg.bias:
            slots.append(Slot(h + "self_attn.o_proj.bias", b + "attn.b_o", (d,)))
        if cfg.attention.qk_norm:
            whole = cfg.attention.qk_norm_over == "projection"
            slots += [Slot(h + f"self_attn.{n}_norm.weight", b + f"attn.{n}_norm.scale", (width if whole else hd,))
                      for n, width in (("q", q), ("k", kv))]
        slots += [Slot(h + f"{name}.weight", b + f"{ours}.scale", (d,)) for name, ours in NORMS_AFTER_ATTN[cfg.layout.norm_position]]
        if fused:
            slots += [Slot(h + "mlp.gate_up_proj.weight", b + f"mlp.w_{n}", (2 * ff, d), True, rows=r)
                      for n, r in (("gate", (0, ff)), ("in", (ff, 2 * ff)))]
        for hf_name, ft_name, shape in (("down", "out", (d, ff)),) if fused else (
                ("gate", "gate", (ff, d)), ("up", "in", (ff, d)), ("down", "out", (d, ff))):
            slots.append(Slot(h + f"mlp.{hf_name}_proj.weight", b + f"mlp.w_{ft_name}", shape, True))
            if cfg.bias:
                slots.append(Slot(h + f"mlp.{hf_name}_proj.bias", b + f"mlp.b_{ft_name}", (shape[0],)))
    return [*slots, Slot("model.norm.weight", "ln_f.scale", (d,)), head_slot("lm_head.weight", cfg)]
