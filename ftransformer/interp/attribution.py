"""Learning-path step 9d: attribution patching (AtP, AtP*) -- every patch of a sweep estimated at once.

``attribution_patch`` estimates what ``patch_sweep`` computes exactly, for the same ``site`` and ``by``,
from ONE forward and ONE backward pass of the base run: the effect of patching a slice of a site is taken
to first order, ``(a_source - a_base) . dM/da``, summed over the slice (Nanda 2023; Kramar et al. 2024).

The gradient at every site comes without hooks or ``retain_grad``: each site gets an intervention that
adds a tensor, ``v -> v + delta``, with ``delta`` a zero tensor, and ``torch.func.grad`` differentiates the
metric with respect to the pytree of those zeros -- which is ``dM/da`` at the unchanged base run.

AtP* (Kramar et al.): attention's softmax makes the first-order estimate poor for queries and keys (a
saturated softmax has a near-zero gradient, so large effects read as none). For ``attn.q`` / ``attn.k`` the
patched attention pattern is recomputed exactly instead -- ``softmax`` of the patched queries (or keys)
against the base keys (or queries), for every patch in one ``vmap`` over the patch masks -- and only the
step from the pattern on is linearised: ``(pattern_patched - pattern_base) . dM/dpattern``.

``atp_report`` puts an estimate next to the exact sweep (correlation, sign agreement, the largest misses),
so AtP's known false negatives are visible.
"""

from collections.abc import Sequence

import torch
from einops import rearrange, reduce

from ftransformer import validate
from ftransformer.config import Config
from ftransformer.interp.patching import (
    HEAD_SITES,
    Metric,
    arrange,
    check_args,
    check_scalar,
    logit_positions,
    replace_at,
    site_value,
    base_and_source,
    patch_masks,
    run_from,
)
from ftransformer.interp.progress import progress_bar
from ftransformer.layers.attention import attention_kernel, attention_pattern, scores
from ftransformer.layers.masks import Mask
from ftransformer.layers.tap import Tap
from ftransformer.model import block_inputs, embed
from ftransformer.tree import unflatten_paths
from ftransformer.shapes import Float, Tensor, Tokens

QK_SITES = ("attn.q", "attn.k")


def _run(params: dict, tokens: Tokens, cfg: Config, interventions: dict, at: list[int] | None) -> tuple:
    """``forward_with_activations`` (arguments checked by the caller) that unembeds the positions ``at`` only
    (None: all): ``(those logits, acts)``."""
    tap = Tap(interventions)
    inputs = block_inputs(tokens, cfg)
    x = tap("embed", embed(params, tokens, cfg, positions=inputs.positions))
    return run_from(params, x, cfg, 0, inputs, at=at, tap=tap), unflatten_paths(tap.acts)


def _at_positions(logits: Tensor, at: list[int] | None, seq: int) -> Tensor:
    """The logits of the positions ``at`` in a ``[*batch, seq, vocab]`` tensor of zeros: the metric is taken
    not to read the others (as in ``patch_sweep(logits_at=...)``), and AtP uses only its gradient, which
    then does not depend on them -- so they need not be computed at all."""
    if at is None:
        return logits
    zeros = logits.new_zeros(*logits.shape[:-2], seq, logits.shape[-1])
    return zeros.index_copy(-2, torch.tensor(at, device=logits.device), logits)


def site_gradients(
    params: dict, tokens: Tokens, metric: Metric, cfg: Config, zeros: dict, *, interventions: dict | None = None,
    at: list[int] | None = None,
) -> tuple[dict, dict]:
    """``(dM/da at every path of zeros, the run's activations)`` from one forward + backward of ``tokens``
    (checked by the caller): the gradient with respect to ``zeros`` (path -> a zero tensor of the site's
    shape), each added at its site, ``interventions`` applied besides (e.g. EAP-IG's embeddings). With
    ``at``, only those positions are unembedded (and differentiated through the unembedding)."""

    def run(deltas: dict) -> tuple:
        adds = {path: (lambda v, d=d: v + d.to(v.dtype)) for path, d in deltas.items()}
        logits, acts = _run(params, tokens, cfg, {**(interventions or {}), **adds}, at)
        value = metric(_at_positions(logits, at, tokens.shape[-1]))
        check_scalar(value)
        return value, acts

    return torch.func.grad(run, has_aux=True)(zeros)


