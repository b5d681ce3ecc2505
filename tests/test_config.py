"""Config: validation messages, defaults, copies and round trips, presets and their parameter counts."""

import dataclasses
import json

import pytest
import torch

import ftransformer as ft
from ftransformer.config import (
    ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONALS, ROPE_SCALINGS, Attention, RopeScaling,
)

BASE = dict(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16)


def make(**changes) -> ft.Config:
    """A config from 0.2's flat keywords: every case below also goes through the one converter."""
    return ft.Config.from_flat(**{**BASE, **changes})


# (changes, words the message must contain: the field, the bad value, and the rule)
INVALID = [
    *[({name: 0}, [name, "0", "positive"]) for name in ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len")],
    *[({name: -3}, [name, "-3", "positive"]) for name in ("vocab_size", "d_ff", "max_seq_len")],
    ({"n_heads": 0}, ["n_heads", "0", "positive"]),
    ({"n_kv_heads": 0}, ["n_kv_heads", "0", "positive"]),
    ({"d_model": 25}, ["d_model=25", "n_heads=3", "divisible"]),
    ({"n_kv_heads": 2}, ["n_heads=3", "n_kv_heads=2", "divisible"]),
    ({"n_kv_heads": 6}, ["n_heads=3", "n_kv_heads=6", "divisible"]),
    ({"norm": "batchnorm"}, ["Norm.kind", "'batchnorm'", *map(repr, NORMS)]),
    ({"norm_position": "middle"}, ["norm_position", "'middle'", *map(repr, NORM_POSITIONS)]),
    ({"positional": "alibi"}, ["Positional.kind", "'alibi'", *map(repr, POSITIONALS)]),
    ({"activation": "relu"}, ["activation", "'relu'", *map(repr, ACTIVATIONS)]),
    ({"dropout": 1.0}, ["dropout", "1.0", "[0, 1)"]),
    ({"dropout": -0.1}, ["dropout", "-0.1", "[0, 1)"]),
    ({"init_std": 0.0}, ["init_std", "0.0", "positive"]),
    ({"rope_base": -1.0}, ["Positional.base", "-1.0", "positive"]),
    ({"norm_eps": -1e-5}, ["Norm.eps", "-1e-05", "positive"]),
    # head_dim = 30 / 6 = 5 is odd: rotary pairs need an even head_dim.
    ({"d_model": 30, "n_heads": 6, "positional": "rope"}, ["rope", "head_dim=5", "even"]),
    ({"d_model": 21, "n_heads": 3, "positional": "sinusoidal"}, ["sinusoidal", "d_model=21", "even"]),
]


# Values of the wrong type. The test suite's jaxtyping hook type-checks Config.__init__ itself (a
# TypeError before validation runs), so Config's own messages are checked with the hook off.
WRONG_TYPES = [
    ({"d_model": 24.0}, ["d_model", "24.0", "int"]),
    ({"n_layers": True}, ["n_layers", "True", "int"]),
    ({"vocab_size": "37"}, ["vocab_size", "'37'", "int"]),
    ({"dropout": "0.1"}, ["dropout", "'0.1'", "[0, 1)"]),
    ({"rope_base": "big"}, ["base", "'big'", "positive"]),
    ({"bias": "yes"}, ["bias", "'yes'", "bool"]),
    ({"tie_embeddings": 1}, ["tie", "1", "bool"]),
]


def assert_names_all(message: str, words: list[str]) -> None:
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


@pytest.mark.parametrize(("changes", "words"), INVALID, ids=[repr(c) for c, _ in INVALID])
def test_invalid_config_raises_value_error_naming_field_value_and_rule(changes, words):
    with pytest.raises(ValueError) as info:
        make(**changes)
    assert_names_all(str(info.value), words)


@pytest.mark.parametrize(("changes", "words"), WRONG_TYPES, ids=[repr(c) for c, _ in WRONG_TYPES])
def test_wrong_type_raises_value_error_naming_field_value_and_rule(changes, words, no_typecheck):
    with pytest.raises(ValueError) as info:
        make(**changes)
    assert_names_all(str(info.value), words)


@pytest.mark.parametrize(("changes", "words"), WRONG_TYPES, ids=[repr(c) for c, _ in WRONG_TYPES])
def test_wrong_type_under_the_type_checker_still_raises_naming_the_field(changes, words):
    # The hook turns most of these into a TypeError; a bool passes it as an int and meets Config's check.
    with pytest.raises((TypeError, ValueError), match=words[0]):
        make(**changes)


@pytest.mark.parametrize(("changes", "words"), INVALID[:3], ids=[repr(c) for c, _ in INVALID[:3]])
def test_replace_validates_again(changes, words):
    with pytest.raises(ValueError, match=words[0]):
        make().replace(**changes)


def test_valid_edge_cases_are_accepted():
    make(positional="rope")  # head_dim 8 is even
    make(positional="sinusoidal")
    make(n_kv_heads=1)  # MQA
    make(n_kv_heads=3)  # MHA written out
    make(dropout=0.0)
    make(dropout=0.999)
    make(d_model=24, n_heads=24)  # head_dim 1 is fine without rope


def test_n_kv_heads_defaults_to_n_heads():
    cfg = make()
    assert cfg.n_kv_heads == cfg.n_heads == 3
    assert make(n_kv_heads=1).n_kv_heads == 1


def test_defaults_and_head_dim():
    cfg = make()
    assert (cfg.dropout, cfg.bias, cfg.norm.kind, cfg.layout.norm_position) == (0.0, True, "layernorm", "pre")
    assert (cfg.positional.kind, cfg.activation, cfg.embeddings.tie) == ("learned", "gelu", True)
    assert cfg.init_std == 0.02
    assert cfg.head_dim == 8


def test_config_is_frozen_and_hashable():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 48
    assert hash(cfg) == hash(make())
    assert cfg == make() and cfg != make(d_ff=41)


def test_replace_returns_a_changed_copy():
    cfg = make()
    other = cfg.replace(n_layers=5, norm="rmsnorm")
    assert (other.n_layers, other.norm.kind) == (5, "rmsnorm")
    assert (cfg.n_layers, cfg.norm.kind) == (2, "layernorm")
    assert other.replace(n_layers=2, norm="layernorm") == cfg


def test_replace_unknown_field_lists_the_fields():
    with pytest.raises(ValueError, match="n_head") as info:
        make().replace(n_head=4)
    assert "n_heads" in str(info.value)


@pytest.mark.parametrize("name", list(ft.PRESETS))
def test_to_dict_from_dict_round_trip(name):
    cfg = ft.PRESETS[name]
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(ft.Config)}
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert ft.Config.from_dict(d) == cfg


