"""Low-rank adapters (ftransformer.peft): step-0 equality, merge, DoRA's formula, dropout, adapter-only training."""

import pytest
import torch

import ftransformer as ft
from ftransformer import peft
from ftransformer.config import Attention
from ftransformer.layers.adapter import AdapterDropout, DoRAWeight, LoRAWeight
from ftransformer.layers.linear import linear
from hf_tiny import FAMILY_II_OPTIONS, FAMILY_OPTIONS, build, tokens as hf_tokens

F64 = torch.float64
LAYOUTS = {
    # tied, biases (b_in etc. matched by "mlp.*" and skipped), GELU, multi-head
    "gpt": {},
    # GQA (one kv head), SwiGLU, RMSNorm, RoPE, untied, no biases
    "llama": dict(positional="rope", n_kv_heads=1, activation="swiglu", norm="rmsnorm", bias=False,
                  tie_embeddings=False),
    # GPT-NeoX's parallel residual with grouped queries
    "neox": dict(positional="rope", n_kv_heads=1, residual="parallel"),
    # Qwen3-like: per-head q/k norms, a gated GeGLU MLP (w_gate matched by "mlp.*" too), untied
    "qwen3": dict(positional="rope", n_kv_heads=1, attention=Attention(qk_norm=True), activation="geglu_tanh",
                  norm="rmsnorm", tie_embeddings=False),
}


def config(name: str) -> ft.Config:
    return ft.PRESETS["tiny"].replace(**LAYOUTS[name])


def targets_for(cfg: ft.Config) -> tuple[str, ...]:
    return peft.DEFAULT_TARGETS + (() if cfg.embeddings.tie else ("unembed.w",))


def tokens(cfg: ft.Config, gen: torch.Generator, shape=(3, 7)) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=gen)


def perturbed(params: dict, seed: int) -> dict:
    """``params`` with every adapter's ``b`` (and DoRA's ``m``) moved off its initial value."""
    trainable, frozen = peft.split(params)
    gen = torch.Generator().manual_seed(seed)
    moved = ft.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype), trainable)
    return peft.combine(moved, frozen)


def base_of(cfg: ft.Config, int8: bool = False) -> dict:
    params = ft.init_params(cfg, seed=0, dtype=F64)
    return ft.quantize(params, cfg) if int8 else params


# ---------------------------------------------------------------- step 0, merge, DoRA's formula


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_step_zero_equals_the_base_bit_for_bit(gen, name, dora, int8):
    cfg = config(name)
    params = base_of(cfg, int8)
    adapted = peft.lora(params, cfg, rank=3, alpha=6.0, targets=targets_for(cfg), key=ft.random.key(1), dora=dora)
    kind = DoRAWeight if dora else LoRAWeight
    assert isinstance(adapted["blocks"][1]["attn"]["w_qkv"], kind)
    assert isinstance(adapted["blocks"][0]["mlp"]["w_out"], kind)
    assert adapted["blocks"][0]["attn"]["w_qkv"].base is params["blocks"][0]["attn"]["w_qkv"]  # shared, not copied
    x = tokens(cfg, gen)
    assert torch.equal(ft.forward(adapted, x, cfg), ft.forward(params, x, cfg))


def test_init_follows_peft(gen):
    cfg = config("llama")
    adapted = peft.lora(base_of(cfg), cfg, rank=4, alpha=16.0, key=ft.random.key(0), dora=True)
    w = adapted["blocks"][0]["mlp"]["w_in"]
    d_in, d_out = w.base.shape
    assert w.a.shape == (d_in, 4) and w.b.shape == (4, d_out) and w.m.shape == (d_out,)
    assert w.a.dtype == F64 and float(w.scale) == 4.0 and not w.b.any()
    assert float(w.a.abs().max()) <= d_in**-0.5 and float(w.a.abs().max()) > 0.8 * d_in**-0.5
    # m is the base's column norms (computed as layers.adapter.column_norm computes them, from a sum of squares,
    # so step 0 is exact: m / column_norm == 1); torch's norm rounds differently in the last bit.
    torch.testing.assert_close(w.m, w.base.norm(dim=0), rtol=1e-14, atol=0)
    assert not torch.equal(w.a, adapted["blocks"][1]["mlp"]["w_in"].a)  # every adapter its own draw


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_merge_equals_the_adapted_forward(gen, name, dora, int8):
    cfg = config(name)
    params = base_of(cfg, int8)
    adapted = perturbed(peft.lora(params, cfg, rank=2, alpha=3.0, targets=targets_for(cfg), key=ft.random.key(2),
                                  dora=dora), seed=3)
    merged = peft.merge(adapted)
    assert not any(isinstance(x, (LoRAWeight, DoRAWeight)) for x in ft.tree.leaves(
        merged, is_leaf=lambda x: isinstance(x, (LoRAWeight, DoRAWeight))))
    assert isinstance(merged["blocks"][0]["attn"]["w_o"], torch.Tensor)
    x = tokens(cfg, gen)
    want = ft.forward(adapted, x, cfg)
    assert not torch.allclose(want, ft.forward(params, x, cfg))  # the adapters do something
    torch.testing.assert_close(ft.forward(merged, x, cfg), want, rtol=0, atol=1e-10)