def _slices(values: Tensor, by: tuple, has_heads: bool) -> Float[Tensor, " rows"]:
    """A per-element product ``[*batch, (heads,) seq, feature]`` summed into one value per patch row, in
    ``patch_masks``' order (head-major), the axes not in ``by`` summed whole."""
    values = values.sum(-1)
    per = reduce(values if has_heads else values[..., None, :], "... heads seq -> heads seq", "sum")
    if "head" not in by:
        per = per.sum(0, keepdim=True)
    if "position" not in by:
        per = per.sum(1, keepdim=True)
    return rearrange(per, "heads seq -> (heads seq)")


def _qk_star(layer: dict, source: Tensor, grad_pattern: Tensor, mask: Mask, cfg: Config, *, site, by, chunk) -> Tensor:
    """AtP* for ``attn.q`` / ``attn.k`` at one layer: each patch's attention pattern recomputed exactly and
    linearised from the pattern on, ``[rows]``. A ``vmap`` over the key heads (each with its group of query
    heads: a pattern depends on its own q and k only) of a ``vmap`` over that head's patch masks."""
    kv_heads = layer["attn"]["k"].shape[-3]

    def by_kv(t: Tensor) -> Tensor:
        """``[*batch, heads, seq, last]`` -> ``[kv_heads, *batch, group, seq, last]`` (query heads by key head)."""
        return t.unflatten(-3, (kv_heads, -1)).movedim(-4, 0)

    q, pattern, grad = by_kv(layer["attn"]["q"]), by_kv(layer["attn"]["pattern"]), by_kv(grad_pattern)
    k = rearrange(layer["attn"]["k"], "... kv_heads seq head_dim -> kv_heads ... seq head_dim")
    source = by_kv(source) if site == "attn.q" else rearrange(source, "... kv_heads seq head_dim -> kv_heads ... 1 seq head_dim")
    rows = patch_masks(by, source.shape[-3], source.shape[-2], source.device)
    allowed = mask.allowed[..., None, None, :, :]

    def one_kv_head(q, k, source, pattern, grad) -> Float[Tensor, " rows"]:
        def effect(row: Float[Tensor, "heads seq"]) -> Float[Tensor, ""]:
            if site == "attn.q":
                pq, pk = replace_at(q, source, row, True), k
            else:
                pq, pk = q, replace_at(k[..., None, :, :], source, row, True)[..., 0, :, :]
            patched = attention_pattern(pq[..., None, :, :, :], pk[..., None, :, :], allowed, **scores(cfg))
            return ((patched[..., 0, :, :, :] - pattern) * grad).sum()

        return torch.func.vmap(effect, chunk_size=chunk)(rows)

    per_kv = torch.func.vmap(one_kv_head)(q, k, source, pattern, grad)
    return rearrange(per_kv, "kv_heads rows -> (kv_heads rows)") if "head" in by else per_kv.sum(0)