def test_from_dict_unknown_field_raises():
    d = make().to_dict() | {"n_experts": 8}
    with pytest.raises(ValueError, match="n_experts"):
        ft.Config.from_dict(d)


def test_get_preset_unknown_name_lists_presets():
    assert ft.get_preset("tiny") is ft.PRESETS["tiny"]
    with pytest.raises(ValueError, match="gpt3") as info:
        ft.get_preset("gpt3")
    for name in ft.PRESETS:
        assert name in str(info.value)


def test_presets_match_the_published_shapes():
    seed = ft.PRESETS["seed"]
    assert (seed.d_model, seed.n_heads, seed.n_layers, seed.d_ff, seed.vocab_size, seed.max_seq_len) == (
        256, 4, 4, 1024, 10000, 512)
    assert seed.dropout == 0.1
    cpu = ft.PRESETS["shakespeare-char-cpu"]
    assert (cpu.n_layers, cpu.n_heads, cpu.d_model, cpu.d_ff, cpu.max_seq_len, cpu.vocab_size) == (4, 4, 128, 512, 64, 65)
    assert (cpu.dropout, cpu.bias) == (0.0, False)
    sc = ft.PRESETS["shakespeare-char"]
    assert (sc.n_layers, sc.n_heads, sc.d_model, sc.d_ff, sc.max_seq_len, sc.vocab_size) == (6, 6, 384, 1536, 256, 65)
    assert (sc.dropout, sc.bias) == (0.2, False)
    gpt2 = ft.PRESETS["gpt2"]
    assert (gpt2.n_layers, gpt2.n_heads, gpt2.d_model, gpt2.max_seq_len, gpt2.vocab_size) == (12, 12, 768, 1024, 50257)
    assert (gpt2.positional.kind, gpt2.layout.norm_position, gpt2.embeddings.tie) == ("learned", "pre", True)
    tiny = ft.PRESETS["tiny"]
    sizes = [tiny.vocab_size, tiny.d_model, tiny.n_heads, tiny.n_layers, tiny.d_ff, tiny.max_seq_len, tiny.head_dim]
    assert len(set(sizes)) == len(sizes), "tiny must give every axis its own size"


