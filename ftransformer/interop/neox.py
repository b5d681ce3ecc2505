"""GPT-NeoX / Pythia as ``Config`` choices and tensor names (``model_type`` ``gpt_neox``).

==============================  ============================================================================
``config.json`` key             ``Config`` choice
==============================  ============================================================================
``use_parallel_residual``       ``residual="parallel"`` (``x + attn(ln1 x) + mlp(ln2 x)``), else ``"sequential"``
``rotary_pct`` /                ``Positional(rotary_dim=int(head_dim * pct))``: rotary on the first channels only
``partial_rotary_factor``
``rotary_emb_base`` /           ``rope_base``
``rope_theta``
``hidden_act``                  ``activation``: ``gelu`` (exact) or ``gelu_new`` / ``gelu_pytorch_tanh`` (tanh)
``tie_word_embeddings``         ``tie_embeddings`` (Pythia: untied, ``embed_out``)
``vocab_size``                  ``vocab_size``: the embedding's rows, padded beyond the tokenizer's ids
==============================  ============================================================================

LayerNorm with biases, biased projections (``bias=True``), no windows, no GQA. The fused
``query_key_value`` stores each head's q, k and v side by side (rows ``(heads qkv head_dim)``); ``w_qkv``
here holds all queries, then all keys, then all values (``(qkv heads head_dim)``): the rows are
un-interleaved at load and interleaved again at export (``Slot.heads``).
"""

from collections.abc import Mapping

from ftransformer.config import Config, Embeddings, Layout, Norm, Positional, flat_path
from ftransformer.interop.families import Slot, head_slot, rope_from_hf, rope_parameters

GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(hf: Mapping) -> Config:
    """A ``Config`` from a GPT-NeoX ``config.json`` (transformers 5's ``rope_parameters`` or the older
    ``rotary_pct`` / ``rotary_emb_base``)."""
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"gpt_neox config.json is missing {missing}; expected all of {list(_REQUIRED)}")
    act = hf.get("hidden_act", "gelu")
    if act not in GELUS:
        raise ValueError(f"gpt_neox config.json has hidden_act={act!r}; supported: {', '.join(map(repr, GELUS))}")
    if not hf.get("attention_bias", True):
        raise ValueError("gpt_neox config.json has attention_bias=False; supported: True (every projection biased)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rotary_emb_base", 10000.0))
    fraction = float(rope.pop("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    rope_base, rope_scaling = rope_from_hf({"rope_parameters": rope}, "gpt_neox")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = d_model // n_heads
    rotary_dim = int(head_dim * fraction)
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(
            f"gpt_neox config.json rotates int(head_dim={head_dim} * {fraction}) = {rotary_dim} channels; "
            "expected an even number > 0"
        )
    return Config(
        vocab_size=hf["vocab_size"], d_model=d_model, n_heads=n_heads, n_layers=hf["num_hidden_layers"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), dropout=0.0, bias=True,
        activation=GELUS[act], init_std=float(hf.get("initializer_range", 0.02)),
        norm=Norm("layernorm", eps=float(hf.get("layer_norm_eps", 1e-5))),
        positional=Positional("rope", base=rope_base, scaling=rope_scaling,
                              rotary_dim=None if rotary_dim == head_dim else rotary_dim),
        layout=Layout(residual="parallel" if hf.get("use_parallel_residual", True) else "sequential"),
        embeddings=Embeddings(tie=bool(hf.get("tie_word_embeddings", False))),
    )


def expresses(cfg: Config) -> bool:
    """Whether ``cfg`` is meant as GPT-NeoX: rotary positions with LayerNorm (``check`` says if it can be)."""
    return cfg.positional.kind == "rope" and cfg.norm.kind == "layernorm"


def check(cfg: Config) -> None:
    """``ValueError`` naming the first choice of ``cfg`` that GPT-NeoX cannot express."""
    needs = dict(norm_position="pre", mlp=True, bias=True, n_kv_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads)
    for field, expected in needs.items():
        if cfg.to_flat()[field] != expected:
            raise ValueError(f"Config.{flat_path(field)}={cfg.to_flat()[field]!r} cannot be expressed in gpt_neox: expected {expected!r}")
    if cfg.activation not in ("gelu", "gelu_tanh") or cfg.layout.residual == "parallel_shared_norm":
        raise ValueError(
            f"Config.activation={cfg.activation!r}, residual={cfg.layout.residual!r} cannot be expressed in gpt_neox: expected "
            "activation 'gelu' or 'gelu_tanh', residual 'sequential' or 'parallel'"
        )
    a = cfg.attention
    if a.window is not None or a.qk_norm or a.qkv_bias:
        raise ValueError(f"Config.attention={a} cannot be expressed in gpt_neox: expected no window, qk_norm or qkv_bias")
    fraction = cfg.rotary_dim / cfg.head_dim
    if int(cfg.head_dim * fraction) != cfg.rotary_dim:
        raise ValueError(f"Config.positional.rotary_dim={cfg.rotary_dim} is not int(head_dim * a float) in gpt_neox")


def config_to_hf(cfg: Config) -> dict:
    """The ``config.json`` keys (all but ``model_type`` and ``architectures``) that ``transformers`` reads
    back as ``cfg``'s GPT-NeoX model."""
    check(cfg)
    rope = {**rope_parameters(cfg), "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim}
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "hidden_act": "gelu" if cfg.activation == "gelu" else "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm.eps,
        "tie_word_embeddings": cfg.embeddings.tie, "use_parallel_residual": cfg.layout.residual == "parallel",
        "attention_bias": True, "rope_parameters": rope, "attention_dropout": 0.0, "hidden_dropout": 0.0,
    }


def tensor_slots(cfg: Config) -> list[Slot]:
    """Every tensor of a GPT-NeoX checkpoint for ``cfg``, in the order the model has them."""
    d, ff, h = cfg.d_model, cfg.d_ff, cfg.n_heads
    slots = [Slot("gpt_neox.embed_in.weight", "embed.tokens", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        p, b = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        for hf_name, ft_name in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
            slots += [Slot(p + f"{hf_name}.weight", b + f"{ft_name}.scale", (d,)), Slot(p + f"{hf_name}.bias", b + f"{ft_name}.bias", (d,))]
        slots += [
            Slot(p + "attention.query_key_value.weight", b + "attn.w_qkv", (3 * d, d), True, heads=h),
            Slot(p + "attention.query_key_value.bias", b + "attn.b_qkv", (3 * d,), heads=h),
            Slot(p + "attention.dense.weight", b + "attn.w_o", (d, d), True),
            Slot(p + "attention.dense.bias", b + "attn.b_o", (d,)),
            Slot(p + "mlp.dense_h_to_4h.weight", b + "mlp.w_in", (ff, d), True),
            Slot(p + "mlp.dense_h_to_4h.bias", b + "mlp.b_in", (ff,)),
            Slot(p + "mlp.dense_4h_to_h.weight", b + "mlp.w_out", (d, ff), True),
            Slot(p + "mlp.dense_4h_to_h.bias", b + "mlp.b_out", (d,)),
        ]
    final = [Slot("gpt_neox.final_layer_norm.weight", "ln_f.scale", (d,)), Slot("gpt_neox.final_layer_norm.bias", "ln_f.bias", (d,))]
    return [*slots, *final, head_slot("embed_out.weight", cfg)]
