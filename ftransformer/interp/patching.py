"""Learning-path step 9c: exact activation patching sweeps as vmapped runs from the patched layer on.

``patch_sweep`` patches one site of one run (the *base*) with the values of another (the *source*), one
slice at a time -- every layer, every position and/or every head -- and returns a metric of each patched
run's logits. It gives the same numbers as the loop of single ``interventions.patch`` calls through
``forward_with_activations``, but computes them differently:

* the base run is computed ONCE, with its activations and logits; a patch at layer ``i`` cannot change
  anything before block ``i``, so each patched run *starts at block i* from the base run's cached
  ``blocks.{i}.resid_pre`` (``resid_post`` patches start at block ``i + 1``), skipping the prefix of
  layers (under ``vmap`` a full run's unpatched prefix would run once anyway: this alone saves little);
* a patch at position ``p`` cannot change positions ``< p`` either (causal attention), so the patched
  run computes only the *queries* from ``p`` on, attending over the base run's cached keys/values of
  the positions before (put in front of its own, layer by layer), and the logits before ``p`` are the
  base run's: about half the queries of the runs, averaged over the positions;
* an ``attn.head_out`` patch changes nothing of its block's attention but the sum of the head outputs:
  the block is finished from the base run's cached head outputs (``from_head_out``: no queries, keys or
  pattern), and the runs go on from block ``i + 1``;
* with ``logits_at`` (the positions the metric reads, e.g. the last) only those positions are unembedded:
  with GPT-2's vocabulary, the unembedding of every position costs as much as a few blocks;
* a patch before the first position where the source's values differ from the base run's (for a minimal pair,
  the tokens before the first changed one: causal attention keeps them equal) is no patch: its run is the
  base run, and it is not run;
* the positions are cut into ``BUCKETS`` ranges; the patches of one range at EVERY layer (every head,
  for ``by`` with ``"head"``) are ONE batched pass through the blocks (``_wavefront``): block ``j`` runs
  once on all the runs alive there, those patched at ``j`` joining after it (one ``vmap`` over the 0/1
  patch masks of that block). Per-layer passes read every weight once per patched layer for a batch of
  a few rows; this reads it once per range for all of them (3x faster on SmolLM2-135M, 30 layers, one
  CPU thread); ``chunk`` bounds the runs of one pass (layers cut into groups) and so the memory.

Measured (``python -m ftransformer.bench.patching --threads 1``, which checks the values equal first):
2.9x a vmap of full runs and 2.1x the same sweep without the position buckets at 2 layers x 64 wide,
batch 8 x 64; 2.2x and 1.9x at 4 layers x 128 wide, batch 8 x 32 (one CPU thread).

``replace_sweep`` is the core, for any replacement values (another run's, zeros, means):
``interventions.head_ablation_sweep`` is a ``replace_sweep`` of zeros (or means) into ``attn.head_out``.

Direction: ``"denoise"`` (the default) patches clean values into the corrupted run (base = corrupt,
source = clean: how much of the clean behaviour does this slice restore?); ``"noise"`` patches corrupted
values into the clean run (base = clean, source = corrupt: how much does this slice break?).
"""

from collections.abc import Callable, Sequence

import torch

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.activations import forward_with_activations
from ftransformer.interp.progress import progress_bar
from ftransformer.layers.attention import attention_kernel
from ftransformer.layers.block import block, has_mlp, wire
from ftransformer.layers.embedding import Rotary
from ftransformer.layers.masks import Mask
from ftransformer.layers.tap import NO_TAP, Tap
from ftransformer.model import BlockInputs, block_inputs, check_tokens, unembed
from ftransformer.shapes import Float, Logits, Residual, Tensor, Tokens

RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
HEAD_SITES = ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.head_out")
SITES = RESID_SITES + HEAD_SITES + ("mlp.hidden",)
AXES = ("layer", "position", "head")
DIRECTIONS = ("denoise", "noise")
BUCKETS = 8
Metric = Callable[[Logits], Float[Tensor, ""]]