@pytest.mark.parametrize("name", [n for n in ft.PRESETS if n not in ("gpt2", "gpt2-medium")])
def test_small_presets_initialise_and_run(name):
    cfg = ft.PRESETS[name]
    params = ft.init_params(cfg, seed=0)
    assert ft.count_params(params) == ft.params.param_breakdown(cfg)["total"]
    tokens = torch.arange(6) % cfg.vocab_size
    logits = ft.forward(params, tokens, cfg)
    assert logits.shape == (6, cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_gpt2_preset_has_124_439_808_params_and_runs():
    cfg = ft.PRESETS["gpt2"]
    assert ft.params.param_breakdown(cfg)["total"] == 124_439_808
    params = ft.init_params(cfg, seed=0)
    assert ft.count_params(params) == 124_439_808
    tokens = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 50256]])
    with torch.no_grad():
        logits = ft.forward(params, tokens, cfg)
    assert logits.shape == (1, 8, 50257)
    assert torch.isfinite(logits).all()


def test_gpt2_medium_preset_initialises():
    cfg = ft.PRESETS["gpt2-medium"]
    params = ft.init_params(cfg, seed=0)
    # Hugging Face's gpt2-medium has 354,823,168 parameters (tied embeddings).
    assert ft.count_params(params) == ft.params.param_breakdown(cfg)["total"] == 354_823_168
    assert len(params["blocks"]) == 24


def test_seed_breakdown_shows_the_classic_estimate_next_to_the_exact_count():
    cfg = ft.PRESETS["seed"]
    b = ft.params.param_breakdown(cfg)
    terms = dict(b["estimate_terms"])
    assert list(terms.values()) == [2_560_000, 1_048_576, 2_097_152]
    assert any("token embeddings" in name for name in terms)
    assert any("attention" in name for name in terms) and any("feed-forward" in name for name in terms)
    assert b["estimate"] == 5_705_728
    assert b["total"] == ft.count_params(ft.init_params(cfg)) == sum(n for _, n in b["rows"])
    # What the estimate leaves out is exactly the gap to the exact count.
    assert b["total"] - b["estimate"] == sum(n for _, n in b["left_out"])
    left_out = dict(b["left_out"])
    assert left_out["position embeddings"] == 512 * 256
    assert left_out["norms"] == (2 * 4 + 1) * 2 * 256
    table = ft.params.format_breakdown(cfg)
    for number in ("2,560,000", "1,048,576", "2,097,152", "5,705,728", f"{b['total']:,}"):
        assert number in table


@pytest.mark.parametrize(
    "changes",
    [
        dict(n_kv_heads=1, activation="swiglu", bias=False, tie_embeddings=False),
        dict(norm="rmsnorm", norm_position="post", positional="rope"),
        dict(positional="sinusoidal", n_kv_heads=3, activation="gelu_tanh"),
        dict(n_kv_heads=1, activation="swiglu", bias=False, norm="rmsnorm", positional="rope",
             attention=Attention(head_dim=10, qkv_bias=True, qk_norm=True)),
    ],
)
def test_breakdown_total_equals_the_counted_params_for_other_architectures(changes):
    cfg = make(**changes)
    b = ft.params.param_breakdown(cfg)
    assert b["total"] == ft.count_params(ft.init_params(cfg))
    assert b["total"] - b["estimate"] == sum(n for _, n in b["left_out"])


def test_replace_n_heads_keeps_plain_multi_head_attention():
    cfg = ft.PRESETS["tiny"].replace(n_heads=4, d_model=32)
    assert cfg.n_kv_heads == 4
    gqa = ft.PRESETS["tiny"].replace(n_kv_heads=1)
    assert gqa.replace(n_heads=1).n_kv_heads == 1


# ---------------------------------------------------------------- the grouped choices of modern checkpoints

MODERN = dict(norm="rmsnorm", positional="rope", activation="swiglu", bias=False)

INVALID_MODERN = [
    (dict(attention=Attention(head_dim=7), positional="rope"), ["rope", "head_dim=7", "even"]),
    (dict(attention=Attention(qkv_bias=True), bias=True), ["qkv_bias=True", "bias=False", "got bias=True"]),
    (dict(attention=Attention(window=(4, 8, 2))), ["window", "3 entries", "n_layers=2"]),
    (dict(norm_upcast=True, norm="layernorm"), ["float32", "rmsnorm", "'layernorm'"]),
    (dict(rope_scaling=RopeScaling("linear", 2.0), positional="learned"), ["scaling", "'rope'", "'learned'"]),
]


