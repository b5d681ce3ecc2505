"""Gemma 1, 2 and 3 as ``Config`` choices (``model_type`` ``gemma``, ``gemma2``, ``gemma3_text``); tensor
names as Llama's.

=====================================  =====================================================================
``config.json`` key / behaviour        ``Config`` choice
=====================================  =====================================================================
RMSNorm ``x_hat * (1 + w)`` in fp32    ``norm_unit_offset=True`` (norm weights stored around 0)
embeddings times ``sqrt(hidden_size)``  ``embed_scale=True`` (the constant rounded to the activation dtype)
``hidden_act`` / ``hidden_activation``  ``activation="geglu_tanh"`` (the tanh GELU gates the up projection)
gemma2: four norms per layer           ``norm_position="sandwich"`` (``ln1``, ``ln1_post``, ``ln2``, ``ln2_post``)
``attn_logit_softcapping``             ``Attention(softcap=...)``
``final_logit_softcapping``            ``logit_softcap``
``query_pre_attn_scalar``              ``Attention(scale=query_pre_attn_scalar ** -0.5)``
``sliding_window`` + ``layer_types``   per-layer ``Attention(window=...)``
gemma3: ``q_norm`` / ``k_norm``        ``Attention(qk_norm=True)`` (per head, ``1 + w`` like every norm here)
gemma3: per-layer-type rope            ``window_rope_base`` (the sliding layers' base, unscaled); the global
                                       layers' ``rope_theta`` and scaling -> ``rope_base``, ``rope_scaling``
=====================================  =====================================================================

The multimodal ``gemma3`` checkpoints (``Gemma3ForConditionalGeneration``: a vision tower, the text
model's tensors under ``language_model``) are not read; their text-only ``gemma3_text`` models are.
"""

from collections.abc import Mapping

from ftransformer.config import Attention, Config, flat_path
from ftransformer.interop.families import common_hf, rope_from_hf

# Gemma 1's released configs say "gelu" and mean the tanh approximation (transformers rewrites it so).
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(hf: Mapping, family: str) -> Config:
    """A ``Config`` from the ``config.json`` of ``family``: ``gemma``, ``gemma2`` or ``gemma3_text``."""
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{family} config.json is missing {missing}; expected all of {list(_REQUIRED)}")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in TANH_GELUS or (family == "gemma2" and act == "gelu"):
        raise ValueError(f"{family} config.json has hidden activation {act!r}; supported: 'gelu_pytorch_tanh' (GeGLU)")
    if hf.get("attention_bias", False):
        raise ValueError(f"{family} config.json has attention_bias=True; supported: False")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{family} config.json has use_bidirectional_attention=True; supported: causal attention only")
    n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim", d_model // n_heads)
    rope_base, rope_scaling, window_rope_base = _ropes(hf, family)
    later = dict(
        norm_position="sandwich", logit_softcap=hf.get("final_logit_softcapping"), window_rope_base=window_rope_base,
        attention=Attention(
            head_dim=head_dim, scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            softcap=hf.get("attn_logit_softcapping"), window=_windows(hf, family), qk_norm=family == "gemma3_text",
        ),
    ) if family != "gemma" else dict(norm_position="pre", attention=Attention(head_dim=head_dim))
    return Config.from_flat(
        vocab_size=hf["vocab_size"], d_model=d_model, n_heads=n_heads, n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 8192),
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, dropout=0.0, bias=False, norm="rmsnorm",
        positional="rope", activation="geglu_tanh", tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=rope_base, rope_scaling=rope_scaling, norm_unit_offset=True, embed_scale=True, **later,
    )


def _ropes(hf: Mapping, family: str) -> tuple[float, object, float | None]:
    """``(rope_base, rope_scaling, window_rope_base)``: Gemma 3's per-layer-type ``rope_parameters`` (or the
    older ``rope_theta`` + ``rope_local_base_freq`` + ``rope_scaling``), one rope for the others."""
    if family != "gemma3_text":
        return (*rope_from_hf(hf, family), None)
    params = hf.get("rope_parameters")
    if params is not None and "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {"rope_type": "default"}
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3_text config.json scales the sliding layers' rope ({local}); supported: 'default'")
    return (*rope_from_hf({"rope_parameters": full}, family), float(local.get("rope_theta", 1e4)))