def adapter(gen: torch.Generator, d_in=5, d_out=7, rank=3) -> DoRAWeight:
    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return DoRAWeight(draw(d_in, d_out), draw(d_in, rank), draw(rank, d_out), torch.tensor(0.7, dtype=F64),
                      draw(d_out).abs() + 0.5)


def test_dora_equals_its_formula_with_the_norm_detached(gen):
    w = adapter(gen)
    x = torch.randn(2, 4, 5, generator=gen, dtype=F64)

    def reference(a, b, m, detach):
        v = w.base + w.scale * a @ b
        norm = v.norm(dim=0)
        return x @ (m * v / (norm.detach() if detach else norm))

    def ours(a, b, m):
        return linear(x, DoRAWeight(w.base, a, b, w.scale, m))

    torch.testing.assert_close(ours(w.a, w.b, w.m), reference(w.a, w.b, w.m, False), rtol=0, atol=1e-12)
    torch.testing.assert_close(peft.merge({"w": w})["w"], w.m * (w.base + w.scale * w.a @ w.b)
                               / (w.base + w.scale * w.a @ w.b).norm(dim=0), rtol=0, atol=1e-12)
    grads = torch.func.grad(lambda *t: ours(*t).square().sum(), argnums=(0, 1, 2))(w.a, w.b, w.m)
    detached = torch.func.grad(lambda *t: reference(*t, True).square().sum(), argnums=(0, 1, 2))(w.a, w.b, w.m)
    full = torch.func.grad(lambda *t: reference(*t, False).square().sum(), argnums=(0, 1, 2))(w.a, w.b, w.m)
    for g, want, other in zip(grads, detached, full):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-10)
    assert not torch.allclose(grads[0], full[0])  # detaching the norm is a real difference


def test_adapter_dropout_drops_the_adapter_input_only(gen):
    w = adapter(gen)
    lora_w = LoRAWeight(*w[:4])
    x = torch.randn(3, 5, generator=gen, dtype=F64)
    key = ft.random.key(5)
    dropped = ft.random.dropout(x, 0.4, key)
    assert not torch.equal(dropped, x)
    bias = torch.randn(7, generator=gen, dtype=F64)
    want = x @ w.base + bias + w.scale * (dropped @ w.a) @ w.b
    torch.testing.assert_close(linear(x, AdapterDropout(lora_w, 0.4, key), bias), want, rtol=0, atol=1e-12)
    g = w.m / (w.base + w.scale * w.a @ w.b).norm(dim=0)  # PEFT's DoRA forward with lora_dropout
    want = x @ w.base + bias + (g - 1) * (dropped @ w.base) + g * w.scale * ((dropped @ w.a) @ w.b)
    torch.testing.assert_close(linear(x, AdapterDropout(w, 0.4, key), bias), want, rtol=0, atol=1e-12)
    # without dropout the bias stays outside DoRA's rescaling: g * (x @ V) + bias
    want = x @ (w.m * (w.base + w.scale * w.a @ w.b) / (w.base + w.scale * w.a @ w.b).norm(dim=0)) + bias
    torch.testing.assert_close(linear(x, w, bias), want, rtol=0, atol=1e-12)


def test_dropout_is_off_without_a_key(gen):
    cfg = config("gpt")
    adapted = perturbed(peft.lora(base_of(cfg), cfg, rank=2, alpha=2.0, key=ft.random.key(0)), seed=1)
    assert peft.dropout(adapted, 0.3, None) is adapted and peft.dropout(adapted, 0.0, ft.random.key(1)) is adapted
    x = tokens(cfg, gen)
    on = peft.dropout(adapted, 0.3, ft.random.key(1))
    assert isinstance(on["blocks"][0]["attn"]["w_o"], AdapterDropout)
    assert on["blocks"][0]["attn"]["w_o"].key.tolist() != on["blocks"][1]["attn"]["w_o"].key.tolist()
    assert not torch.allclose(ft.forward(on, x, cfg), ft.forward(adapted, x, cfg))
    again = ft.forward(peft.dropout(adapted, 0.3, ft.random.key(1)), x, cfg)
    assert torch.equal(again, ft.forward(on, x, cfg))
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\), got 1.5"):
        peft.dropout(adapted, 1.5, ft.random.key(1))