@pytest.mark.parametrize(("changes", "words"), INVALID_MODERN, ids=[repr(c) for c, _ in INVALID_MODERN])
def test_grouped_choices_are_checked_against_the_rest_of_the_config(changes, words):
    with pytest.raises(ValueError) as info:
        make(**changes)
    assert_names_all(str(info.value), words)


INVALID_PARTS = [
    (lambda: Attention(head_dim=0), ["head_dim", "positive", "0"]),
    (lambda: Attention(window=0), ["window", "positive", "0"]),
    (lambda: Attention(window=(4, -1)), ["window[1]", "positive", "-1"]),
    (lambda: RopeScaling("linear", 0.0), ["factor", "0.0", "positive"]),
    (lambda: RopeScaling("ntk", 2.0), ["'ntk'", *map(repr, ROPE_SCALINGS)]),
    (lambda: RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0),
     ["high_freq_factor > low_freq_factor", "high_freq_factor=1.0", "low_freq_factor=4.0"]),
]


@pytest.mark.parametrize(("build", "words"), INVALID_PARTS, ids=[w[0] for _, w in INVALID_PARTS])
def test_sub_configs_validate_their_own_fields(build, words):
    with pytest.raises(ValueError) as info:
        build()
    assert_names_all(str(info.value), words)


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope"])
def test_rope_scalings_not_implemented_yet_say_so_and_list_the_supported_ones(kind):
    with pytest.raises(ValueError, match="not implemented yet") as info:
        RopeScaling(kind, 4.0)
    assert_names_all(str(info.value), [repr(kind), "'linear'", "'llama3'"])


def test_explicit_head_dim_frees_d_model_from_n_heads():
    cfg = make(d_model=25, n_heads=3, n_kv_heads=1, attention=Attention(head_dim=6), **MODERN)
    assert cfg.head_dim == 6
    assert make().head_dim == 8  # still derived when not given


def test_layer_window_reads_one_window_for_all_layers_or_one_per_layer():
    assert [make().layer_window(i) for i in range(2)] == [None, None]
    assert [make(attention=Attention(window=5)).layer_window(i) for i in range(2)] == [5, 5]
    assert [make(attention=Attention(window=(None, 3))).layer_window(i) for i in range(2)] == [None, 3]


def test_every_new_choice_survives_to_dict_json_from_dict():
    cfg = make(
        **MODERN, n_kv_heads=1, norm_upcast=True, rope_base=5e5,
        attention=Attention(head_dim=10, qkv_bias=True, qk_norm=True, window=(4, None)),
        rope_scaling=RopeScaling("llama3", 8.0, original_max_seq_len=64),
    )
    back = ft.Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert back.attention.window == (4, None)


def test_an_old_checkpoints_config_dict_still_loads_with_the_defaults():
    old = {k: v for k, v in make().to_dict().items() if k not in ("attention", "rope_scaling", "norm_upcast")}
    cfg = ft.Config.from_dict(old)
    assert cfg == make()
    assert (cfg.attention, cfg.positional.scaling, cfg.norm.float32) == (Attention(), None, "none")


def test_from_dict_names_an_unknown_sub_config_field():
    d = make().to_dict()
    d["attention"] = {**d["attention"], "alibi": True}
    with pytest.raises(ValueError, match="unknown Attention field.*alibi"):
        ft.Config.from_dict(d)


# ---------------------------------------------------------------- 0.3: sizes plus one spec per layer kind

from ftransformer.config import FLAT_NAMES, SPECS, Embeddings, Layout, Norm, Positional, upgrade  # noqa: E402


def test_config_is_sizes_plus_specs_with_at_most_17_top_level_fields():
    names = [f.name for f in dataclasses.fields(ft.Config)]
    assert len(names) <= 17, names
    assert set(SPECS) <= set(names)


