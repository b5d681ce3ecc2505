"""Learning-path step 9e: edges -- which component's write to the residual stream does which reader use.

The residual stream is a sum of writes, so a model is a graph (Elhage et al. 2021): the *writers* are the
embedding (``"embed"``), every attention head (``"a{i}.h{h}"``, its ``head_out``) and every MLP (``"m{i}"``,
its output without ``b_out``); the *readers* are every query head's input (``"a{i}.h{h}.q"``), every
key/value head's inputs (``"a{i}.h{g}.k"``, ``"a{i}.h{g}.v"``, ``g`` over the ``kv_heads``: grouped-query
attention is not ungrouped), every MLP's input (``"m{i}"``) and the final residual the unembedding reads
(``"logits"``). An edge ``u -> v`` exists when ``u`` writes before ``v`` reads: the heads of layer ``i`` do
not feed the readers of layer ``i``, and ``m{i}`` reads ``a{i}.*`` in the sequential layout (not in the
parallel ones). Biases (``b_o``, ``b_out``) are constants of the sum, not writers.

* ``circuit_logits`` is the exact model of a circuit (Wang et al. 2023; Conmy et al. 2023): reader ``v``
  reads its own residual minus ``sum_u (1 - mask[u, v]) * (z_u - z~_u)``, where ``z_u`` is what ``u``
  wrote in this very run and ``z~_u`` its replacement (another run's value, zero, or a mean). Every
  reader's input is materialised here -- one residual per head -- which is what a circuit *is*.
* ``edge_patch_sweep`` patches every edge alone (the source run's ``z_u`` into reader ``v`` of the base
  run): per reader layer, every writer's swapped projection (q / k / v of each head, MLP hidden units) is
  computed once, then ONE ``vmap`` over the layer's edges (one-hot writer and reader selectors) runs from
  that layer on from the base run's cached residual (a patch cannot change anything that reads earlier).
* ``edge_attribution`` estimates all of those at once (EAP, Syed et al. 2023): to first order, patching
  edge ``u -> v`` changes the metric by ``(z_u(source) - z_u(base)) . dM/dx_v``, with ``x_v`` reader
  ``v``'s input residual. The gradients come from ONE forward + backward of the base run -- with respect
  to zero perturbations of the queries, keys, values, the MLP hidden units and the final residual, as in
  ``attribution`` -- and are carried back to each reader's input residual by *local* vector-Jacobian
  products through that layer's norm and projection (rotary, qk-norm and biases included), vmapped over
  the heads: no copy of the residual per head in the forward pass. The scores are one product of the
  writers' differences ``[writers, *batch, seq, d_model]`` with the readers' gradients.
  EAP-IG (Hanna et al. 2024) averages those gradients over ``steps`` points on the straight line from the
  base run's embeddings to the source run's, the points as ONE ``vmap`` over alpha.
* ``top_edges`` and ``faithfulness``: circuits of the ``k`` highest-scoring edges and the metric they
  keep, every other edge ablated (mean, zero or corrupted values), ONE ``vmap`` over the edge masks.

Sign convention, as in ``attribution_patch``: the scores and the sweep are metric *changes* of the base
run (``"denoise"``: base = corrupt, source = clean), and 0 where there is no edge. Supported: every layout
in which each writer's output is a summand of the residual stream -- pre-LN (``norm_position="pre"``) with a
sequential or either parallel residual -- and per-head qk-norm. Post-LN, sandwich and output norms are refused
(``check_layout`` names why): a norm of a sum (or of a sublayer's sum of heads) before it is added makes no
head's write a summand.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import einsum, rearrange

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.attribution import site_gradients
from ftransformer.interp.patching import Metric, check_args, check_scalar, base_and_source, logit_positions, run_from
from ftransformer.interp.progress import progress_bar
from ftransformer.layers.attention import (
    attention_kernel, check_heads_separate, head_outputs, project_qkv, scaled_dot_product_attention,
    scores as score_args,
)
from ftransformer.layers.block import check_writes_are_summands, has_mlp, mlp_norm, mlp_reads, wire
from ftransformer.layers.feedforward import feedforward
from ftransformer.layers.linear import linear
from ftransformer.layers.norm import norm
from ftransformer.layers.tap import Tap
from ftransformer.model import BlockInputs, block_inputs, check_tokens, embed, unembed
from ftransformer.shapes import Bool, Float, Logits, Residual, Tensor, Tokens

METHODS = ("eap", "eap-ig")
ABLATIONS = ("mean", "zero", "corrupt")
Values = Float[Tensor, "writers *batch seq d_model"]


class Graph(NamedTuple):
    """The nodes and edges of a model: ``edges[u, v]`` is True where writer ``u`` writes before reader ``v``."""

    writers: tuple[str, ...]
    readers: tuple[str, ...]
    edges: Bool[Tensor, "writers readers"]


class EdgeScores(NamedTuple):
    """A score per edge (0 where there is none) and the graph that names the rows and columns."""

    scores: Float[Tensor, "writers readers"]
    graph: Graph


class Faithfulness(NamedTuple):
    """The metric of the circuits of the top ``ks`` edges; ``normalized`` is ``(M(circuit) - M(empty)) /
    (M(full) - M(empty))``: 1 keeps the whole model's behaviour, 0 none of it."""

    ks: tuple[int, ...]
    metric: Float[Tensor, " edges"]
    normalized: Float[Tensor, " edges"]
    full: float
    empty: float
    ablation: str


