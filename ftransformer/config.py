"""Config: every static choice about a model, frozen and validated. Sizes live here, never in params."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ftransformer import validate

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "sandwich", "output")
POSITIONALS = ("learned", "sinusoidal", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "geglu_tanh")
GATED_ACTIVATIONS = ("swiglu", "geglu_tanh")  # two input projections: w_gate (through the nonlinearity) and w_in
ROPE_SCALINGS = ("linear", "llama3")
# How a block adds its sublayers to the residual stream (see Layout.residual).
RESIDUALS = ("sequential", "parallel", "parallel_shared_norm")
QK_NORM_OVER = ("head", "projection")
# Where RMSNorm computes in float32 (see Norm.float32).
NORM_FLOAT32 = ("none", "normalize", "normalize_and_scale")
# Rope scalings of Hugging Face configs that are not implemented yet (named in the error, never approximated).
ROPE_SCALINGS_LATER = ("dynamic", "yarn", "longrope")


def _check_int(owner: str, name: str, value, *, allow_none: bool = False) -> None:
    validate.integer(f"{owner}.{name}", value, allow_none=allow_none)
    if value is not None and value <= 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value}")


def _check_positive(owner: str, name: str, value) -> None:
    if not (validate.is_number(value) and value > 0):
        raise ValueError(f"{owner}.{name}={value!r} must be a positive number")


def _check_bool(owner: str, name: str, value) -> None:
    validate.boolean(f"{owner}.{name}", value)


def _check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _fields_of(cls, d: Mapping) -> dict:
    """``d`` when every key is a field of ``cls``; else an error listing the fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields are {sorted(names)}")
    return dict(d)


class _Spec:
    """A frozen spec's shared conveniences: ``replace`` (validated again) and ``from_dict`` (JSON in)."""

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **_fields_of(type(self), changes))

    @classmethod
    def from_dict(cls, d: Mapping):
        return cls(**_fields_of(cls, d))