# ---------------------------------------------------------------- split, training, vmap, checkpoints


def graph_leaves(loss: torch.Tensor) -> set[int]:
    """ids of the tensors autograd would accumulate a gradient into, walking ``loss``'s whole graph."""
    seen, found, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        todo += [f for f, _ in fn.next_functions]
    return found


@pytest.mark.parametrize("dora", [False, True])
def test_no_gradient_is_computed_for_the_base(gen, dora):
    cfg = config("llama")
    adapted = peft.lora(base_of(cfg), cfg, rank=2, alpha=4.0, targets=targets_for(cfg), key=ft.random.key(0), dora=dora)
    trainable, frozen = peft.split(adapted)
    base = ft.tree.leaves(frozen)
    x, y = tokens(cfg, gen), tokens(cfg, gen)
    grads = torch.func.grad(peft.adapter_loss)(trainable, frozen, x, y, cfg)
    assert list(ft.tree.flatten_with_paths(grads)) == list(ft.tree.flatten_with_paths(trainable))
    assert all(p.endswith((".a", ".b", ".m")) for p in ft.tree.flatten_with_paths(grads))
    # Plain autograd too: the graph reaches the adapter tensors and not one base tensor.
    leaves = ft.tree.map(lambda t: t.detach().requires_grad_(True), trainable)
    loss = peft.adapter_loss(leaves, frozen, x, y, cfg)
    assert graph_leaves(loss) == {id(t) for t in ft.tree.leaves(leaves)}
    loss.backward()
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad and t.grad is None for t in base)


@pytest.mark.parametrize("dora", [False, True])
def test_training_adapters_lowers_the_loss_and_leaves_the_base_alone(gen, dora):
    cfg = config("llama")
    params = base_of(cfg)
    before = [t.clone() for t in ft.tree.leaves(params)]
    trainable, frozen = peft.split(peft.lora(params, cfg, rank=4, alpha=8.0, key=ft.random.key(0), dora=dora))
    step = peft.make_adapter_step(cfg, ft.optim.adamw(lr=1e-2, weight_decay=0.0), frozen, dropout=0.1)
    state = step.init(trainable)
    batch = (tokens(cfg, gen, (4, 12)), tokens(cfg, gen, (4, 12)))
    losses = []
    for i in range(15):
        trainable, state, metrics = step(trainable, state, batch, ft.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(a, b) for a, b in zip(before, ft.tree.leaves(params)))
    held = ft.tree.flatten_with_paths(frozen)  # an adapted matrix sits at its path + ".base"
    for path, b in zip(ft.tree.flatten_with_paths(params), before):
        assert torch.equal(held.get(path, held.get(f"{path}.base")), b), path
    n_adapter = ft.count_params(trainable)
    assert sum(t.numel() for t in ft.tree.leaves(state) if t.is_floating_point() and t.ndim) == 2 * n_adapter
    x = tokens(cfg, gen)
    assert not torch.allclose(ft.forward(peft.combine(trainable, frozen), x, cfg), ft.forward(params, x, cfg))


def test_two_adapters_under_vmap_on_one_shared_base_equal_each_alone(gen):
    cfg = config("llama")
    params = base_of(cfg)
    members = [perturbed(peft.lora(params, cfg, rank=2, alpha=2.0, key=ft.random.key(s)), seed=s) for s in (1, 2)]
    split = [peft.split(m) for m in members]
    frozen = split[0][1]
    stacked = ft.tree.stack([t for t, _ in split])
    x = tokens(cfg, gen)

    def run(trainable, frozen):
        return ft.forward(peft.combine(trainable, frozen), x, cfg)

    together = torch.func.vmap(run, in_dims=(0, None))(stacked, frozen)
    for i, member in enumerate(members):
        torch.testing.assert_close(together[i], ft.forward(member, x, cfg), rtol=0, atol=1e-10)
    assert not torch.allclose(together[0], together[1])
    y = tokens(cfg, gen)
    grads = torch.func.vmap(torch.func.grad(peft.adapter_loss), in_dims=(0, None, None, None, None))(
        stacked, frozen, x, y, cfg)
    for i, (trainable, _) in enumerate(split):
        alone = torch.func.grad(peft.adapter_loss)(trainable, frozen, x, y, cfg)
        for g, want in zip(ft.tree.leaves(grads), ft.tree.leaves(alone)):
            torch.testing.assert_close(g[i], want, rtol=0, atol=1e-10)