def check_layout(cfg: Config) -> None:
    """``ValueError`` for the layouts whose heads' writes are not plain summands of one residual stream."""
    check_writes_are_summands(cfg, "edge attribution")
    check_heads_separate(cfg, "edge attribution")


def _sizes(cfg: Config) -> tuple[int, int, int]:
    """``(mlp, writers per layer, readers per layer)``."""
    mlp = int(has_mlp(cfg))
    return mlp, cfg.n_heads + mlp, cfg.n_heads + 2 * cfg.n_kv_heads + mlp


def graph(cfg: Config) -> Graph:
    """The writers, readers and edges of a model with this config (see the module's notes)."""
    check_layout(cfg)
    mlp, _, _ = _sizes(cfg)
    writers, readers, written, read = ["embed"], [], [0], []
    # Steps of the residual stream: the embedding 0, layer i's heads 2i+1, its MLP 2i+2. A reader at step s
    # reads the writers of steps < s.
    for i in range(cfg.n_layers):
        writers += [f"a{i}.h{h}" for h in range(cfg.n_heads)] + [f"m{i}"] * mlp
        written += [2 * i + 1] * cfg.n_heads + [2 * i + 2] * mlp
        readers += [f"a{i}.h{h}.q" for h in range(cfg.n_heads)]
        readers += [f"a{i}.h{g}.{s}" for s in "kv" for g in range(cfg.n_kv_heads)] + [f"m{i}"] * mlp
        read += [2 * i + 1] * (cfg.n_heads + 2 * cfg.n_kv_heads)
        read += [2 * i + (2 if mlp_reads(cfg) == "resid_mid" else 1)] * mlp
    readers.append("logits")
    read.append(2 * cfg.n_layers + 1)
    edges = torch.tensor(written)[:, None] < torch.tensor(read)[None, :]
    return Graph(tuple(writers), tuple(readers), edges)


def writer_values(params: dict, acts: dict, cfg: Config) -> Values:
    """Every writer's write ``z_u`` in one run (``acts`` from ``forward_with_activations``), in the graph's order."""
    parts = [acts["embed"][None]]
    for i, block in enumerate(acts["blocks"]):
        parts.append(rearrange(block["attn"]["head_out"], "... heads seq d_model -> heads ... seq d_model"))
        if has_mlp(cfg):
            parts.append(linear(block["mlp"]["hidden"], params["blocks"][i]["mlp"]["w_out"])[None])
    return torch.cat(parts)


def _diagonal(t: Tensor) -> Tensor:
    """``[n, *batch, n, seq, head_dim]`` -> ``[*batch, n, seq, head_dim]``: head ``h`` of reader input ``h``."""
    return torch.diagonal(t, dim1=0, dim2=-3).movedim(-1, -3)