@dataclass(frozen=True)
class Attention(_Spec):
    """The attention choices beyond sizes (all off by default: GPT-2's attention).

    ``Config(..., attention=Attention(head_dim=128, qk_norm=True, window=4096))``.
    """

    head_dim: int | None = None  # width of each head; None -> d_model // n_heads (Qwen3, Mistral-Nemo set it)
    qkv_bias: bool = False  # biases on the q/k/v projection only, none on w_o (Qwen2); Config.bias biases all
    qk_norm: bool = False  # an RMSNorm (learned [head_dim] scale, norm_eps) on each head's q and k, before rotary (Qwen3)
    # What qk_norm normalises over: "head" (each head's head_dim: Qwen3, Gemma 3) or "projection" (the whole q and
    # k projections, n_heads * head_dim and n_kv_heads * head_dim wide, before they split into heads: OLMo-2).
    qk_norm_over: str = "head"
    # Sliding window: a query sees its own key and the window - 1 keys before it (Mistral). One int for every
    # layer, or a tuple with one entry per layer (None: that layer sees the whole causal prefix); None: no window.
    window: int | tuple[int | None, ...] | None = None
    # What q.k is multiplied by before the softmax; None: 1 / sqrt(head_dim). Gemma 2/3: query_pre_attn_scalar ** -0.5.
    scale: float | None = None
    # Attention-logit soft-capping: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2). The
    # fused SDPA kernel cannot do it: a capped layer always takes the einsum path.
    softcap: float | None = None

    def __post_init__(self):
        for name in ("scale", "softcap"):
            if getattr(self, name) is not None:
                _check_positive("Attention", name, getattr(self, name))
        _check_int("Attention", "head_dim", self.head_dim, allow_none=True)
        _check_bool("Attention", "qkv_bias", self.qkv_bias)
        _check_bool("Attention", "qk_norm", self.qk_norm)
        if self.qk_norm_over not in QK_NORM_OVER:
            raise ValueError(f"Attention.qk_norm_over={self.qk_norm_over!r} is not one of {', '.join(map(repr, QK_NORM_OVER))}")
        windows = self.window if isinstance(self.window, tuple) else (self.window,)
        for i, w in enumerate(windows):
            where = f"window[{i}]" if isinstance(self.window, tuple) else "window"
            _check_int("Attention", where, w, allow_none=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Attention":
        d = dict(d)
        if isinstance(d.get("window"), list):  # JSON has no tuples
            d["window"] = tuple(d["window"])
        return cls(**_fields_of(cls, d))


@dataclass(frozen=True)
class RopeScaling(_Spec):
    """Rotary frequencies stretched for a context longer than pretraining's.

    ``"linear"`` divides every frequency by ``factor`` (position interpolation). ``"llama3"`` divides the
    low frequencies (wavelength > original_max_seq_len / low_freq_factor) by ``factor``, keeps the high
    ones (wavelength < original_max_seq_len / high_freq_factor) and blends smoothly in between (Llama 3.1).
    """

    kind: str  # "linear" or "llama3"
    factor: float  # how many times longer the new context is
    low_freq_factor: float = 1.0  # llama3 only: where the divided (low-frequency) band starts
    high_freq_factor: float = 4.0  # llama3 only: where the kept (high-frequency) band starts
    original_max_seq_len: int = 8192  # llama3 only: the context length of pretraining

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            later = f" ({self.kind!r} is not implemented yet)" if self.kind in ROPE_SCALINGS_LATER else ""
            raise ValueError(
                f"RopeScaling.kind={self.kind!r} is not one of {', '.join(map(repr, ROPE_SCALINGS))}{later}"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_positive("RopeScaling", name, getattr(self, name))
        _check_int("RopeScaling", "original_max_seq_len", self.original_max_seq_len)
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"RopeScaling(kind='llama3') needs high_freq_factor > low_freq_factor, got "
                f"high_freq_factor={self.high_freq_factor} and low_freq_factor={self.low_freq_factor}"
            )


@dataclass(frozen=True)
class Norm(_Spec):
    """How every normalisation of the model computes; read by ``layers.norm`` alone.

    ``Norm("rmsnorm", eps=1e-6, float32="normalize")`` is Llama's; ``Norm()`` is GPT-2's LayerNorm.
    """

    kind: str = "layernorm"  # "layernorm" (centre, scale, bias) or "rmsnorm" (scale only)
    eps: float = 1e-5  # epsilon inside the square root
    # RMSNorm scales by (1 + scale), all in float32, then casts (Gemma): a zero scale is the identity.
    unit_offset: bool = False
    # Where RMSNorm rounds (the same numbers in float32; below it the order decides the rounding): "none" (in the
    # input's dtype), "normalize" (normalise in float32, cast back, then scale: Llama, Mistral, Qwen),
    # "normalize_and_scale" (scale in float32 too, then cast: OLMo-2).
    float32: str = "none"

    def __post_init__(self):
        _check_choice("Norm", "kind", self.kind, NORMS)
        _check_positive("Norm", "eps", self.eps)
        _check_bool("Norm", "unit_offset", self.unit_offset)
        _check_choice("Norm", "float32", self.float32, NORM_FLOAT32)
        for name, on in (("unit_offset", self.unit_offset), ("float32", self.float32 != "none")):
            if on and self.kind != "rmsnorm":
                raise ValueError(f"Norm.{name}={getattr(self, name)!r} needs kind='rmsnorm', got kind={self.kind!r}")


@dataclass(frozen=True)
class Positional(_Spec):
    """Where positions enter: a learned or sinusoidal table added to the embeddings, or rotary q and k.

    Read by ``layers.embedding`` (tables) and ``model.embed``. ``Positional("rope", base=5e5)`` is Llama 3's.
    """

    kind: str = "learned"  # "learned" table, fixed "sinusoidal", or "rope" (rotary, on q and k)
    base: float = 10000.0  # base of the rotary / sinusoidal frequencies (Hugging Face's rope_theta)
    scaling: RopeScaling | None = None  # stretched rotary frequencies (rope only)
    # Partial rotary: only the first rotary_dim channels of each head are turned, the rest pass unchanged
    # (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor); None: all of head_dim.
    rotary_dim: int | None = None
    # Rotary base of the sliding-window layers (Gemma 3: 1e4 on its local layers, base and scaling on its global
    # ones); their frequencies are never scaled. None: every layer uses base and scaling.
    window_base: float | None = None
    # Rotate q and k in float32 and cast back (OLMo-2); False: the cos/sin tables are cast to q's dtype first
    # (Llama). The same numbers in float32.
    float32: bool = False

    def __post_init__(self):
        _check_choice("Positional", "kind", self.kind, POSITIONALS)
        _check_positive("Positional", "base", self.base)
        _check_int("Positional", "rotary_dim", self.rotary_dim, allow_none=True)
        _check_bool("Positional", "float32", self.float32)
        if self.scaling is not None and not isinstance(self.scaling, RopeScaling):
            raise ValueError(f"Positional.scaling must be a RopeScaling or None, got {self.scaling!r}")
        if self.window_base is not None:
            _check_positive("Positional", "window_base", self.window_base)
        rotary_only = dict(scaling=self.scaling, rotary_dim=self.rotary_dim, window_base=self.window_base)
        for name, value in rotary_only.items():
            if value is not None and self.kind != "rope":
                raise ValueError(f"Positional.{name}={value!r} needs kind='rope', got kind={self.kind!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Positional":
        d = _fields_of(cls, d)
        if isinstance(d.get("scaling"), Mapping):
            d["scaling"] = RopeScaling.from_dict(d["scaling"])
        return cls(**d)


@dataclass(frozen=True)
class Layout(_Spec):
    """How a block wires its sublayers into the residual stream; read by ``layers.block`` alone.

    ``Layout()`` is GPT-2's pre-LN, ``Layout(residual="parallel")`` GPT-NeoX's, ``Layout(mlp=False)``
    attention-only blocks.
    """

    # "pre": x + f(norm(x)) (GPT-2); "post": norm(x + f(x)) (the 2017 diagram); "sandwich": x + norm'(f(norm(x)))
    # (Gemma 2/3: a second norm on each sublayer's output, ln1_post / ln2_post); "output": x + norm(f(x)) (OLMo-2)
    norm_position: str = "pre"
    # "sequential": attention, then the MLP on the result (GPT-2, Llama). "parallel": both read the same
    # block input, x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX / Pythia). "parallel_shared_norm": one norm
    # for both, x + attn(ln1(x)) + mlp(ln1(x)), and no ln2 (GPT-J, Phi-2). Parallel needs pre-LN and an MLP.
    residual: str = "sequential"
    mlp: bool = True  # False: attention-only blocks (no feed-forward, no ln2; d_ff is then unused)

    def __post_init__(self):
        _check_choice("Layout", "norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("Layout", "residual", self.residual, RESIDUALS)
        _check_bool("Layout", "mlp", self.mlp)
        if self.residual != "sequential" and (self.norm_position != "pre" or not self.mlp):
            raise ValueError(
                f"Layout.residual={self.residual!r} needs norm_position='pre' and mlp=True, got "
                f"norm_position={self.norm_position!r}, mlp={self.mlp}"
            )

    @property
    def final_norm(self) -> bool:
        """Whether the stack ends in a norm before the unembedding (every layout but post-LN's)."""
        return self.norm_position != "post"


@dataclass(frozen=True)
class Embeddings(_Spec):
    """The token embedding and the output head; read by ``model.embed`` and ``model.unembed``."""

    tie: bool = True  # reuse the token embedding as the output projection (GPT-2 does)
    scale: bool = False  # token embeddings times sqrt(d_model), the constant rounded to their dtype first (Gemma)
    # Final-logit soft-capping: logits -> logit_softcap * tanh(logits / logit_softcap) (Gemma 2); None: off.
    logit_softcap: float | None = None

    def __post_init__(self):
        _check_bool("Embeddings", "tie", self.tie)
        _check_bool("Embeddings", "scale", self.scale)
        if self.logit_softcap is not None:
            _check_positive("Embeddings", "logit_softcap", self.logit_softcap)


@dataclass(frozen=True)
class Config:
    """Architecture of a decoder-only transformer: sizes plus one small spec per layer kind.

    ``Config(vocab_size=65, d_model=128, n_heads=4, n_layers=4, d_ff=512, max_seq_len=64, norm=Norm("rmsnorm"),
    positional=Positional("rope"))``. Invalid combinations raise ``ValueError``. The flat keywords of 0.2
    (``norm_eps=``, ``rope_base=``, ...) go through ``Config.from_flat`` / ``from_dict`` (one converter).
    """

    vocab_size: int  # number of token ids; embeddings and logits have this many rows/columns
    d_model: int  # width of the residual stream
    n_heads: int  # query heads per attention layer; d_model must divide evenly among them (unless head_dim is set)
    n_layers: int  # transformer blocks
    d_ff: int  # hidden width of the feed-forward layer (of each SwiGLU branch for "swiglu")
    max_seq_len: int  # longest sequence the model accepts (size of learned position table)
    n_kv_heads: int | None = None  # key/value heads: None -> n_heads (MHA); fewer -> GQA; 1 -> MQA
    dropout: float = 0.0  # dropout rate on attention weights, sublayer outputs and embeddings (train only)
    bias: bool = True  # biases in linear layers and LayerNorms (GPT-2: True; modern models: False)
    # "gelu" (exact), "gelu_tanh" (GPT-2's approximation), "swiglu" or "geglu_tanh" (Gemma: the tanh GELU as the gate)
    activation: str = "gelu"
    init_std: float = 0.02  # std of the normal init; residual output projections get /sqrt(2*n_layers)
    attention: Attention = Attention()  # head_dim, q/k/v-only bias, q/k norm, sliding windows, scale, soft-cap
    norm: Norm = Norm()  # LayerNorm or RMSNorm, eps, where it rounds
    positional: Positional = Positional()  # learned / sinusoidal / rotary positions
    layout: Layout = Layout()  # the block's residual wiring
    embeddings: Embeddings = Embeddings()  # tying, embedding scale, logit soft-cap

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "max_seq_len"):
            _check_int("Config", name, getattr(self, name))
        for name, cls in SPECS.items():
            if not isinstance(getattr(self, name), cls):
                got = getattr(self, name)
                raise ValueError(f"Config.{name} must be a {cls.__name__}, got {got!r} ({type(got).__name__})")
        if self.attention.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"Config.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(head_dim = d_model / n_heads; or set Attention(head_dim=...))"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"Config.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        _check_choice("Config", "activation", self.activation, ACTIVATIONS)
        _check_bool("Config", "bias", self.bias)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"Config.dropout={self.dropout!r} must be a float in [0, 1)")
        _check_positive("Config", "init_std", self.init_std)
        self._check_across_specs()

    def _check_across_specs(self) -> None:
        """The choices that depend on more than one spec, each against the rest of the config."""
        if self.positional.kind == "rope" and self.head_dim % 2:
            raise ValueError(
                f"Config.positional.kind='rope' needs an even head_dim, got head_dim={self.head_dim} "
                f"(d_model={self.d_model} / n_heads={self.n_heads})"
            )
        if self.positional.kind == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"Config.positional.kind='sinusoidal' needs an even d_model, got d_model={self.d_model}")
        if self.positional.window_base is not None and self.attention.window is None:
            raise ValueError(
                f"Config.positional.window_base={self.positional.window_base} needs sliding windows, got "
                f"attention.window={self.attention.window}"
            )
        if self.attention.qkv_bias and self.bias:
            raise ValueError(
                "Config.attention.qkv_bias=True needs bias=False, got bias=True (bias=True already biases q, k and v)"
            )
        rotary_dim = self.positional.rotary_dim
        if rotary_dim is not None and (rotary_dim % 2 or rotary_dim > self.head_dim):
            raise ValueError(
                f"Config.positional.rotary_dim={rotary_dim} needs an even number of channels <= head_dim={self.head_dim}"
            )
        window = self.attention.window
        if isinstance(window, tuple) and len(window) != self.n_layers:
            raise ValueError(
                f"Config.attention.window has {len(window)} entries but n_layers={self.n_layers} (one per layer)"
            )

    @property
    def head_dim(self) -> int:
        """Width of each attention head: ``attention.head_dim``, or d_model / n_heads when that is None."""
        return self.attention.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary turns: ``positional.rotary_dim``, or all of ``head_dim``."""
        return self.positional.rotary_dim or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it sees the whole causal prefix)."""
        window = self.attention.window
        return window[layer] if isinstance(window, tuple) else window

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again): top-level fields, whole specs, one spec field by its
        path (``**{"norm.eps": 1e-6}``) or by 0.2's flat name (``norm_eps=1e-6``), all through ``upgrade``."""
        _refuse_runtime(changes)
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            # n_kv_heads was filled in from n_heads (plain multi-head attention): keep it that way.
            changes["n_kv_heads"] = None
        return dataclasses.replace(self, **_known(upgrade(changes, base=self)))

    def to_dict(self) -> dict:
        """The config as a plain nested dict (JSON-ready; ``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    def to_flat(self) -> dict:
        """The values under 0.2's flat names (``upgrade``'s inverse), with ``head_dim`` and ``rotary_dim``: what a
        family's "can it express this config" checks compare field by field."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SPECS}
        flat |= {name: getattr(getattr(self, spec), field) for name, (spec, field) in FLAT_NAMES.items()}
        flat |= dict(attention=self.attention, head_dim=self.head_dim, rotary_dim=self.positional.rotary_dim,
                     norm_upcast=self.norm.float32 != "none",
                     norm_scale_in_float32=self.norm.float32 == "normalize_and_scale")
        return flat

    @classmethod
    def from_dict(cls, d: Mapping) -> "Config":
        """A config from ``to_dict``'s dict, or from any older checkpoint's flat one (through ``upgrade``).

        A saved ``attn_impl`` (0.2 kept the attention kernel in the config) is dropped: it never changed
        the model, and the kernel is now chosen per call (``layers.attention_kernel``)."""
        return cls(**_known(upgrade({k: v for k, v in d.items() if k not in RUNTIME_CHOICES})))

    @classmethod
    def from_flat(cls, **flat) -> "Config":
        """A config from 0.2's flat keywords: ``Config.from_flat(..., norm="rmsnorm", norm_eps=1e-6)``."""
        _refuse_runtime(flat)
        return cls.from_dict(flat)


