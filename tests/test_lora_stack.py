"""Many adapters on one frozen base (ftransformer.peft.stack): each member equals training it alone, the rank mask,
the shared (never batched) base, loop.fit with per-member checkpoints and exact resume, an adapter per batch row."""

import pytest
import torch

import ftransformer as ft
from ftransformer import peft
from ftransformer.layers import attention_kernel
from tests.typecheck import unchecked

F64 = torch.float64
CFG = ft.PRESETS["tiny"].replace(positional="rope", n_kv_heads=1, activation="swiglu", norm="rmsnorm", bias=False,
                                 tie_embeddings=False)
SEEDS, RANKS, ALPHA = (1, 2, 3), (2, 4, 3), 8.0
LRS = (2.0**-6, 2.0**-7, 2.0**-5)  # exact in float32, as the members' hparams are held
STEPS = 3


def base() -> dict:
    return ft.init_params(CFG, seed=0, dtype=F64)


def batches(gen: torch.Generator, members: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (members, 2, 9)
    return torch.randint(0, CFG.vocab_size, shape, generator=gen), torch.randint(0, CFG.vocab_size, shape, generator=gen)


def sgd(lr):
    return ft.optim.sgd(lr, momentum=0.9)


def adamw(lr):
    return ft.optim.adamw(lr, weight_decay=0.1)


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)))


@pytest.fixture(scope="module")
def trained():
    """Both optimizers: the stack after STEPS vmapped steps, and each member trained alone by make_adapter_step."""
    out = {}
    with unchecked():
        for name, make in (("sgd", sgd), ("adamw", adamw)):
            gen = torch.Generator().manual_seed(7)
            params, (tokens, targets) = base(), batches(gen)
            keys = torch.stack([ft.random.key(10 + i) for i in range(3)])
            stack = peft.stack_adapters(params, CFG, seeds=SEEDS, ranks=RANKS, alpha=ALPHA)
            step = peft.make_stack_step(CFG, stack, make, hparams={"lr": torch.tensor(LRS)}, dropout=0.1)
            trainable, state = stack.trainable, step.init(stack.trainable)
            for k in range(STEPS):
                trainable, state, metrics = step(trainable, state, (tokens, targets), keys + k)
            alone = []
            for i, (seed, rank) in enumerate(zip(SEEDS, RANKS)):
                t, frozen = peft.split(peft.lora(params, CFG, rank=rank, alpha=ALPHA, key=ft.random.key(seed)))
                one = peft.make_adapter_step(CFG, make(LRS[i]), frozen, dropout=0.1)
                s = one.init(t)
                for k in range(STEPS):
                    t, s, _ = one(t, s, (tokens[i], targets[i]), keys[i] + k)
                alone.append(t)
            out[name] = (params, stack._replace(trainable=trainable), state, metrics, alone)
    return out


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_each_member_equals_training_it_alone(trained, name):
    tol = 1e-10
    params, stack, state, metrics, alone = trained[name]
    assert metrics["loss"].shape == (3,) and len(ft.tree.leaves(state))
    for i, t in enumerate(alone):
        got, _ = peft.split(peft.member_adapters(stack, i))
        assert [x.shape for x in ft.tree.leaves(got)] == [x.shape for x in ft.tree.leaves(t)]
        assert max_diff(got, t) < tol, (i, max_diff(got, t))
    assert max_diff(*(ft.tree.map(lambda x: x[i], stack.trainable) for i in (0, 2))) > 1e-3  # members differ


def test_rank_masked_parts_stay_exactly_zero_and_get_zero_gradient(trained, gen):
    params, stack, *_ = trained["adamw"]
    flat = ft.tree.flatten_with_paths(stack.trainable)
    for i, r in enumerate(RANKS):
        for path, x in flat.items():
            if path.endswith(".a"):
                assert x[i, :, :r].abs().sum() > 0 and not x[i, :, r:].any(), path
            if path.endswith(".b"):
                assert not x[i, r:].any(), path
    # Even with the masked parts nonzero, the loss ignores them: their gradient is exactly zero.
    member = ft.tree.map(lambda x: x[0] + 0.1, stack.trainable)
    rank = stack.ranks[0]
    x, y = batches(gen, 1)
    grads = torch.func.grad(peft.adapter_loss)(member, peft.stack.scaled(stack.frozen, ALPHA, rank), x[0], y[0], CFG,
                                               view=lambda t: peft.stack.rank_mask(t, rank))
    for path, g in ft.tree.flatten_with_paths(grads).items():
        if path.endswith(".a"):
            assert not g[:, 2:].any() and g[:, :2].any(), path
        if path.endswith(".b"):
            assert not g[2:].any() and g[:2].any(), path


def test_the_base_is_shared_not_batched(trained):
    params, stack, *_ = trained["sgd"]
    w = params["blocks"][0]["attn"]["w_qkv"]
    assert stack.frozen["blocks"][0]["attn"]["w_qkv"].base is w  # one copy: the very tensor of params
    assert all(p.endswith((".a", ".b")) for p in ft.tree.flatten_with_paths(stack.trainable))
    n_base = sum(x.numel() for x in ft.tree.leaves(stack.frozen))
    assert n_base > ft.count_params(params) - 10  # the base once (plus a scale per adapter), not once per member
    assert torch.equal(stack.ranks, torch.tensor(RANKS))
    batched = ft.tree.map(lambda x: torch.stack([x, x]), stack.frozen)
    with pytest.raises(ValueError, match="frozen base is batched"):
        torch.func.vmap(peft.stack.check_shared)(batched)