def _circuit_attention(p: dict, x: Float[Tensor, "readers *batch seq d_model"], cfg: Config, mask, rotary) -> Tensor:
    """Each head's output ``[*batch, heads, seq, d_model]``, head ``h`` computing its query from reader input
    ``h``, key head ``g`` its key from input ``heads + g`` and its value from ``heads + kv_heads + g``."""
    heads, kv = cfg.n_heads, cfg.n_kv_heads
    q, k, v = project_qkv(p["attn"], norm(p["ln1"], x, cfg.norm), cfg, rotary)
    q, k, v = _diagonal(q[:heads]), _diagonal(k[heads : heads + kv]), _diagonal(v[heads + kv :])
    o = scaled_dot_product_attention(q, k, v, mask, impl="einsum", **score_args(cfg))
    return head_outputs(p["attn"], o)


def _inputs(x: Residual, diffs: list, mask: Tensor, readers: slice) -> Float[Tensor, "readers *batch seq d_model"]:
    """The readers' inputs: ``x`` minus the ablated part of every write so far."""
    d = torch.cat(diffs)
    return x - torch.tensordot(1 - mask[: d.shape[0], readers].to(x.dtype), d, dims=([0], [0]))


def _circuit_layer(
    params: dict, i: int, x: Residual, diffs: list, mask: Tensor, ablated: Tensor, cfg: Config, inputs: BlockInputs
) -> tuple:
    """Block ``i`` of the circuit: ``(x, diffs)`` after it, from those entering it (``x`` the run's own residual,
    ``diffs`` the writes so far minus their replacements, ``z_u - z~_u``, in the graph's order).

    The block's own wiring (``layers.block.wire``) adds the writes up; only what the readers read changes:
    the attention computes each head from its readers' inputs, and the MLP's hidden units are replaced by
    those of its input minus its ablated writes."""
    masks, rotaries = inputs.masks, inputs.rotaries
    mlp, n_writers, n_readers = _sizes(cfg)
    p, w0, r0 = params["blocks"][i], 1 + i * n_writers, i * n_readers
    b_o = p["attn"].get("b_o")

    def attn(attn_params: dict, normed: Tensor) -> tuple[Tensor, None]:
        readers = _inputs(x, diffs, mask, slice(r0, r0 + n_readers - mlp))
        head_out = _circuit_attention(p, readers, cfg, masks[i], rotaries[i])
        diffs.append(rearrange(head_out, "... heads seq d_model -> heads ... seq d_model") - ablated[w0 : w0 + cfg.n_heads])
        out = head_out.sum(-3)
        return (out if b_o is None else out + b_o), None

    def hidden(h: Tensor) -> Tensor:
        return _mlp_hidden(p, _inputs(tap.acts[mlp_reads(cfg)], diffs, mask, slice(r0 + n_readers - 1, r0 + n_readers))[0], cfg)

    diffs = list(diffs)
    tap = Tap({"mlp.hidden": hidden})
    x, _ = wire(p, x, cfg, attn, keys=(None, None), tap=tap)
    if mlp:
        diffs.append(linear(tap.acts["mlp.hidden"], p["mlp"]["w_out"])[None] - ablated[w0 + cfg.n_heads : w0 + n_writers])
    return x, diffs


def _on_graph(mask: Tensor, cfg: Config) -> Tensor:
    """Off the graph nothing is ablated, whatever the mask says there (a parallel MLP never reads its layer's heads)."""
    return torch.where(graph(cfg).edges.to(mask.device), mask, 1.0)


def _circuit_from(params: dict, x: Residual, diffs: list, mask: Tensor, ablated: Tensor, cfg: Config, inputs, start: int) -> Logits:
    """The circuit's logits from block ``start`` on: ``x`` is its residual entering that block and ``diffs``
    the writes before it minus their replacements."""
    mask = _on_graph(mask, cfg)
    for i in range(start, cfg.n_layers):
        x, diffs = _circuit_layer(params, i, x, diffs, mask, ablated, cfg, inputs)
    return unembed(params, _inputs(x, diffs, mask, slice(-1, None))[0], cfg)