def _windows(hf: Mapping, family: str) -> int | tuple[int | None, ...] | None:
    """The windows: ``sliding_window`` on the ``layer_types`` that say so (default: Gemma 2 every other
    layer from the first, Gemma 3 all but every sixth)."""
    n_layers, window = hf["num_hidden_layers"], hf.get("sliding_window")
    period = 2 if family == "gemma2" else 6
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
    ]
    known = ("full_attention", "sliding_attention")
    if len(types) != n_layers or any(t not in known for t in types):
        raise ValueError(f"{family} config.json has layer_types={types!r}; expected {n_layers} of {known}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return None if all(w is None for w in windows) else windows


def expresses(cfg: Config) -> bool:
    """Whether ``cfg`` is meant as a Gemma (its norm scales by ``1 + w``); ``family_for`` says which, or why none."""
    return cfg.norm.unit_offset


def family_for(cfg: Config) -> str:
    """``gemma2`` for the sandwich layout, ``gemma`` for pre-norm; ``ValueError`` naming what neither expresses."""
    needs = dict(positional="rope", activation="geglu_tanh", bias=False, embed_scale=True, mlp=True,
                 residual="sequential")
    for field, expected in needs.items():
        if cfg.to_flat()[field] != expected:
            raise ValueError(f"Config.{flat_path(field)}={cfg.to_flat()[field]!r} cannot be expressed in gemma: expected {expected!r}")
    a = cfg.attention
    if a.qkv_bias or cfg.positional.rotary_dim is not None:
        raise ValueError(f"Config.attention={a} cannot be expressed in gemma: expected no qkv_bias, rotary_dim")
    family = "gemma3_text" if a.qk_norm else "gemma2"
    if cfg.layout.norm_position == "sandwich":
        if isinstance(a.window, int) or len({w for w in a.window or () if w is not None}) > 1:
            raise ValueError(f"Config.attention.window={a.window} cannot be expressed in {family}: one size, per layer")
        if family == "gemma2" and cfg.positional.window_base is not None:
            raise ValueError("Config.positional.window_base cannot be expressed in gemma2 (one rope); gemma3 needs qk_norm=True")
        return family
    if a.qk_norm:
        raise ValueError("Config.attention.qk_norm=True cannot be expressed in gemma: gemma3 needs norm_position='sandwich'")
    if cfg.layout.norm_position != "pre" or a.scale is not None or a.softcap is not None or a.window is not None or cfg.embeddings.logit_softcap:
        raise ValueError(
            f"Config.layout.norm_position={cfg.layout.norm_position!r} with attention {a} and logit_softcap={cfg.embeddings.logit_softcap} "
            "cannot be expressed in gemma (pre-norm, no scale, soft-caps or windows) nor gemma2 (sandwich norms)"
        )
    return "gemma"


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` keys (all but ``model_type`` and ``architectures``) that ``transformers`` reads
    back as ``cfg``'s Gemma model."""
    family = family_for(cfg)
    hf = common_hf(cfg) | {"attention_bias": False}
    if family == "gemma":
        return hf | {"hidden_act": "gelu_pytorch_tanh"}
    a = cfg.attention
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    scalar = cfg.head_dim if a.scale is None else a.scale**-2
    if float(round(scalar)) ** -0.5 == (a.scale or cfg.head_dim**-0.5):
        scalar = round(scalar)  # Gemma's own configs hold integers
    if family == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.positional.window_base or cfg.positional.base}
        hf["rope_parameters"] = {"full_attention": hf["rope_parameters"], "sliding_attention": local}
    return hf | {
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": a.softcap, "final_logit_softcapping": cfg.embeddings.logit_softcap,
        "sliding_window": next((w for w in windows if w is not None), None),
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
    }