SPECS = {"attention": Attention, "norm": Norm, "positional": Positional, "layout": Layout, "embeddings": Embeddings}
# 0.2's flat keyword -> (the spec that now holds it, its name there)
FLAT_NAMES = {
    "norm": ("norm", "kind"), "norm_eps": ("norm", "eps"), "norm_unit_offset": ("norm", "unit_offset"),
    "positional": ("positional", "kind"), "rope_base": ("positional", "base"), "rope_scaling": ("positional", "scaling"),
    "rope_in_float32": ("positional", "float32"), "window_rope_base": ("positional", "window_base"),
    "norm_position": ("layout", "norm_position"), "residual": ("layout", "residual"), "mlp": ("layout", "mlp"),
    "tie_embeddings": ("embeddings", "tie"), "embed_scale": ("embeddings", "scale"),
    "logit_softcap": ("embeddings", "logit_softcap"),
}


# 0.2 config fields that were runtime choices, not architecture -> where the choice is made now
RUNTIME_CHOICES = {
    "attn_impl": "per call: `with ftransformer.layers.attention_kernel('einsum'):` (the default runs the fused "
                 "kernel, and the written-out one under vmap, jvp or a second grad)",
}


def _refuse_runtime(changes: Mapping) -> None:
    """A clear error for a runtime choice that left the config, saying where it is made now."""
    for name in RUNTIME_CHOICES.keys() & changes.keys():
        raise TypeError(f"Config has no {name!r} since 0.3: it is not architecture; choose it {RUNTIME_CHOICES[name]}")