def _check_circuit(mask: object, ablated: object, g: Graph) -> None:
    shape = (len(g.writers), len(g.readers))
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of shape [writers, readers] = {shape}, got {got}")
    if not isinstance(ablated, Tensor) or ablated.ndim < 3 or ablated.shape[0] != shape[0]:
        got = tuple(ablated.shape) if isinstance(ablated, Tensor) else type(ablated).__name__
        raise ValueError(f"ablated must be a tensor [writers={shape[0]}, *batch, seq, d_model] (or broadcastable), got {got}")


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def circuit_logits(params: dict, tokens: Tokens, cfg: Config, mask: Tensor, ablated: Tensor) -> Logits:
    """The logits of the circuit ``mask`` (``[writers, readers]``, 1 keeps an edge, 0 ablates it, values in
    between interpolate) on ``tokens``: reader ``v`` reads its residual minus ``sum_u (1 - mask[u, v]) *
    (z_u - ablated[u])``, ``z_u`` this run's own write.

    Args:
        ablated: the replacement writes ``[writers, *batch, seq, d_model]`` or broadcastable to it: another
            run's ``writer_values`` (patching), zeros, or means over the batch and positions.

    All ones gives ``forward``'s logits; all zeros with another run's values gives that run's logits. The
    gradient with respect to ``mask`` at all ones is minus ``edge_attribution``'s EAP scores.
    """
    check_tokens(tokens, cfg)
    _check_circuit(mask, ablated, graph(cfg))
    inputs = block_inputs(tokens, cfg)
    x = embed(params, tokens, cfg, positions=inputs.positions)
    return _circuit_from(params, x, [x[None] - ablated[:1]], mask, ablated, cfg, inputs, 0)


def _delta_paths(cfg: Config, tokens: Tokens) -> dict:
    """The zero perturbations whose gradients EAP needs: q, k, v, the MLP hidden units, the final residual."""
    lead, seq = tuple(tokens.shape[:-1]), tokens.shape[-1]
    shapes = {"q": (cfg.n_heads, seq, cfg.head_dim), "k": (cfg.n_kv_heads, seq, cfg.head_dim)}
    shapes["v"] = shapes["k"]
    zeros = {}
    for i in range(cfg.n_layers):
        zeros.update({f"blocks.{i}.attn.{s}": (*lead, *shape) for s, shape in shapes.items()})
        if has_mlp(cfg):
            zeros[f"blocks.{i}.mlp.hidden"] = (*lead, seq, cfg.d_ff)
    zeros[f"blocks.{cfg.n_layers - 1}.resid_post"] = (*lead, seq, cfg.d_model)
    return zeros


def _one_hot_cotangents(g: Tensor, n: int, before: int, after: int) -> Tensor:
    """``[before + n + after, *g.shape]``: zeros, then ``g`` restricted to head ``j`` for row ``before + j``."""
    eye = torch.eye(n, dtype=g.dtype, device=g.device).reshape(n, *[1] * (g.ndim - 3), n, 1, 1)
    rows = g[None] * eye
    return torch.cat([rows.new_zeros(before, *g.shape), rows, rows.new_zeros(after, *g.shape)])


def _attn_reader_grads(p: dict, x: Residual, grads: tuple, cfg: Config, rotary, chunk) -> Tensor:
    """dM/dx for every q/k/v reader of one layer ``[heads + 2 kv_heads, *batch, seq, d_model]``: the vjp of
    ``x -> project_qkv(ln1(x))`` at the run's residual, with one head's cotangent at a time (vmapped)."""
    _, vjp = torch.func.vjp(lambda x: project_qkv(p["attn"], norm(p["ln1"], x, cfg.norm), cfg, rotary), x)
    heads, kv = cfg.n_heads, cfg.n_kv_heads
    gq, gk, gv = grads
    cotangents = (
        _one_hot_cotangents(gq, heads, 0, 2 * kv),
        _one_hot_cotangents(gk, kv, heads, kv),
        _one_hot_cotangents(gv, kv, heads + kv, 0),
    )
    return torch.func.vmap(vjp, chunk_size=chunk)(cotangents)[0]


def _mlp_hidden(p: dict, x: Residual, cfg: Config) -> Tensor:
    """The hidden units of block ``p``'s MLP reading the residual ``x`` (through its norm)."""
    tap = Tap()
    feedforward(p["mlp"], norm(mlp_norm(p, cfg), x, cfg.norm), cfg, tap=tap)
    return tap.acts["hidden"]


