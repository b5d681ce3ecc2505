"""Config: every static choice about a model, frozen and validated. Sizes live here, never in params."""

import dataclasses
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "sandwich", "output")
POSITIONALS = ("learned", "sinusoidal", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "geglu_tanh")
GATED_ACTIVATIONS = ("swiglu", "geglu_tanh")  # two input projections: w_gate (through the nonlinearity) and w_in
ATTN_IMPLS = ("sdpa", "einsum")
ROPE_SCALINGS = ("linear", "llama3")
# How a block adds its sublayers to the residual stream (see Config.residual).
RESIDUALS = ("sequential", "parallel", "parallel_shared_norm")
QK_NORM_OVER = ("head", "projection")
# Rope scalings of Hugging Face configs that are not implemented yet (named in the error, never approximated).
ROPE_SCALINGS_LATER = ("dynamic", "yarn", "longrope")


def _check_int(owner: str, name: str, value, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        none = " or None" if allow_none else ""
        raise ValueError(f"{owner}.{name} must be an int{none}, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value}")


def _check_positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{owner}.{name}={value!r} must be a positive number")


def _check_bool(owner: str, name: str, value) -> None:
    # A string like "false" is truthy; only a real bool says what the caller meant.
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be a bool, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Attention:
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
    # Partial rotary: only the first rotary_dim channels of each head are turned, the rest pass unchanged
    # (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor); None: all of head_dim.
    rotary_dim: int | None = None
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
        _check_int("Attention", "rotary_dim", self.rotary_dim, allow_none=True)
        _check_bool("Attention", "qkv_bias", self.qkv_bias)
        _check_bool("Attention", "qk_norm", self.qk_norm)
        if self.qk_norm_over not in QK_NORM_OVER:
            raise ValueError(f"Attention.qk_norm_over={self.qk_norm_over!r} is not one of {', '.join(map(repr, QK_NORM_OVER))}")
        windows = self.window if isinstance(self.window, tuple) else (self.window,)
        for i, w in enumerate(windows):
            where = f"window[{i}]" if isinstance(self.window, tuple) else "window"
            _check_int("Attention", where, w, allow_none=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Attention":
        d = dict(d)
        if isinstance(d.get("window"), list):  # JSON has no tuples
            d["window"] = tuple(d["window"])
        return cls(**_known_fields(cls, d))


@dataclass(frozen=True)
class RopeScaling:
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

    @classmethod
    def from_dict(cls, d: dict) -> "RopeScaling":
        return cls(**_known_fields(cls, d))


def _known_fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields are {sorted(names)}")
    return d


@dataclass(frozen=True)
class Config:
    """Architecture of a decoder-only transformer. Invalid combinations raise ``ValueError``."""

    vocab_size: int  # number of token ids; embeddings and logits have this many rows/columns
    d_model: int  # width of the residual stream
    n_heads: int  # query heads per attention layer; d_model must divide evenly among them (unless head_dim is set)
    n_layers: int  # transformer blocks
    d_ff: int  # hidden width of the feed-forward layer (of each SwiGLU branch for "swiglu")
    max_seq_len: int  # longest sequence the model accepts (size of learned position table)
    n_kv_heads: int | None = None  # key/value heads: None -> n_heads (MHA); fewer -> GQA; 1 -> MQA
    dropout: float = 0.0  # dropout rate on attention weights, sublayer outputs and embeddings (train only)
    bias: bool = True  # biases in linear layers and LayerNorms (GPT-2: True; modern models: False)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    # "pre": x + f(norm(x)) (GPT-2); "post": norm(x + f(x)) (the 2017 diagram); "sandwich": x + norm'(f(norm(x)))
    # (Gemma 2/3: a second norm on each sublayer's output, ln1_post / ln2_post); "output": x + norm(f(x)) (OLMo-2)
    norm_position: str = "pre"
    positional: str = "learned"  # "learned" table, fixed "sinusoidal", or "rope" (rotary, on q and k)
    # "gelu" (exact), "gelu_tanh" (GPT-2's approximation), "swiglu" or "geglu_tanh" (Gemma: the tanh GELU as the gate)
    activation: str = "gelu"
    tie_embeddings: bool = True  # reuse the token embedding as the output projection (GPT-2 does)
    attn_impl: str = "sdpa"  # "sdpa" (fused torch kernel) or "einsum" (written out; vmap-friendly grads)
    init_std: float = 0.02  # std of the normal init; residual output projections get /sqrt(2*n_layers)
    norm_eps: float = 1e-5  # epsilon inside LayerNorm / RMSNorm
    rope_base: float = 10000.0  # base of the rotary / sinusoidal frequencies (Hugging Face's rope_theta)
    mlp: bool = True  # False: attention-only blocks (no feed-forward, no ln2; d_ff is then unused)
    attention: Attention = Attention()  # head_dim, q/k/v-only bias, q/k norm, sliding windows
    rope_scaling: RopeScaling | None = None  # stretched rotary frequencies (positional="rope" only)
    # RMSNorm in Hugging Face's cast order: normalise in float32, cast back, then scale (Llama, Mistral, Qwen).
    # Same numbers in float32; below it, the order decides the rounding.
    norm_upcast: bool = False
    # With norm_upcast: multiply by the scale in float32 too, then cast (OLMo-2); False: cast, then scale (Llama).
    norm_scale_in_float32: bool = False
    # Rotate q and k in float32 and cast back (OLMo-2); False: the cos/sin tables are cast to q's dtype first
    # (Llama). The same numbers in float32.
    rope_in_float32: bool = False
    # "sequential": attention, then the MLP on the result (GPT-2, Llama). "parallel": both read the same
    # block input, x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX / Pythia). "parallel_shared_norm": one norm
    # for both, x + attn(ln1(x)) + mlp(ln1(x)), and no ln2 (GPT-J, Phi-2). Parallel needs pre-LN and an MLP.
    residual: str = "sequential"
    # RMSNorm scales by (1 + scale), all in float32, then casts (Gemma): a zero scale is the identity.
    norm_unit_offset: bool = False
    # Token embeddings times sqrt(d_model), the constant rounded to the embeddings' dtype first (Gemma).
    embed_scale: bool = False
    # Final-logit soft-capping: logits -> logit_softcap * tanh(logits / logit_softcap) (Gemma 2); None: off.
    logit_softcap: float | None = None
    # Rotary base of the sliding-window layers (Gemma 3: 1e4 on its local layers, rope_base and rope_scaling on
    # its global ones); their frequencies are never scaled. None: every layer uses rope_base and rope_scaling.
    window_rope_base: float | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Config.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"Config.{name} must be positive, got {value}")
        if not isinstance(self.attention, Attention):
            raise ValueError(f"Config.attention must be an Attention, got {type(self.attention).__name__}")
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
        for name, choices in (
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("positional", POSITIONALS),
            ("activation", ACTIVATIONS),
            ("attn_impl", ATTN_IMPLS),
            ("residual", RESIDUALS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Config.{name}={value!r} is not one of {', '.join(map(repr, choices))}")
        for name in ("bias", "tie_embeddings", "mlp", "norm_upcast", "norm_unit_offset", "embed_scale", "norm_scale_in_float32",
                     "rope_in_float32"):
            _check_bool("Config", name, getattr(self, name))
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"Config.dropout={self.dropout!r} must be a float in [0, 1)")
        for name in ("init_std", "norm_eps", "rope_base"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Config.{name}={value!r} must be a positive number")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"Config.positional='rope' needs an even head_dim, got head_dim={self.head_dim} "
                f"(d_model={self.d_model} / n_heads={self.n_heads})"
            )
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"Config.positional='sinusoidal' needs an even d_model, got d_model={self.d_model}")
        self._check_new_choices()

    def _check_new_choices(self) -> None:
        """The grouped choices that modern checkpoints need, each against the rest of the config."""
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise ValueError(f"Config.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
            if self.positional != "rope":
                raise ValueError(f"Config.rope_scaling needs positional='rope', got positional={self.positional!r}")
        for name in ("norm_upcast", "norm_unit_offset"):
            if getattr(self, name) and self.norm != "rmsnorm":
                raise ValueError(f"Config.{name}=True needs norm='rmsnorm', got norm={self.norm!r}")
        if self.norm_scale_in_float32 and not self.norm_upcast:
            raise ValueError("Config.norm_scale_in_float32=True needs norm_upcast=True, got norm_upcast=False")
        if self.logit_softcap is not None:
            _check_positive("Config", "logit_softcap", self.logit_softcap)
        if self.window_rope_base is not None:
            _check_positive("Config", "window_rope_base", self.window_rope_base)
            if self.positional != "rope" or self.attention.window is None:
                raise ValueError(
                    f"Config.window_rope_base={self.window_rope_base} needs positional='rope' and sliding windows, got "
                    f"positional={self.positional!r}, attention.window={self.attention.window}"
                )
        if self.attention.qkv_bias and self.bias:
            raise ValueError(
                "Config.attention.qkv_bias=True needs bias=False, got bias=True (bias=True already biases q, k and v)"
            )
        rotary_dim = self.attention.rotary_dim
        if rotary_dim is not None and (self.positional != "rope" or rotary_dim % 2 or rotary_dim > self.head_dim):
            raise ValueError(
                f"Config.attention.rotary_dim={rotary_dim} needs positional='rope' (got {self.positional!r}) and an "
                f"even number of channels <= head_dim={self.head_dim}"
            )
        if self.residual != "sequential" and (self.norm_position != "pre" or not self.mlp):
            raise ValueError(
                f"Config.residual={self.residual!r} needs norm_position='pre' and mlp=True, got "
                f"norm_position={self.norm_position!r}, mlp={self.mlp}"
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
        """Channels of each head that rotary turns: ``attention.rotary_dim``, or all of ``head_dim``."""
        return self.attention.rotary_dim or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it sees the whole causal prefix)."""
        window = self.attention.window
        return window[layer] if isinstance(window, tuple) else window

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Config has no field(s) {unknown}; fields are {[f.name for f in dataclasses.fields(self)]}")
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            # n_kv_heads was filled in from n_heads (plain multi-head attention): keep it that way.
            changes["n_kv_heads"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config's fields as a plain dict (JSON-ready; ``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Config field(s) {unknown}; fields are {sorted(names)}")
        d = dict(d)
        # Old checkpoints have neither key; the defaults stand in for them.
        if isinstance(d.get("attention"), dict):
            d["attention"] = Attention.from_dict(d["attention"])
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
        return cls(**d)


_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, bias=True, norm="layernorm", norm_position="pre",
    positional="learned", activation="gelu_tanh", tie_embeddings=True, dropout=0.0,
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
