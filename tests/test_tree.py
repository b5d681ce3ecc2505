"""ftransformer.tree: leaves, flatten/unflatten, the path convention, to, stack/unstack."""

from collections import OrderedDict

import pytest
import torch
import torch.utils._pytree as pytree

import ftransformer as ft
from ftransformer import optim, params, tree
from ftransformer.layers.int8 import Int8Weight
from ftransformer.quantization import quantize

# every axis a different size: vocab 13, d_model 12, heads 3, d_ff 20, seq 7, layers 2
CFG = ft.Config(vocab_size=13, d_model=12, n_heads=3, n_layers=2, d_ff=20, max_seq_len=7)


def adamw_state(p):
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    return opt.init(p)


def mixed_tree():
    """Every container kind the walk knows, and leaves of other kinds (None, an int)."""
    return {
        "a": [torch.ones(2), (torch.zeros(3), None)],
        "od": OrderedDict(z=torch.arange(4), y=torch.tensor(1.5)),
        "nt": optim.SGDState(count=torch.tensor(2), lr=torch.tensor(0.1), trace=()),
        "size": torch.Size([2, 3]),
        "n": 7,
    }


def test_leaves_are_in_torch_pytree_order():
    p = ft.init_params(CFG)
    for t in (p, adamw_state(p), mixed_tree(), quantize(p, CFG)):
        ours, theirs = tree.leaves(t), pytree.tree_leaves(t)
        assert len(ours) == len(theirs) and all(a is b for a, b in zip(ours, theirs))


def test_flatten_unflatten_round_trips_every_container():
    t = mixed_tree()
    values, treedef = tree.flatten(t)
    back = tree.unflatten(values, treedef)
    assert pytree.tree_structure(back) == pytree.tree_structure(t)
    assert type(back["od"]) is OrderedDict and type(back["nt"]) is optim.SGDState
    assert back["a"][1][1] is None and back["size"] == torch.Size([2, 3])
    assert tree.num_leaves(treedef) == len(values) == 10
    # a tree definition compares with ==: the same structure gives an equal one
    assert tree.flatten(mixed_tree())[1] == treedef


def test_is_leaf_stops_the_walk():
    q = quantize(ft.init_params(CFG), CFG)
    whole = tree.leaves(q, is_leaf=lambda x: isinstance(x, Int8Weight))
    assert sum(isinstance(x, Int8Weight) for x in whole) == 2 * 4  # w_qkv, w_o, w_in, w_out per block
    assert len(tree.leaves(q)) == len(whole) + 2 * 4  # each one is two tensors otherwise


def test_flatten_like_says_expected_and_got():
    p = ft.init_params(CFG)
    _, treedef = tree.flatten(p)
    assert len(tree.flatten_like(p, treedef)) == len(tree.leaves(p))
    with pytest.raises(ValueError, match=r"grads must have the same tree structure as params: expected 28 paths, "
                                         r"got 0 missing \(\[\]\) and 1 unexpected \(\['extra'\]\)"):
        tree.flatten_like({**p, "extra": torch.ones(1)}, treedef, "grads")
    # same paths, other containers: both structures are shown
    with pytest.raises(ValueError, match=r"expected TreeSpec\(list.*got TreeSpec\(tuple"):
        tree.flatten_like((torch.ones(1),), tree.flatten([torch.ones(1)])[1])


def test_map_zips_trees_and_keeps_structure():
    t = {"a": torch.ones(2), "b": [torch.ones(3)]}
    out = tree.map(lambda x, y: x + 2 * y, t, t)
    assert torch.equal(out["b"][0], torch.full((3,), 3.0)) and torch.equal(t["a"], torch.ones(2))
    q = quantize(ft.init_params(CFG), CFG)
    names = tree.map(lambda x: type(x).__name__, q, is_leaf=lambda x: isinstance(x, Int8Weight))
    assert names["blocks"][0]["attn"]["w_qkv"] == "Int8Weight"


def test_to_casts_floats_and_moves_everything():
    t = {"w": torch.ones(2), "i": torch.arange(3), "n": 4}
    out = tree.to(t, dtype=torch.float16, device="meta")
    assert out["w"].dtype == torch.float16 and out["i"].dtype == torch.int64 and out["n"] == 4
    assert out["w"].device.type == out["i"].device.type == "meta"


# ---------------------------------------------------------------- the path convention


def test_paths_of_params_int8_and_optimizer_states():
    p = ft.init_params(CFG)
    assert list(tree.flatten_with_paths(p))[:3] == ["embed.tokens", "embed.positions", "blocks.0.ln1.scale"]
    q = tree.flatten_with_paths(quantize(p, CFG))
    assert q["blocks.1.mlp.w_out.q"].dtype == torch.int8 and q["blocks.1.mlp.w_out.scale"].shape == (12,)
    s = tree.flatten_with_paths(adamw_state(p))
    # chain position, NamedTuple field, then the params' own path; EmptyState has no leaves
    assert list(s)[:3] == ["1.count", "1.lr", "1.mu.embed.tokens"]
    assert "1.nu.blocks.1.attn.w_o" in s
    assert list(tree.flatten_with_paths(optim.sgd(0.1).init(p))) == ["count", "lr"]  # trace=() has no leaves