def _mlp_reader_grad(p: dict, x: Residual, grad: Tensor, cfg: Config) -> Residual:
    """dM/dx for one MLP's input: the vjp of ``x -> hidden(norm(x))`` with the gradient at the hidden units."""
    return torch.func.vjp(lambda x: _mlp_hidden(p, x, cfg), x)[1](grad)[0]


def reader_gradients(
    params: dict, tokens: Tokens, metric: Metric, cfg: Config, *, embedding: Residual | None = None, chunk: int | None = None
) -> Float[Tensor, "readers *batch seq d_model"]:
    """``dM/dx_v`` for every reader ``v`` (its input residual, before its norm), in the graph's order, from ONE
    forward + backward (gradients at zero perturbations) and per-layer local vjps. ``embedding`` replaces
    the run's embeddings (EAP-IG's points); under ``vmap`` attention takes the einsum path (``layers.kernel_here``)."""
    dtype = params["embed"]["tokens"].dtype
    zeros = {path: torch.zeros(shape, dtype=dtype, device=tokens.device) for path, shape in _delta_paths(cfg, tokens).items()}
    fixes = {} if embedding is None else {"embed": lambda v: embedding.to(v.dtype)}
    check_tokens(tokens, cfg)
    grads, acts = site_gradients(params, tokens, metric, cfg, zeros, interventions=fixes)
    rotaries = block_inputs(tokens, cfg).rotaries
    parts = []
    for i, (p, a) in enumerate(zip(params["blocks"], acts["blocks"])):
        qkv = tuple(grads[f"blocks.{i}.attn.{s}"] for s in "qkv")
        parts.append(_attn_reader_grads(p, a["resid_pre"], qkv, cfg, rotaries[i], chunk))
        if has_mlp(cfg):
            parts.append(_mlp_reader_grad(p, a[mlp_reads(cfg)], grads[f"blocks.{i}.mlp.hidden"], cfg)[None])
    parts.append(grads[f"blocks.{cfg.n_layers - 1}.resid_post"][None])
    return torch.cat(parts)


def _check_method(method: str, steps: object) -> None:
    validate.one_of("method", method, METHODS)
    validate.positive_int("steps", steps)


def _runs(params: dict, clean: Tokens, corrupt: Tensor, cfg: Config, direction: str) -> tuple:
    """``(base tokens, base logits, base acts, source acts)`` on the einsum path."""
    base_tokens, source_tokens = base_and_source(clean, corrupt, direction)
    base_logits, base = forward_with_activations(params, base_tokens, cfg)
    _, source = forward_with_activations(params, source_tokens, cfg)
    return base_tokens, base_logits, base, source


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def edge_attribution(
    params: dict, clean: Tokens, corrupt: Tensor, metric: Metric, cfg: Config, *, method: str = "eap", steps: int = 5,
    direction: str = "denoise", chunk: int | None = None, progress: bool = False,
) -> EdgeScores:
    """EAP / EAP-IG: the first-order estimate of every edge's ``edge_patch_sweep`` value at once.

    ``clean``, ``corrupt``, ``metric`` and ``direction`` are as in ``patch_sweep`` (``"denoise"``: base =
    corrupt, source = clean).

    Args:
        method: ``"eap"``: gradients of the base run; ``"eap-ig"``: gradients averaged over the points
            ``alpha = 1/steps, 2/steps, ..., 1`` between the base run's embeddings and the source run's.
        steps: EAP-IG's number of points (one ``vmap``); ``"eap"`` ignores it.
        chunk: how many heads' vjps (and EAP-IG points) go through ``vmap`` at once (None: all).
        progress: a tqdm bar on stderr counting the gradient points (one for EAP), with its estimate.

    Returns:
        ``scores[u, v] = sum over batch and positions of (z_u(source) - z_u(base)) . dM/dx_v`` (0 off the graph).
    """
    check_args(clean, corrupt, metric, cfg, "resid_pre", ("layer",), direction, chunk)
    _check_method(method, steps)
    g = graph(cfg)
    base_tokens, _, base, source = _runs(params, clean, corrupt, cfg, direction)
    diff = writer_values(params, source, cfg) - writer_values(params, base, cfg)
    with progress_bar(1 if method == "eap" else steps, method.upper(), "point", progress) as bar:
        if method == "eap":
            grads = reader_gradients(params, base_tokens, metric, cfg, chunk=chunk)
        else:
            start, delta = base["embed"], source["embed"] - base["embed"]
            alphas = torch.arange(1, steps + 1, dtype=start.dtype, device=start.device) / steps

            def at(alpha: Float[Tensor, ""]) -> Float[Tensor, "readers *batch seq d_model"]:
                return reader_gradients(params, base_tokens, metric, cfg, embedding=start + alpha * delta, chunk=chunk)

            grads = 0
            for piece in alphas.split(chunk or steps):
                grads = grads + torch.func.vmap(at)(piece).sum(0)
                bar.update(len(piece))
            grads = grads / steps
        bar.update(method == "eap")
    scores = einsum(diff, grads, "writers ..., readers ... -> writers readers")
    return EdgeScores(scores * g.edges.to(scores), g)