def test_forward_rows_runs_each_row_with_its_own_member(trained, gen):
    _, stack, *_ = trained["sgd"]
    tokens = torch.randint(0, CFG.vocab_size, (4, 7), generator=gen)
    members = torch.tensor([2, 0, 1, 2])
    logits = peft.forward_rows(stack, tokens, members, CFG)
    assert logits.shape == (4, 7, CFG.vocab_size)
    for row, m in enumerate(members.tolist()):
        want = ft.forward(peft.member_adapters(stack, m), tokens[row : row + 1], CFG)[0]
        torch.testing.assert_close(logits[row], want, rtol=0, atol=1e-10)
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        peft.forward_rows(stack, tokens, torch.tensor([0, 3, 1, 1]), CFG)
    with pytest.raises(ValueError, match="shape"):
        peft.forward_rows(stack, tokens, torch.tensor([0, 1]), CFG)
    with pytest.raises(TypeError, match="integer tensor"):
        peft.forward_rows(stack, tokens, torch.tensor([0.0, 1, 1, 2]), CFG)


def test_stack_adapters_rejects_bad_members():
    with pytest.raises(ValueError, match="one rank per seed"):
        peft.stack_adapters(base(), CFG, seeds=[1, 2], ranks=[2], alpha=4.0)
    with pytest.raises(ValueError, match="rank"):
        peft.stack_adapters(base(), CFG, seeds=[1], ranks=[0], alpha=4.0)


# ---------------------------------------------------------------- loop.fit: per-member checkpoints, exact resume


FIT_IDS = (torch.arange(1500) % CFG.vocab_size).numpy().astype("uint16")
FIT_RUN = dict(steps=4, batch_size=2, seq_len=8, eval_every=2, eval_batches=1, seed=5)
MEMBERS = [{"seed": 0, "rank": 2, "lr": 1e-2}, {"seed": 1, "rank": 3, "lr": 3e-3}]


def fit_stack(out, *, resume=False, **kw):
    task = peft.AdapterMembers(base(), CFG, FIT_IDS[:1300], FIT_IDS[1300:], adamw, MEMBERS, alpha=4.0, seed=5,
                               dropout=0.1)
    settings = ft.loop.FitSettings(**{**FIT_RUN, **kw})
    return task, ft.fit(task.init_params(), task.train_step(), task, settings, out_dir=out, resume=resume,
                        progress=False, log=None)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("stack")
    with unchecked(), attention_kernel("einsum"):
        reference = fit_stack(out / "a")
        fit_stack(out / "b", steps=2)
        resumed = fit_stack(out / "b", resume=True)
    return out, reference, resumed


def test_fit_trains_the_stack_with_per_member_records_and_checkpoints(fitted):
    out, (task, result), _ = fitted
    assert result.step == 4 and [(r["step"], r["member"]) for r in result.history] == [
        (s, i) for s in (0, 2, 4) for i in (0, 1)]
    assert [r["name"] for r in result.history[:2]] == ["rank=2,seed=0,lr=0.01", "rank=3,seed=1,lr=0.003"]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    for i, member in enumerate(ft.tree.unstack(result.params)):
        ck = ft.checkpoint.load_tree(out / "a" / f"member-{i}" / "latest", like=member)
        assert ck.step == 4 and max_diff(ck.params, member) == 0
        assert ck.config["adapter"]["rank"] == MEMBERS[i]["rank"] and ck.config["model"]["d_model"] == CFG.d_model
        assert all(p.endswith((".a", ".b")) for p in ft.tree.flatten_with_paths(ck.params))  # the adapter only
    stack, x = task.stack._replace(trainable=result.params), torch.arange(8).reshape(1, 8)
    loaded = peft.load_member(out / "a" / "member-1" / "latest", base(), CFG)
    assert loaded["blocks"][0]["attn"]["w_o"].a.shape[-1] == MEMBERS[1]["rank"]
    assert torch.equal(ft.forward(loaded, x, CFG), ft.forward(peft.member_adapters(stack, 1), x, CFG))
    with pytest.raises(ValueError, match="another model"):
        peft.load_member(out / "a" / "member-1" / "latest", base(), CFG.replace(d_ff=48))
    run = ft.loop.FitRun(ft.loop.FitSettings(**FIT_RUN), torch.device("cpu"), out, print)
    assert CFG.dropout == 0 and torch.equal(task.dropout_key(run, 3, 1), ft.random.fold_in(ft.random.key(1), 3))


def test_fit_stack_resume_is_exact(fitted, tmp_path):
    out, (_, reference), (_, resumed) = fitted
    assert resumed.history == [r | {"elapsed_s": s["elapsed_s"], "tokens_per_s": s["tokens_per_s"]}
                               for r, s in zip(reference.history, resumed.history)]
    assert max_diff(resumed.params, reference.params) == 0
    with pytest.raises(ValueError, match="nothing to resume"):
        with unchecked():
            fit_stack(tmp_path / "empty", resume=True)