def field_types() -> dict[str, object]:
    """Every settable name and its annotation: top-level sizes, ``spec.field`` paths, and 0.2's flat names (what
    ``replace`` and ``from_dict`` accept; the CLI's ``--set`` reads it)."""
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in SPECS}
    for spec, cls in SPECS.items():
        types |= {f"{spec}.{f.name}": f.type for f in dataclasses.fields(cls)}
    return types | {flat: types[".".join(path)] for flat, path in FLAT_NAMES.items()}


def flat_path(name: str) -> str:
    """Where 0.2's flat name ``name`` lives now, as ``spec.field`` (``"norm_eps"`` -> ``"norm.eps"``)."""
    moved = {"norm_upcast": "norm.float32", "norm_scale_in_float32": "norm.float32", "rotary_dim": "positional.rotary_dim"}
    return ".".join(FLAT_NAMES[name]) if name in FLAT_NAMES else moved.get(name, name)


def _spec_fields(value, cls) -> dict | None:
    """A spec given as itself or as its dict, as a dict of its fields; None for anything else."""
    if isinstance(value, cls):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
    return dict(value) if isinstance(value, Mapping) else None


def upgrade(d: Mapping, *, base: "Config | None" = None) -> dict:
    """The one converter: a config dict of any version (0.2's flat names, 0.3's specs, as objects or dicts)
    as ``Config``'s keywords. ``base``: the config whose values the missing ones keep (``replace``)."""
    d = dict(d)
    specs = {name: _spec_fields(getattr(base, name), cls) if base else {} for name, cls in SPECS.items()}
    for name, cls in SPECS.items():
        given = _spec_fields(d.get(name), cls)
        if given is not None:
            specs[name] = given if base is None else {**specs[name], **given}
            del d[name]
    for flat, (spec, field) in FLAT_NAMES.items():
        if flat in d:
            specs[spec][field] = d.pop(flat)
    for dotted in [k for k in d if isinstance(k, str) and k.partition(".")[0] in SPECS]:  # "norm.eps": one spec field
        spec, _, field = dotted.partition(".")
        specs[spec][field] = d.pop(dotted)
    upcast, in_float32 = d.pop("norm_upcast", None), d.pop("norm_scale_in_float32", None)
    if in_float32 and not upcast:
        raise ValueError("Config.norm_scale_in_float32=True needs norm_upcast=True, got norm_upcast=False")
    if upcast is not None:
        specs["norm"]["float32"] = "normalize_and_scale" if in_float32 else "normalize" if upcast else "none"
    if "rotary_dim" in specs["attention"]:  # 0.2 kept it on the attention
        specs["positional"]["rotary_dim"] = specs["attention"].pop("rotary_dim")
    touched = {name for name, fields in specs.items() if fields}
    return {**d, **{name: SPECS[name].from_dict(specs[name]) for name in touched}}