def test_new_style_construction_equals_the_flat_one_through_the_converter():
    new = ft.Config(vocab_size=37, d_model=24, n_heads=3, n_layers=2, d_ff=40, max_seq_len=16, bias=False, activation="swiglu", norm=Norm("rmsnorm", eps=1e-6, float32="normalize"),
                    positional=Positional("rope", base=5e5, rotary_dim=4), layout=Layout(norm_position="output"),
                    embeddings=Embeddings(tie=False, logit_softcap=3.0))
    flat = make(bias=False, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, norm_upcast=True,
                positional="rope", rope_base=5e5, norm_position="output", tie_embeddings=False, logit_softcap=3.0,
                attention={"rotary_dim": 4})
    assert new == flat


@pytest.mark.parametrize(("upcast", "in_float32", "expected"), [
    (False, False, "none"), (True, False, "normalize"), (True, True, "normalize_and_scale")])
def test_the_three_rounding_flags_become_one_field(upcast, in_float32, expected):
    cfg = make(norm="rmsnorm", norm_upcast=upcast, norm_scale_in_float32=in_float32)
    assert cfg.norm.float32 == expected
    assert (cfg.to_flat()["norm_upcast"], cfg.to_flat()["norm_scale_in_float32"]) == (upcast, in_float32)


def test_to_flat_is_the_converters_inverse_for_every_flat_name():
    cfg = make(norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, positional="rope", rope_base=7.0,
               rope_in_float32=True, norm_position="sandwich", embed_scale=True, logit_softcap=2.0,
               tie_embeddings=False, attention=Attention(window=(None, 3)), window_rope_base=11.0)
    flat = cfg.to_flat()
    assert ft.Config.from_flat(**{k: v for k, v in flat.items() if k not in ("head_dim", "rotary_dim")}) == cfg
    assert set(FLAT_NAMES) <= set(flat)


def test_replace_takes_new_fields_and_flat_names_keeping_the_rest_of_a_spec():
    cfg = make(norm="rmsnorm", norm_eps=1e-6)
    assert cfg.replace(norm_unit_offset=True).norm == Norm("rmsnorm", eps=1e-6, unit_offset=True)
    assert cfg.replace(norm=Norm()).norm == Norm()
    assert cfg.norm.replace(eps=1e-3).eps == 1e-3
    with pytest.raises(ValueError, match="unknown Norm field"):
        cfg.norm.replace(epsilon=1.0)


def test_specs_validate_their_fields_naming_the_spec():
    for build, words in [(lambda: Norm("layernorm", unit_offset=True), ["Norm.unit_offset", "rmsnorm"]),
                         (lambda: Positional("learned", rotary_dim=4), ["Positional.rotary_dim", "'rope'"]),
                         (lambda: Layout(residual="parallel", mlp=False), ["Layout.residual", "mlp=False"]),
                         (lambda: Embeddings(logit_softcap=-1.0), ["logit_softcap", "positive"])]:
        with pytest.raises(ValueError) as info:
            build()
        assert_names_all(str(info.value), words)


def test_a_02_config_json_with_rotary_dim_on_the_attention_upgrades():
    old = {**BASE, "positional": "rope", "norm": "rmsnorm", "norm_upcast": True, "norm_scale_in_float32": False,
           "rope_base": 1e4, "rope_scaling": {"kind": "linear", "factor": 2.0}, "attention": {"rotary_dim": 4,
           "window": [3, None]}, "mlp": True, "residual": "sequential", "norm_position": "pre"}
    cfg = ft.Config.from_dict(json.loads(json.dumps(old)))
    assert Positional("rope", scaling=RopeScaling("linear", 2.0), rotary_dim=4) == cfg.positional
    assert cfg.attention.window == (3, None) and cfg.norm.float32 == "normalize"
    assert ft.Config(**upgrade(json.loads(json.dumps(cfg.to_dict())))) == cfg


def test_attn_impl_left_the_config_old_files_load_and_code_is_told_where_it_went():
    """0.2 kept the attention kernel in the config; it is a runtime choice now (``layers.attention_kernel``)."""
    cfg = ft.PRESETS["tiny"]
    assert "attn_impl" not in {f.name for f in dataclasses.fields(ft.Config)}
    old = {**cfg.to_flat(), "attn_impl": "einsum"}
    for derived in ("attention", "head_dim", "rotary_dim"):
        old.pop(derived)
    assert ft.Config.from_dict(old) == cfg  # a saved 0.2 config: the kernel is dropped, the model is the same
    for make in (lambda: cfg.replace(attn_impl="einsum"), lambda: ft.Config.from_flat(**old)):
        with pytest.raises(TypeError, match="attention_kernel"):
            make()