class _Apply(Tap):
    """A ``Tap`` that applies interventions and records nothing: a sweep's runs keep only the activations
    the computation itself still needs (with ``Tap``, every one would stay alive for the whole run)."""

    def __call__(self, name: str, value: Tensor) -> Tensor:
        fn = self.interventions.get(self.prefix + name)
        return value if fn is None else fn(value)


def run_from(
    params: dict, x: Residual, cfg: Config, start: int, inputs: BlockInputs, interventions: dict | None = None,
    at: Sequence[int] | None = None, tap: Tap | None = None,
) -> Float[Tensor, "... vocab"]:
    """The logits of blocks ``start, ..., n_layers - 1`` and the unembedding applied to ``x``, the residual
    stream entering block ``start``; ``inputs``: ``model.block_inputs``
    and ``interventions`` (paths ``blocks.{i}.*``, ``i >= start``) are applied as in ``forward_with_activations``.
    ``at``: unembed only these positions (of ``x``'s), the logits ``[*batch, len(at), vocab]``. ``tap``: a
    ``Tap`` to record the blocks' activations in (it applies its own interventions; None: record nothing)."""
    masks, rotaries = inputs.masks, inputs.rotaries
    tap = _Apply(interventions) if tap is None else tap
    for i in range(start, cfg.n_layers):
        x = block(params["blocks"][i], x, cfg, mask=masks[i], rotary=rotaries[i], tap=tap.scope(f"blocks.{i}"))
    return unembed(params, x if at is None else x[..., list(at), :], cfg)