def _known(kwargs: dict) -> dict:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown Config field(s) {unknown}; fields are {sorted(names)}")
    return kwargs


_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, bias=True, activation="gelu_tanh", dropout=0.0,
)

PRESETS: dict[str, Config] = {
    # Every axis a different size, so a swapped axis fails loudly in tests.
    "tiny": Config(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16),
    # The classic "seed" model of the learning path (~5.8M parameters).
    "seed": Config(vocab_size=10000, d_model=256, n_heads=4, n_layers=4, d_ff=1024, max_seq_len=512, dropout=0.1),
    # nanoGPT's shakespeare_char recipe, shrunk for a CPU.
    "shakespeare-char-cpu": Config(
        vocab_size=65, d_model=128, n_heads=4, n_layers=4, d_ff=512, max_seq_len=64, dropout=0.0, bias=False
    ),
    # nanoGPT's shakespeare_char recipe as published (GPU-sized).
    "shakespeare-char": Config(
        vocab_size=65, d_model=384, n_heads=6, n_layers=6, d_ff=1536, max_seq_len=256, dropout=0.2, bias=False
    ),
    # GPT-2 small (124M) and medium (355M), in the Hugging Face layout's architecture.
    "gpt2": Config(d_model=768, n_heads=12, n_layers=12, d_ff=3072, **_GPT2),
    "gpt2-medium": Config(d_model=1024, n_heads=16, n_layers=24, d_ff=4096, **_GPT2),
}


def get_preset(name: str) -> Config:
    """The preset called ``name``; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