def test_paths_and_leaves_agree():
    p = ft.init_params(CFG)
    for t in (p, adamw_state(p), quantize(p, CFG)):
        flat = tree.flatten_with_paths(t)
        assert all(a is b for a, b in zip(flat.values(), tree.leaves(t))) and len(flat) == len(tree.leaves(t))


def test_paths_refuse_a_dotted_key_that_collides():
    with pytest.raises(ValueError, match=r"expected one leaf per path, got several at \['a.b'\]"):
        tree.flatten_with_paths({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}})


def test_unflatten_paths_without_template_builds_dicts_and_lists():
    p = ft.init_params(CFG)
    back = tree.unflatten_paths(tree.flatten_with_paths(p))
    assert pytree.tree_structure(back) == pytree.tree_structure(p)
    assert tree.unflatten_paths({"x.0": 1, "x.2": 2}) == {"x": {"0": 1, "2": 2}}  # not 0..n-1: stays a dict


def test_unflatten_paths_with_template_restores_its_structure():
    p = ft.init_params(CFG)
    for t in (adamw_state(p), quantize(p, CFG)):
        flat = tree.flatten_with_paths(t)
        shuffled = dict(sorted(flat.items()))  # safetensors hands keys back sorted
        back = tree.unflatten_paths(shuffled, like=t)
        assert pytree.tree_structure(back) == pytree.tree_structure(t)
        assert all(a is b for a, b in zip(tree.leaves(back), tree.leaves(t)))


def test_unflatten_paths_names_missing_and_unexpected_paths():
    p = ft.init_params(CFG)
    flat = tree.flatten_with_paths(p)
    flat.pop("ln_f.bias")
    flat["ln_f.gain"] = torch.ones(12)
    with pytest.raises(ValueError, match=r"1 missing \(\['ln_f.bias'\]\) and 1 unexpected \(\['ln_f.gain'\]\)"):
        tree.unflatten_paths(flat, like=p)


def test_params_no_longer_forwards_the_tree_helpers():
    for old in ("tree_map", "tree_leaves", "tree_to", "tree_flatten_with_paths", "tree_unflatten_paths"):
        assert not hasattr(params, old), f"params.{old} was removed in 0.3 (ftransformer.tree has it)"


# ---------------------------------------------------------------- stack / unstack


def test_stack_unstack_round_trip():
    members = [ft.init_params(CFG, seed=s) for s in range(3)]
    stacked = tree.stack(members)
    assert stacked["blocks"][1]["attn"]["w_qkv"].shape == (3, 12, 36)
    for i, member in enumerate(members):
        assert all(torch.equal(a[i], b) for a, b in zip(tree.leaves(stacked), tree.leaves(member)))
    for got, want in zip(tree.unstack(stacked), members):
        assert pytree.tree_structure(got) == pytree.tree_structure(want)
        assert all(torch.equal(a, b) for a, b in zip(tree.leaves(got), tree.leaves(want)))


def test_stack_works_for_optimizer_states():
    states = [adamw_state(ft.init_params(CFG, seed=s)) for s in range(2)]
    stacked = tree.stack(states)
    assert type(stacked[1]) is optim.AdamWState and stacked[1].count.shape == (2,)
    assert type(tree.unstack(stacked)[0][1]) is optim.AdamWState


def test_stack_errors_name_the_member_and_both_shapes():
    p = ft.init_params(CFG)
    with pytest.raises(ValueError, match="stack needs at least one tree, got none"):
        tree.stack([])
    with pytest.raises(ValueError, match=r"trees\[1\] must have the same tree structure"):
        tree.stack([p, {k: v for k, v in p.items() if k != "ln_f"}])
    wider = ft.init_params(ft.Config(vocab_size=14, d_model=12, n_heads=3, n_layers=2, d_ff=20, max_seq_len=7))
    with pytest.raises(ValueError, match=r"trees\[2\] has a leaf of shape \(14, 12\) .* trees\[0\] has \(13, 12\)"):
        tree.stack([p, p, wider])
    with pytest.raises(ValueError, match=r"torch.float16.*torch.float32"):
        tree.stack([p, tree.to(p, dtype=torch.float16)])


def test_unstack_errors():
    with pytest.raises(ValueError, match="unstack needs a tree with at least one tensor, got none"):
        tree.unstack({"a": []})
    with pytest.raises(ValueError, match=r"one leading member axis, got leading sizes \['2', '3'\]"):
        tree.unstack({"a": torch.ones(2, 4), "b": torch.ones(3)})
    with pytest.raises(ValueError, match=r"got leading sizes \['2', 'None'\]"):
        tree.unstack({"a": torch.ones(2), "b": torch.tensor(1.0)})


def test_flatten_and_unflatten_leave_no_reference_cycle():
    """A leaf passed through ``flatten`` / ``unflatten`` dies with its last reference, without the cyclic GC:
    a step's gradients must not wait for it (that held a whole extra set of them)."""
    import gc
    import weakref

    gc.disable()
    try:
        leaf = torch.ones(3)
        alive = weakref.ref(leaf)
        values, treedef = tree.flatten({"a": [leaf], "b": {"c": torch.zeros(2)}})
        rebuilt = tree.unflatten(values, treedef)
        del leaf, values, rebuilt
        assert alive() is None
    finally:
        gc.enable()