def test_checkpoint_of_the_trainable_tree(tmp_path, gen):
    cfg = config("gpt")
    trainable, frozen = peft.split(perturbed(peft.lora(base_of(cfg), cfg, rank=2, alpha=2.0, key=ft.random.key(0),
                                                       dora=True), seed=4))
    opt = ft.optim.adamw(lr=1e-3)
    ft.save_checkpoint(tmp_path / "ck", params=trainable, config={"adapter": "dora", "rank": 2}, step=7,
                       opt_state=opt.init(trainable))
    back = ft.checkpoint.load_tree(tmp_path / "ck", like=trainable)
    assert back.step == 7 and back.config == {"adapter": "dora", "rank": 2}
    assert set(back.opt_state) and all(".w_" in k for k in back.opt_state if k.count(".") > 2)
    for (p, a), (q, b) in zip(ft.tree.flatten_with_paths(trainable).items(), ft.tree.flatten_with_paths(back.params).items()):
        assert p == q and torch.equal(a, b)
    x = tokens(cfg, gen)
    assert torch.equal(ft.forward(peft.combine(back.params, frozen), x, cfg),
                       ft.forward(peft.combine(trainable, frozen), x, cfg))


@pytest.mark.slow
def test_adapted_forward_compiles_in_one_graph(gen, no_typecheck):
    cfg = config("llama")
    adapted = perturbed(peft.lora(ft.init_params(cfg, seed=0), cfg, rank=2, alpha=2.0, key=ft.random.key(0),
                                  dora=True), seed=1)
    x = tokens(cfg, gen)
    compiled = torch.compile(ft.model.forward_unchecked, fullgraph=True)
    torch.testing.assert_close(compiled(adapted, x, cfg), ft.forward(adapted, x, cfg), rtol=1e-5, atol=1e-5)


FAMILIES = sorted({**FAMILY_OPTIONS, **FAMILY_II_OPTIONS})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_step_zero_and_merge(tmp_path, family):
    pytest.importorskip("transformers")
    build(family, tmp_path)
    cfg, params = ft.load_hf(tmp_path, dtype=F64)
    dora = FAMILIES.index(family) % 2 == 1  # half the families LoRA, half DoRA
    adapted = peft.lora(params, cfg, rank=2, alpha=4.0, targets=targets_for(cfg), key=ft.random.key(0), dora=dora)
    x = hf_tokens(2, 9)
    assert torch.equal(ft.forward(adapted, x, cfg), ft.forward(params, x, cfg))
    adapted = perturbed(adapted, seed=1)
    want = ft.forward(adapted, x, cfg)
    assert not torch.allclose(want, ft.forward(params, x, cfg))
    torch.testing.assert_close(ft.forward(peft.merge(adapted), x, cfg), want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- errors


def test_bad_input_gives_clear_errors():
    cfg = config("gpt")
    params = base_of(cfg)
    key = ft.random.key(0)
    with pytest.raises(ValueError, match="target 'blocks.*.attn.w_q' matched no parameter"):
        peft.lora(params, cfg, rank=2, alpha=1.0, targets=("blocks.*.attn.w_q",), key=key)
    with pytest.raises(ValueError, match="rank"):
        peft.lora(params, cfg, rank=0, alpha=1.0, key=key)
    with pytest.raises(ValueError, match=r"matched no \[d_in, d_out\] matrix.*\(24,\)"):
        peft.lora(params, cfg, rank=2, alpha=1.0, targets=("blocks.*.ln1.scale",), key=key)
    with pytest.raises(ValueError, match="matched no .d_in, d_out. matrix"):
        peft.lora(params, cfg, rank=2, alpha=1.0, targets=("embed.tokens",), key=key)
    with pytest.raises(TypeError, match="key"):
        peft.lora(params, cfg, rank=2, alpha=1.0, key=0)
    adapted = peft.lora(params, cfg, rank=2, alpha=1.0, key=key)
    with pytest.raises(ValueError, match="already hold adapters"):
        peft.lora(adapted, cfg, rank=2, alpha=1.0, key=key)
    with pytest.raises(ValueError, match="params hold no adapter"):
        peft.split(params)
    trainable, frozen = peft.split(adapted)
    del trainable["blocks"][0]["attn"]["w_o"]
    with pytest.raises(ValueError, match=r"trainable has no adapter at 'blocks.0.attn.w_o'"):
        peft.combine(trainable, frozen)


def test_exports():
    assert {"lora", "merge", "split", "combine"} <= set(peft.__all__)
    assert "lora" not in ft.__all__


def test_an_int_alpha_is_a_scale_like_a_float():
    cfg = ft.PRESETS["tiny"]
    params = ft.init_params(cfg, seed=0)
    by_int = peft.lora(params, cfg, rank=2, alpha=4, key=ft.random.key(0))
    by_float = peft.lora(params, cfg, rank=2, alpha=4.0, key=ft.random.key(0))
    assert by_int["blocks"][0]["attn"]["w_o"].scale == by_float["blocks"][0]["attn"]["w_o"].scale == 2.0