def _patched_reads(params: dict, base: dict, diff: Values, cfg: Config, i: int, rotary) -> dict:
    """What block ``i``'s readers compute when writer ``u``'s write is swapped, for every ``u`` at once
    (``[writers, ...]`` per site): the q / k / v of ``ln1(resid_pre - diff[u])`` and the MLP hidden units of
    its input minus ``diff[u]``. Writer-many projections per layer, not one per edge."""
    p, a = params["blocks"][i], base["blocks"][i]
    q, k, v = project_qkv(p["attn"], norm(p["ln1"], a["resid_pre"] - diff, cfg.norm), cfg, rotary)
    reads = {"attn.q": q, "attn.k": k, "attn.v": v}
    if has_mlp(cfg):
        reads["mlp.hidden"] = _mlp_hidden(p, a[mlp_reads(cfg)] - diff, cfg)
    return reads


def _layer_sweep(params, base: dict, diff: Values, metric: Metric, cfg: Config, i: int, index: Tensor, *, inputs, chunk, at) -> Tensor:
    """The metric of every edge ``index`` (``[edges, 2]``, readers of block ``i``) patched alone: ONE vmap over
    the edges' one-hot writer and reader selectors, each run a plain run from block ``i`` whose reader (one
    head's q, k or v, or the MLP's hidden units) takes the value ``_patched_reads`` computed for its writer;
    with ``at``, only those positions are unembedded (the base run's logits elsewhere)."""
    reads = _patched_reads(params, base, diff, cfg, i, inputs.rotaries[i])
    _, _, n_readers = _sizes(cfg)
    pick_writer = torch.nn.functional.one_hot(index[:, 0], diff.shape[0]).to(diff)
    pick_reader = torch.nn.functional.one_hot(index[:, 1] - i * n_readers, n_readers).to(diff)
    widths = [cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads] + [1] * int(has_mlp(cfg))
    where = None if at is None else torch.tensor(at, dtype=torch.long, device=diff.device)

    def patched(writer: Float[Tensor, " writers"], reader: Tensor) -> Float[Tensor, ""]:
        fixes = {}
        for (site, value), pick in zip(reads.items(), reader.split(widths)):
            pick = pick[:, None, None] if site.startswith("attn") else pick

            def fix(v: Tensor, value=value, pick=pick) -> Tensor:
                return torch.where(pick.bool(), torch.tensordot(writer, value, dims=1), v)

            fixes[f"blocks.{i}.{site}"] = fix
        logits = run_from(params, base["blocks"][i]["resid_pre"], cfg, i, inputs, fixes, at=at)
        return metric(logits if at is None else base["logits"].index_copy(-2, where, logits))

    return torch.func.vmap(patched, chunk_size=chunk)(pick_writer, pick_reader)