def check_args(clean: Tokens, corrupt: Tensor, metric, cfg: Config, site: str, by: tuple, direction: str, chunk) -> None:
    """Raise ValueError/TypeError unless the patching arguments agree with each other and with ``cfg``."""
    check_tokens(clean, cfg, name="clean")
    check_tokens(corrupt, cfg, name="corrupt")
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt must have the same shape, got {tuple(clean.shape)} and {tuple(corrupt.shape)}")
    if not callable(metric):
        raise TypeError(f"metric must be a function logits -> scalar tensor, got {type(metric).__name__}")
    validate.one_of("site", site, SITES)
    if site == "mlp.hidden" and not has_mlp(cfg):
        raise ValueError("site 'mlp.hidden' needs a model with an MLP, got Config.layout.mlp=False")
    if "layer" not in by or len(set(by)) != len(by) or not set(by) <= set(AXES):
        raise ValueError(f"by must hold 'layer' and any of 'position', 'head', each once, got {by!r}")
    if "head" in by and site not in HEAD_SITES:
        raise ValueError(f"by='head' needs an attn.* site (one with a heads axis), got site {site!r}")
    validate.one_of("direction", direction, DIRECTIONS)
    if chunk is not None and (not validate.is_int(chunk) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")


def base_and_source(clean: Tokens, corrupt: Tensor, direction: str) -> tuple[Tokens, Tokens]:
    """``(base, source)`` tokens: ``"denoise"`` patches clean values into the corrupted run, ``"noise"`` the reverse."""
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def check_scalar(value: object) -> None:
    """Raise ValueError unless the metric returned a scalar tensor."""
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor (shape ()), got {got}")


def patch_masks(by: Sequence[str], heads: int, seq: int, device: torch.device) -> Float[Tensor, "rows heads seq"]:
    """One 0/1 mask per patch index, ``[n_heads_axis * n_position_axis, heads, seq]`` (head-major): row ``j``
    marks what patch ``j`` replaces -- one head and/or one position, or all of an axis not in ``by``."""
    pick_heads = torch.eye(heads, device=device) if "head" in by else torch.ones(1, heads, device=device)
    pick_seq = torch.eye(seq, device=device) if "position" in by else torch.ones(1, seq, device=device)
    masks = pick_heads[:, None, :, None] * pick_seq[None, :, None, :]
    return masks.reshape(-1, heads, seq)


def replace_at(value: Tensor, source: Tensor, mask: Float[Tensor, "heads seq"], has_heads: bool) -> Tensor:
    """``value`` with ``source`` where ``mask`` is 1 (the ``heads`` and ``seq`` axes; every other axis whole)."""
    where = mask[..., None] if has_heads else mask[0][:, None]
    return torch.where(where.bool(), source.to(value.dtype), value)


def site_value(acts: dict, layer: int, site: str) -> Tensor:
    """The activation at ``site`` (a dotted path such as ``attn.z``) of block ``layer``."""
    value = acts["blocks"][layer]
    for part in site.split("."):
        value = value[part]
    return value


def _suffix_inputs(inputs: BlockInputs, start: int) -> BlockInputs:
    """``block_inputs`` for the queries at positions ``start, ...`` only: the mask rows and rotary tables of
    those positions (the keys stay every position's: the prefix's come from the base run)."""
    rows = tuple(Mask(m.allowed[..., start:, :]) for m in inputs.masks)
    tables = tuple(None if r is None else Rotary(r.cos[..., start:, :], r.sin[..., start:, :]) for r in inputs.rotaries)
    return BlockInputs(inputs.positions[start:], rows, tables)


def _with_prefix(base: dict, layer: int, first: int, cfg: Config, fixes: dict) -> dict:
    """``fixes`` with, for blocks ``layer, ...``, the base run's keys/values of positions ``< first`` put in
    front of the suffix's own (after any fix of those at ``layer``): a patch at ``first`` cannot change them."""
    if first == 0:
        return fixes
    fixes = dict(fixes)
    for j in range(layer, cfg.n_layers):
        for name in ("k", "v"):
            path, prefix = f"blocks.{j}.attn.{name}", site_value(base, j, f"attn.{name}")[..., :first, :]
            fix = fixes.get(path, lambda v: v)
            fixes[path] = lambda v, prefix=prefix, fix=fix: torch.cat([prefix.to(v.dtype).expand(*v.shape[:-2], -1, -1), fix(v)], dim=-2)
    return fixes


def from_head_out(params: dict, x: Residual, head_out: Float[Tensor, "*batch heads seq d_model"], cfg: Config, layer: int) -> Residual:
    """Block ``layer`` applied to ``x`` with its attention sublayer's output taken as ``head_out`` summed over
    heads (plus ``b_o``): the block's queries, keys and pattern are not recomputed, only its wiring
    (norms, residual sums) and MLP -- what a run with only ``attn.head_out`` changed computes there."""
    p = params["blocks"][layer]
    b_o = p["attn"].get("b_o")
    out = head_out.sum(dim=-3)
    out = out if b_o is None else out + b_o
    return wire(p, x, cfg, lambda _p, _h: (out, None), keys=(None, None), tap=NO_TAP)[0]


def _enter(params, base: dict, src: Tensor, masks: Tensor, cfg: Config, layer: int, first: int, *, site, suffix) -> Tensor:
    """The residual stream after block ``layer`` of every patch in ``masks`` (patches at ``layer``, positions
    ``>= first``), ``[patches, *batch, seq - first, d_model]``: the queries from ``first`` on, over the base
    run's keys/values before; ``resid_post`` patches the block's output, ``attn.head_out`` finishes the block
    from the cached head outputs (``from_head_out``), any other site patches inside one vmapped block."""
    has_heads = site in HEAD_SITES
    src, masks = src[..., first:, :], masks[..., first:]
    if site == "resid_post":
        post = site_value(base, layer, "resid_post")[..., first:, :]
        return torch.func.vmap(lambda mask: replace_at(post, src, mask, False))(masks)
    x = site_value(base, layer, "resid_pre")[..., first:, :]
    if site == "attn.head_out":
        head_out = site_value(base, layer, site)[..., first:, :]
        return torch.func.vmap(lambda mask: from_head_out(params, x, replace_at(head_out, src, mask, True), cfg, layer))(masks)

    def patched(mask: Float[Tensor, "heads seq"]) -> Residual:
        fixes = _with_prefix(base, layer, first, cfg, {f"blocks.{layer}.{site}": lambda v: replace_at(v, src, mask, has_heads)})
        tap = _Apply(fixes).scope(f"blocks.{layer}")
        return block(params["blocks"][layer], x, cfg, mask=suffix.masks[layer], rotary=suffix.rotaries[layer], tap=tap)

    return torch.func.vmap(patched)(masks)


def _wavefront(params, base: dict, sources, masks: Tensor, cfg: Config, layers: range, first: int, *, site, inputs, bar) -> Tensor:
    """The final residual of every patch in ``masks`` at every layer of ``layers``, ``[layers * patches, *batch,
    seq - first, d_model]`` (layer-major): ONE batched pass through the blocks, where the runs patched at
    block ``j`` join the runs of the layers before it after block ``j`` -- each block runs once on all the
    runs alive there (a batch as wide as the weights like), not once per patched layer."""
    suffix = _suffix_inputs(inputs, first)
    carry = _Apply(_with_prefix(base, 0, first, cfg, {}))
    xs = None
    for j in range(layers[0], cfg.n_layers):
        if xs is not None:
            xs = block(params["blocks"][j], xs, cfg, mask=suffix.masks[j], rotary=suffix.rotaries[j], tap=carry.scope(f"blocks.{j}"))
        if j in layers:
            new = _enter(params, base, sources[j], masks, cfg, j, first, site=site, suffix=suffix)
            xs = new if xs is None else torch.cat([xs, new])
        bar.update(1)
    return xs


def _metrics(params, base: dict, xs: Tensor, metric: Metric, cfg: Config, first: int, *, at, chunk) -> Float[Tensor, " rows"]:
    """``metric`` of each run whose final residual from position ``first`` on is ``xs[r]``: the logits before
    ``first`` (and, with ``at``, at every position not in it) are the base run's."""
    need = None if at is None else [p - first for p in at if p >= first]
    where = None if at is None else torch.tensor([first + p for p in need], dtype=torch.long, device=xs.device)
    before = base["logits"][..., :first, :]

    def one(x: Tensor) -> Float[Tensor, ""]:
        logits = unembed(params, x if need is None else x[..., need, :], cfg)
        if at is not None:
            logits = base["logits"].index_copy(-2, where, logits)
        elif first:
            logits = torch.cat([before, logits], dim=-2)
        return metric(logits)

    return torch.func.vmap(one, chunk_size=chunk)(xs)


def position_buckets(seq: int, by: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
    """The position ranges ``[first, stop)`` of ``[start, seq)`` whose patches run together: one batched pass
    each, over the queries from ``first`` on. More buckets skip more of the prefix (a patch at ``p`` costs
    ``seq - first`` of ``seq`` positions) but make more calls; ``BUCKETS`` of them is the measured compromise."""
    if "position" not in by:
        return [(0, 1)]
    n = min(seq - start, BUCKETS)
    edges = [start + round((seq - start) * k / n) for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def first_difference(base: dict, sources: Sequence[Tensor], site: str) -> int:
    """The first position where a source value differs from the base run's at some layer (seq if none): a patch
    at an earlier position replaces values by equal ones, so its run IS the base run (causal attention makes
    the positions before the first differing token equal in both runs: most of a minimal pair's prompt)."""
    seq = sources[0].shape[-2]
    differs = torch.zeros(seq, dtype=torch.bool, device=sources[0].device)
    for j, src in enumerate(sources):
        unequal = (src != site_value(base, j, site).expand_as(src)).any(-1)
        while unequal.ndim > 1:  # over the batch (and heads) axes: to [seq]
            unequal = unequal.any(0)
        differs |= unequal
    return int(differs.nonzero()[0]) if differs.any() else seq


def sweep_jobs(n_layers: int, buckets: list, patches: int, chunk: int | None) -> list[tuple[int, int, range]]:
    """``(first, stop, layers)`` of every batched pass: per position bucket, the layers cut into groups of
    at most ``chunk // patches`` (at least one: ``chunk`` bounds the runs alive at once)."""
    jobs = []
    for first, stop in buckets:
        width = n_layers if chunk is None else max(1, chunk // (patches * (stop - first)))
        jobs += [(first, stop, range(a, min(a + width, n_layers))) for a in range(0, n_layers, width)]
    return jobs


def _sweep(params, base: dict, sources, metric: Metric, cfg: Config, *, site, by, inputs, chunk, at, progress) -> Tensor:
    """The metric of every patch of ``site`` at every layer, ``[layers, heads_axis * position_axis]``."""
    has_heads = site in HEAD_SITES
    sample = sources[0]
    masks = patch_masks(by, sample.shape[-3] if has_heads else 1, sample.shape[-2], sample.device)
    seq = sample.shape[-2]
    grid = masks.reshape(-1, seq if "position" in by else 1, *masks.shape[1:])  # [heads axis, position axis, ...]
    start = first_difference(base, sources, site) if "position" in by else 0
    jobs = sweep_jobs(cfg.n_layers, position_buckets(seq, by, start) if start < seq else [], grid.shape[0], chunk)
    # The patches before ``start`` change nothing: their runs are the base run.
    out = metric(base["logits"]).detach().expand(cfg.n_layers, grid.shape[0], grid.shape[1]).clone()
    with progress_bar(sum(cfg.n_layers - layers[0] for *_, layers in jobs), f"patching {site}", "block", progress) as bar:
        for first, stop, layers in jobs:
            part = grid[:, first:stop].reshape(-1, *masks.shape[1:])
            xs = _wavefront(params, base, sources, part, cfg, layers, first, site=site, inputs=inputs, bar=bar)
            values = _metrics(params, base, xs, metric, cfg, first, at=at, chunk=chunk)
            out[layers.start : layers.stop, :, first:stop] = values.reshape(len(layers), grid.shape[0], stop - first)
    return out.reshape(cfg.n_layers, -1)


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def patch_sweep(
    params: dict,
    clean: Tokens,
    corrupt: Tensor,
    metric: Metric,
    cfg: Config,
    *,
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "position"),
    direction: str = "denoise",
    chunk: int | None = None,
    logits_at: Sequence[int] | int | None = None,
    progress: bool = False,
) -> Tensor:
    """The metric of the model's logits with one slice of ``site`` patched, for every slice: one exact
    activation-patching sweep (TransformerLens' ``get_act_patch_*``), as vmapped runs from the patched layer
    and position on (``BUCKETS`` position ranges: see the module's notes).

    Args:
        clean, corrupt: token ids of the same shape ``[*batch, seq]`` (each patch covers every batch row;
            a ``corrupt`` of another shape is refused with both shapes named).
        metric: any scalar function of the logits ``[*batch, seq, vocab]``, e.g. a logit difference.
        site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``mlp.hidden``, or ``attn.q`` / ``attn.k`` /
            ``attn.v`` / ``attn.pattern`` / ``attn.head_out`` (the paths of ``forward_with_activations``
            under ``blocks.{layer}.``). For ``attn.k`` / ``attn.v`` the heads are the ``kv_heads``; for
            ``attn.pattern`` the position is the query's.
        by: the sweep's axes, in the order of the result: ``"layer"`` and any of ``"position"``, ``"head"``
            (``"head"`` for ``attn.*`` sites only). An axis left out is patched whole.
        direction: ``"denoise"``: clean values into the corrupted run; ``"noise"``: corrupted into the clean.
        chunk: the most patched runs one batched pass carries (the memory bound; None: a position bucket's all).
        logits_at: the positions whose logits ``metric`` reads (e.g. ``[-1]`` for a metric of the last
            position): the patched runs unembed only those (with a 50k vocabulary that costs a few blocks);
            ``metric`` sees the base run's logits at every other position. None: all positions (a metric
            that reads a position left out gets wrong values, silently).
        progress: a tqdm bar on stderr (blocks run) with its time-left estimate.

    Returns:
        ``metric`` of each patched run, with one axis per entry of ``by`` in that order: e.g. ``[layers,
        seq]`` for ``by=("layer", "position")``, ``[layers, seq, heads]`` for ``("layer", "position",
        "head")``. Entry ``[i, p, h]`` equals ``metric(forward_with_activations(params, base, cfg,
        interventions=patch(f"blocks.{i}.{site}", source_acts, positions=p, heads=h))[0])``.
    """
    by = tuple(by)
    check_args(clean, corrupt, metric, cfg, site, by, direction, chunk)
    base_tokens, source_tokens = base_and_source(clean, corrupt, direction)
    _, source = forward_with_activations(params, source_tokens, cfg)
    sources = [site_value(source, i, site) for i in range(cfg.n_layers)]
    return replace_sweep(params, base_tokens, sources, metric, cfg, site=site, by=by, chunk=chunk, logits_at=logits_at,
                         progress=progress)


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def replace_sweep(
    params: dict, tokens: Tokens, sources: Sequence[Tensor], metric: Metric, cfg: Config, *, site: str,
    by: Sequence[str], chunk: int | None = None, run: tuple | None = None, logits_at: Sequence[int] | int | None = None,
    progress: bool = False,
) -> Tensor:
    """``patch_sweep``'s core: the metric of ``tokens``' run with one slice of ``site`` at layer ``i``
    replaced by ``sources[i]``'s (another run's activations, zeros, means: anything of the site's shape,
    or broadcasting to it), for every slice; the same axes as ``patch_sweep``'s result.

    ``run``: ``forward_with_activations(params, tokens, cfg)`` when the caller has it already (under
    ``layers.attention_kernel("einsum")``, which the sweep's runs use); ``logits_at``: as in ``patch_sweep``."""
    by = tuple(by)
    check_args(tokens, tokens, metric, cfg, site, by, "denoise", chunk)
    if isinstance(sources, Tensor) or len(sources) != cfg.n_layers:
        got = f"a tensor of shape {tuple(sources.shape)}" if isinstance(sources, Tensor) else f"{len(sources)} of them"
        raise ValueError(f"sources must be a sequence of one tensor per layer ({cfg.n_layers}), got {got}")
    base_logits, base = forward_with_activations(params, tokens, cfg) if run is None else run
    check_scalar(metric(base_logits))
    base = {**base, "logits": base_logits}
    inputs = block_inputs(tokens, cfg)
    sample = site_value(base, 0, site)
    at = None if logits_at is None else logit_positions(logits_at, tokens.shape[-1])
    sources = [sources[i].expand_as(sample) for i in range(cfg.n_layers)]
    rows = _sweep(params, base, sources, metric, cfg, site=site, by=by, inputs=inputs, chunk=chunk, at=at, progress=progress)
    return arrange(rows, by, sample, site in HEAD_SITES)


def logit_positions(logits_at: Sequence[int] | int, seq: int) -> list[int]:
    """``logits_at`` as sorted distinct positions in ``[0, seq)`` (negative ones count from the end)."""
    items = [logits_at] if isinstance(logits_at, int) else list(logits_at)
    bad = [p for p in items if not validate.is_int(p) or not -seq <= p < seq]
    if bad or not items:
        raise ValueError(f"logits_at must be positions in [-seq, seq) = [{-seq}, {seq}), at least one, got {logits_at!r}")
    return sorted({p % seq for p in items})


def arrange(values: Float[Tensor, "layers rows"], by: tuple, sample: Tensor, has_heads: bool) -> Tensor:
    """``[layers, heads-axis?, position-axis?]`` reordered to ``by``'s order, without the axes not in it."""
    heads = sample.shape[-3] if has_heads and "head" in by else 1
    seq = sample.shape[-2] if "position" in by else 1
    grid = values.reshape(values.shape[0], heads, seq)
    canonical = ("layer", "head", "position")
    order = [canonical.index(axis) for axis in by]
    dropped = [canonical.index(axis) for axis in canonical if axis not in by]
    # The dropped axes have size 1, so after the permutation they fall away in the reshape.
    return grid.permute(order + dropped).reshape(*(grid.shape[i] for i in order))
