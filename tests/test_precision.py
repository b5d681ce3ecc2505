import numpy as np
import pytest
import torch

import ftransformer as ft
from ftransformer import checkpoint, decode_steps, optim, precision, tree
from ftransformer.cli import main
from ftransformer.data import Prefetcher, sample_batch, to_device
from ftransformer.loop import fit
from ftransformer.train import make_train_step

# Every dimension a different size, so a swapped axis fails.
CFG = ft.Config(vocab_size=37, d_model=24, n_heads=4, n_layers=2, d_ff=40, max_seq_len=16)
# bf16 keeps 8 significant bits (7 stored + the implicit one): a rounding moves a value by at most
# u = 2**-8 of itself. Every weight and activation of the step is rounded once on entry and the products
# accumulate in fp32, so each update's relative error is a few u (measured: 1u-3.5u on this model). 8u
# leaves room for the two layers' error to compound and is still 30x below what a wrong gradient gives.
U = 2.0**-8


def batch(seed=0, rows=3, seq=16):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, CFG.vocab_size, (rows, seq + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_policy_names_and_validation():
    assert precision.FP32.name == "fp32" and not precision.FP32.casts
    assert precision.BF16.name == "bf16" and precision.BF16.casts and precision.BF16.param == torch.float32
    assert precision.resolve("auto", "cpu") == precision.FP32  # fp32 is the CPU default
    assert precision.resolve(None, "cpu") == precision.FP32
    assert precision.resolve("bf16", "cpu") == precision.BF16
    assert precision.resolve(precision.BF16, "cpu") is precision.BF16
    with pytest.raises(ValueError, match="dtype must be one of auto, fp32, bf16, got 'fp8'"):
        precision.resolve("fp8", "cpu")
    with pytest.raises(ValueError, match="Precision.compute must be a floating torch.dtype, got torch.int8"):
        precision.Precision(compute=torch.int8)
    with pytest.raises(ValueError, match="param=torch.bfloat16 is narrower than compute=torch.float32"):
        precision.Precision(compute=torch.float32, param=torch.bfloat16)
    with pytest.raises(TypeError, match="precision"):  # beartype (tests) or the step's own check
        make_train_step(CFG, optim.sgd(0.1), precision="bf16")
    assert not precision.allow_tf32("cpu")  # nothing CUDA-specific happens on a CPU
    assert not torch.backends.cuda.matmul.allow_tf32


def test_cast_leaves_integer_leaves_and_compute_params():
    leaves = [torch.ones(3), torch.arange(3)]
    cast = precision.BF16.cast(leaves)
    assert [x.dtype for x in cast] == [torch.bfloat16, torch.int64]
    assert precision.FP32.cast(leaves) is leaves
    params = ft.init_params(CFG)
    assert {x.dtype for x in tree.leaves(precision.BF16.compute_params(params))} == {torch.bfloat16}
    assert precision.FP32.compute_params(params) is params


def test_bf16_step_tracks_the_fp32_step_within_bf16_rounding():
    params = ft.init_params(CFG, seed=1)
    opt = optim.sgd(1.0)  # the update is the gradient itself: its error is the gradient's
    state = opt.init(params)
    new32, _, m32 = make_train_step(CFG, opt)(params, state, batch())
    new16, _, m16 = make_train_step(CFG, opt, precision=precision.BF16)(params, state, batch())
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 2 * U * float(m32["loss"])
    errors = [relative(a - p, b - p) for a, b, p in zip(tree.leaves(new16), tree.leaves(new32), tree.leaves(params))]
    assert max(errors) < 8 * U
    # and it did compute in bf16: fp32 would agree to ~1e-7, far below a bf16 rounding
    assert np.median(errors) > U / 8
    # master weights stay fp32, and so do the gradients the optimizer saw
    assert {x.dtype for x in tree.leaves(new16)} == {torch.float32}


def test_bf16_adamw_keeps_fp32_state_and_tracks_over_steps():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
    p32 = p16 = ft.init_params(CFG, seed=2)
    s32 = s16 = opt.init(p32)
    step32, step16 = make_train_step(CFG, opt), make_train_step(CFG, opt, precision=precision.BF16)
    for i in range(3):
        p32, s32, m32 = step32(p32, s32, batch(i))
        p16, s16, m16 = step16(p16, s16, batch(i))
    assert {x.dtype for x in tree.leaves((p16, s16)) if x.is_floating_point()} == {torch.float32}
    # AdamW divides by sqrt(v): where a gradient is near zero, bf16 rounding can flip a coordinate's
    # update, so weights are compared through what they compute: the loss, rounded on the way 3 times
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 4 * U * float(m32["loss"])


def test_bf16_accumulation_equals_the_whole_batch():
    params, opt = ft.init_params(CFG, seed=3), optim.sgd(1.0)
    state = opt.init(params)
    whole = make_train_step(CFG, opt, precision=precision.BF16)(params, state, batch(rows=4))
    split = make_train_step(CFG, opt, precision=precision.BF16, accum_steps=2)(params, state, batch(rows=4))
    # micro-batch gradients are fp32 and summed in fp32: the split differs from the whole by bf16 rounding
    errors = [relative(a - p, b - p) for a, b, p in zip(tree.leaves(split[0]), tree.leaves(whole[0]),
                                                         tree.leaves(params))]
    assert max(errors) < 8 * U


def test_fit_in_bf16_checkpoints_fp32(tmp_path):
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, 400)
    step = make_train_step(CFG, optim.adamw(1e-3), precision=precision.BF16)
    result = fit(ft.init_params(CFG), step, ft.loop.TokenData(CFG, ids[:300], ids[300:]),
                 ft.loop.FitSettings(steps=2, batch_size=2, eval_every=2, eval_batches=1), out_dir=tmp_path,
                 progress=False, log=None)
    assert {x.dtype for x in tree.leaves(result.params)} == {torch.float32}
    ck = checkpoint.load_checkpoint(tmp_path / "latest")
    opt_state = ck.optimizer_state(optim.adamw(1e-3))
    assert {x.dtype for x in tree.leaves((ck.params, opt_state)) if x.is_floating_point()} == {torch.float32}