def sweep_cost(cfg: Config, only: Tensor | None = None) -> int:
    """The blocks ``edge_patch_sweep`` runs over ``only``'s edges (None: every edge): an edge into a reader of
    block ``i`` runs blocks ``i, ..., n_layers - 1`` (one unembedding for the logits' edges: counted as one)."""
    g = graph(cfg)
    on = g.edges if only is None else g.edges & only.cpu().bool()
    layer = torch.div(torch.arange(len(g.readers)), _sizes(cfg)[2], rounding_mode="floor").clamp(max=cfg.n_layers - 1)
    runs = (cfg.n_layers - layer).masked_fill(torch.arange(len(g.readers)) == len(g.readers) - 1, 1)
    return int((on.sum(0) * runs).sum())


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def edge_patch_sweep(
    params: dict, clean: Tokens, corrupt: Tensor, metric: Metric, cfg: Config, *, direction: str = "denoise",
    chunk: int | None = None, only: Tensor | None = None, logits_at: Sequence[int] | int | None = None,
    progress: bool = False,
) -> Float[Tensor, "writers readers"]:
    """The exact metric change of patching each edge alone: reader ``v`` of the base run reads the source
    run's ``z_u`` in place of its own (the ``circuit_logits`` of an all-ones mask but for that edge, with the
    source run's writes as ``ablated``), minus the base run's metric; 0 off the graph, like the scores.

    A patch of a reader of block ``i`` changes nothing before it and only that reader in it: per block,
    every writer's swapped projections are computed once (``_patched_reads``), then ONE ``vmap`` over the
    block's edges (``chunk`` at a time: the memory bound) runs from block ``i`` on with the one reader
    replaced; the logits' edges are one unembedding per writer. ``only``: a ``[writers, readers]`` mask of
    the edges to patch (the rest stay 0; ``sweep_cost`` counts the blocks). ``logits_at``: as in
    ``patch_sweep``. ``progress``: a tqdm bar on stderr counting blocks run, with its time-left estimate.
    """
    check_args(clean, corrupt, metric, cfg, "resid_pre", ("layer",), direction, chunk)
    g = graph(cfg)
    base_tokens, base_logits, base, source = _runs(params, clean, corrupt, cfg, direction)
    before = metric(base_logits)
    check_scalar(before)
    base["logits"] = base_logits
    at = None if logits_at is None else logit_positions(logits_at, base_tokens.shape[-1])
    diff = writer_values(params, base, cfg) - writer_values(params, source, cfg)
    inputs = block_inputs(base_tokens, cfg)
    on = g.edges if only is None else g.edges & _check_only(only, g)
    index = on.nonzero().to(diff.device)
    layer = torch.div(index[:, 1], _sizes(cfg)[2], rounding_mode="floor")
    out = torch.zeros(g.edges.shape, dtype=diff.dtype, device=diff.device)
    with progress_bar(sweep_cost(cfg, on), "exact edge patching", "block", progress) as bar:
        for i in range(cfg.n_layers):
            for rows in index[layer == i].split(chunk or max(1, len(index))):
                if not len(rows):
                    continue
                values = _layer_sweep(params, base, diff, metric, cfg, i, rows, inputs=inputs, chunk=chunk, at=at)
                out[rows[:, 0], rows[:, 1]] = values - before
                bar.update(len(rows) * (cfg.n_layers - i))
        final, writers = base["blocks"][-1]["resid_post"], on[:, -1].nonzero()[:, 0].to(diff.device)
        if len(writers):
            out[writers, -1] = torch.func.vmap(lambda d: metric(unembed(params, final - d, cfg)), chunk_size=chunk)(diff[writers]) - before
        bar.update(len(writers))
    return out


def _check_only(only: object, g: Graph) -> Tensor:
    shape = (len(g.writers), len(g.readers))
    if not isinstance(only, Tensor) or tuple(only.shape) != shape:
        got = tuple(only.shape) if isinstance(only, Tensor) else type(only).__name__
        raise ValueError(f"only must be a bool tensor of shape [writers, readers] = {shape}, got {got}")
    return only.cpu().bool()


def top_edges(scores: EdgeScores, k: int) -> Bool[Tensor, "writers readers"]:
    """The ``k`` edges of largest ``|score|`` (existing edges only), as a mask."""
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be the EdgeScores of edge_attribution, got {type(scores).__name__}")
    n = int(scores.graph.edges.sum())
    if not validate.is_int(k) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}] (the number of edges), got {k!r}")
    magnitude = scores.scores.detach().abs().masked_fill(~scores.graph.edges.to(scores.scores.device), -float("inf"))
    top = rearrange(magnitude, "writers readers -> (writers readers)").topk(k).indices
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    keep[torch.unravel_index(top, magnitude.shape)] = True
    return keep