@attention_kernel("einsum")  # vmap batches the einsum path; clean and patched runs share it
def attribution_patch(
    params: dict, clean: Tokens, corrupt: Tensor, metric: Metric, cfg: Config, *, site: str = "resid_pre",
    by: Sequence[str] = ("layer", "position"), direction: str = "denoise", correction: bool = True,
    chunk: int | None = None, logits_at: Sequence[int] | int | None = None, progress: bool = False,
) -> Tensor:
    """Attribution patching: the first-order estimate of every patch of a ``patch_sweep`` at once.

    Args:
        clean, corrupt, metric, site, by, direction: as in ``patch_sweep`` (the same slices, the same
            axes in the same order).
        correction: AtP* for ``attn.q`` / ``attn.k``: recompute each patched attention pattern exactly and
            linearise only from the pattern on (False: plain AtP there too; other sites ignore it).
        chunk: how many AtP* patterns go through ``vmap`` at once (None: all of a layer's).
        logits_at: as in ``patch_sweep``: the positions whose logits ``metric`` reads; only those are
            unembedded (and differentiated through). ``metric`` sees zeros at the others (its gradient, all
            AtP uses, does not depend on positions it does not read).
        progress: a tqdm bar on stderr: the forward + backward, then each layer's estimates.

    Returns:
        The estimated *change* of the metric for each patch, shaped like ``patch_sweep``'s result: its
        exact counterpart is ``patch_sweep(...) - metric(logits of the base run)`` (the base run is the
        corrupted one for ``"denoise"``, the clean one for ``"noise"``).
    """
    by = tuple(by)
    check_args(clean, corrupt, metric, cfg, site, by, direction, chunk)
    base_tokens, source_tokens = base_and_source(clean, corrupt, direction)
    at = None if logits_at is None else logit_positions(logits_at, base_tokens.shape[-1])
    # The source run's activations are all that is read of it: its unembedding reads one position only.
    _, source = _run(params, source_tokens, cfg, {}, [source_tokens.shape[-1] - 1])
    star = correction and site in QK_SITES
    paths = [f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ((site, "attn.pattern") if star else (site,))]
    sample = {f"blocks.{i}.{s}": site_value(source, i, s) for i in range(cfg.n_layers) for s in (site, "attn.pattern")}
    zeros = {path: torch.zeros_like(sample[path]) for path in paths}
    with progress_bar(cfg.n_layers + 1, f"attribution {site}", "step", progress) as bar:
        grads, base = site_gradients(params, base_tokens, metric, cfg, zeros, at=at)
        bar.update(1)
        rows = _layer_estimates(source, base, grads, cfg, block_inputs(base_tokens, cfg).masks, site=site, by=by, star=star,
                                chunk=chunk, bar=bar)
    return arrange(torch.stack(rows), by, site_value(source, 0, site), site in HEAD_SITES)


def _layer_estimates(source: dict, base: dict, grads: dict, cfg: Config, masks, *, site, by, star, chunk, bar) -> list[Tensor]:
    """Each layer's AtP (or AtP*) estimates from the gradients at the site, ``[rows]`` per layer."""
    rows = []
    for i in range(cfg.n_layers):
        src = site_value(source, i, site)
        if star:
            grad_pattern = grads[f"blocks.{i}.attn.pattern"]
            rows.append(_qk_star(base["blocks"][i], src, grad_pattern, masks[i], cfg, site=site, by=by, chunk=chunk))
        else:
            product = (src - site_value(base, i, site)) * grads[f"blocks.{i}.{site}"]
            rows.append(_slices(product, by, site in HEAD_SITES))
        bar.update(1)
    return rows


def atp_report(exact: Tensor, estimate: Tensor, top: int = 10) -> str:
    """A plain-text table of an estimate next to the exact patch effects: Pearson correlation, how often the
    signs agree, and the ``top`` largest misses (index, exact, estimate, miss), biggest first -- where AtP's
    false negatives (a large exact effect estimated near zero) show up."""
    if not isinstance(exact, Tensor) or not isinstance(estimate, Tensor) or exact.shape != estimate.shape:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (exact, estimate)]
        raise ValueError(f"exact and estimate must be tensors of the same shape, got {shapes[0]} and {shapes[1]}")
    validate.positive_int("top", top)
    x, y = (rearrange(t.detach().double(), "... -> (...)") for t in (exact, estimate))
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item() if x.numel() > 1 else float("nan")
    # Sign agreement over the patches with an effect (exact zeros plus rounding would count as noise).
    real = x.abs() > 1e-3 * x.abs().max()
    signs = (torch.sign(x[real]) == torch.sign(y[real])).double().mean().item() if real.any() else float("nan")
    misses = (x - y).abs()
    order = misses.argsort(descending=True)[:top]
    lines = [
        f"{x.numel()} patches, correlation {corr:.4f}, signs agree {100 * signs:.1f}% (of {int(real.sum())} with an effect), "
        f"mean |miss| {misses.mean().item():.4g}",
        f"{'index':>16} {'exact':>11} {'estimate':>11} {'miss':>11}",
    ]
    for j in order.tolist():
        index = tuple(int(n) for n in torch.unravel_index(torch.tensor(j), exact.shape)) if exact.ndim else ()
        lines.append(f"{str(index):>16} {x[j].item():>11.4g} {y[j].item():>11.4g} {x[j].item() - y[j].item():>11.4g}")
    return "\n".join(lines)