def test_prefetcher_yields_the_batches_it_is_asked_for():
    ids = np.arange(200)

    def draw(step):
        return sample_batch(ids, 3, 8, seed=5, step=step)

    fetch = Prefetcher(draw, "cpu")
    fetch.prefetch(0)
    got = [fetch(0)]
    fetch.prefetch(1)
    got.append(fetch(1))
    got.append(fetch(7))  # not prefetched: drawn on the spot
    fetch.prefetch(3)
    got.append(fetch(2))  # a stale prefetch is not handed out for another step
    for step, (tokens, targets) in zip([0, 1, 7, 2], got):
        want = draw(step)
        assert torch.equal(tokens, want[0]) and torch.equal(targets, want[1])
    assert [x.device.type for x in to_device(draw(0), torch.device("cpu"))] == ["cpu", "cpu"]


def test_decode_step_modes():
    assert decode_steps.decode_step_for("eager", ft.init_params(CFG)).step is decode_steps._in_place_step
    # on a CPU, step="compile" is the step with its C++-wrapped block (CUDA graphs are for CUDA params only)
    assert decode_steps.decode_step_for("compile", ft.init_params(CFG)).step is decode_steps._blockwise_step()
    with pytest.raises(ValueError, match="mode must be one of"):
        decode_steps._compiled_step("max-autotune-no-cudagraphs")


def test_train_and_generate_take_dtype(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(40)), encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--quiet", "--data", str(text), "--steps", "2", "--batch-size", "2",
               "--set", "eval_batches=1", "--out", str(out), "--dtype", "bf16"])
    assert rc == 0 and "bf16 compute" in capsys.readouterr().out
    ck = checkpoint.load_checkpoint(out / "latest")
    assert {x.dtype for x in tree.leaves(ck.params)} == {torch.float32}
    rc = main(["generate", "--checkpoint", str(out), "--prompt", "line", "--max-new-tokens", "4", "--dtype", "bf16"])
    assert rc == 0 and capsys.readouterr().out.startswith("line")
    rc = main(["generate", "--checkpoint", str(out), "--prompt", "line", "--max-new-tokens", "2", "--dtype", "bf16",
               "--quantize", "int8"])
    assert rc == 2 and "decodes from float32 weights; use --dtype fp32 or auto" in capsys.readouterr().err


def test_cuda_graph_step_gives_the_eager_logits_and_compiles_once(no_typecheck):
    """The CUDA path's wrapper on a CPU: static marks and mode="reduce-overhead" (no graph to capture here)."""
    from torch._dynamo.utils import counters

    params = ft.init_params(CFG, seed=4)
    outs = {}
    # A step compiled by an earlier test (other shapes) would count here as a recompile: start clean.
    torch._dynamo.reset()
    for name, step in (("eager", decode_steps._in_place_step), ("graph", decode_steps._cuda_graph_step)):
        cache = ft.init_cache(CFG, batch_size=2, max_len=8)
        before = counters["stats"]["unique_graphs"]
        logits = []
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            for t in range(3):
                out, cache = step(params, torch.tensor([t, t + 1]), cache, CFG)
                logits.append(out.clone())
        outs[name] = (torch.stack(logits), counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert torch.allclose(outs["graph"][0], outs["eager"][0], atol=1e-5, rtol=1e-5)
    assert outs["graph"][1] == 1  # one graph for every token, no recompilation per step


def test_dtype_flag_resolves_per_step_kind():
    from ftransformer.cli import build_parser
    from ftransformer.cli.train_cmd import _precision, resolve_run

    cpu = torch.device("cpu")
    spec = resolve_run(build_parser().parse_args(["train", "--preset", "tiny", "--dtype", "bf16"]))
    assert spec.dtype == "bf16" and _precision(spec, cpu) == precision.BF16
    assert _precision(resolve_run(build_parser().parse_args(["train", "--preset", "tiny"])), cpu) == precision.FP32
    ensemble = resolve_run(build_parser().parse_args(["train", "--preset", "tiny", "--ensemble", "2"]))
    assert _precision(ensemble, cpu) == precision.FP32  # auto: the vmapped ensemble step computes in fp32
    ensemble_bf16 = resolve_run(build_parser().parse_args(["train", "--preset", "tiny", "--ensemble", "2",
                                                           "--dtype", "bf16"]))
    with pytest.raises(ValueError, match="--dtype bf16 applies to the plain train step"):
        _precision(ensemble_bf16, cpu)