def default_ks(n: int) -> tuple[int, ...]:
    """0, 1, 2, 5, 10, 20, 50, ... up to ``n`` edges, and ``n``."""
    ks, scale = [0], 1
    while scale < n:
        ks += [k for k in (scale, 2 * scale, 5 * scale) if k < n]
        scale *= 10
    return tuple(ks) + (n,)


def _replacements(params: dict, clean: Tokens, corrupt: Tensor, cfg: Config, ablation: str) -> tuple:
    """``(the clean logits, the ablated writes)``: zeros, the corrupted run's writes, or each writer's mean over
    the reference distribution: every prompt (the clean and the corrupted runs, every batch row) at every position."""
    logits, acts = forward_with_activations(params, clean, cfg)
    own = writer_values(params, acts, cfg)
    if ablation == "zero":
        return logits, own.new_zeros(own.shape[0], *[1] * (own.ndim - 2), own.shape[-1])
    other = writer_values(params, forward_with_activations(params, corrupt, cfg)[1], cfg)
    if ablation == "mean":
        # Rows and positions alike: joined along the axis after the writers, every value counts once.
        return logits, torch.cat([own, other], dim=1).mean(dim=tuple(range(1, own.ndim - 1)), keepdim=True)
    return logits, other


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def faithfulness(
    params: dict, clean: Tokens, corrupt: Tensor, metric: Metric, cfg: Config, scores: EdgeScores, *,
    ks: Sequence[int] | None = None, ablation: str = "corrupt", chunk: int | None = None, progress: bool = False,
) -> Faithfulness:
    """The metric of the circuit of the top ``k`` edges of ``scores`` on ``clean``, for every ``k`` in ``ks``
    (None: ``default_ks``), every other edge ablated: ``"corrupt"`` (the corrupted run's writes: the patching
    ablation of ACDC and EAP-IG's faithfulness, the default), ``"mean"`` (each writer's mean over every prompt,
    clean and corrupted, at every position) or ``"zero"``. The circuits, the full model and the empty circuit
    are ONE ``vmap`` over their masks (``chunk`` at a time; ``progress``: a tqdm bar on stderr)."""
    check_args(clean, corrupt, metric, cfg, "resid_pre", ("layer",), "denoise", chunk)
    validate.one_of("ablation", ablation, ABLATIONS)
    g = graph(cfg)
    if not isinstance(scores, EdgeScores) or scores.graph.writers != g.writers or scores.graph.readers != g.readers:
        raise ValueError("scores must be the EdgeScores of edge_attribution for a model of this config")
    ks = default_ks(int(g.edges.sum())) if ks is None else tuple(ks)
    logits, ablated = _replacements(params, clean, corrupt, cfg, ablation)
    check_scalar(metric(logits))
    on = g.edges.to(logits.device)
    masks = torch.stack([top_edges(scores, k).to(on.device) for k in ks] + [on, torch.zeros_like(on)]).to(logits)
    inputs = block_inputs(clean, cfg)
    x = embed(params, clean, cfg, positions=inputs.positions)

    def kept(mask: Float[Tensor, "writers readers"]) -> Float[Tensor, ""]:
        return metric(_circuit_from(params, x, [x[None] - ablated[:1]], mask, ablated, cfg, inputs, 0))

    parts = []
    with progress_bar(len(masks), f"faithfulness ({ablation})", "circuit", progress) as bar:
        for piece in masks.split(chunk or len(masks)):
            parts.append(torch.func.vmap(kept)(piece))
            bar.update(len(piece))
    values = torch.cat(parts)
    full, empty = values[-2], values[-1]
    return Faithfulness(ks, values[:-2], (values[:-2] - empty) / (full - empty), full.item(), empty.item(), ablation)


__all__ = [
    "EdgeScores", "Faithfulness", "Graph", "check_layout", "circuit_logits", "default_ks", "edge_attribution",
    "edge_patch_sweep", "faithfulness", "graph", "reader_gradients", "sweep_cost", "top_edges", "writer_values",
]
