"""Learning-path step 9d: pictures of what the analyses return, as PNG files.

* ``plot_attention``: one panel per head, a query x key grid with the tokens on both axes;
* ``plot_head_scores``: a layer x head heatmap of any per-head score, the value written in each cell;
* ``plot_patching``: a patching sweep or its attribution estimate (layer x position, layer x head, or one
  layer x position panel per head) on a diverging colour scale centred at 0;
* ``plot_logit_lens``: the top next-token guess after every layer, at every position;
* ``plot_iia_heatmap``: a DAS sweep's interchange-intervention accuracy, layer x position, one panel per k;
* ``plot_edges``: the top-k edges of an edge attribution as a graph; ``plot_faithfulness``: the metric of
  the top-k circuits against k.

Each draws on its own ``matplotlib.figure.Figure`` with an Agg canvas -- no display, no global pyplot
state, safe to call from threads and tests -- writes the file and returns its path. matplotlib is
imported on the first call, not with the package.
"""

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ftransformer.io import save_figure

# Beyond this many tokens per axis, tick labels no longer fit and are left out (the picture stays).
MAX_LABELLED = 64
# Beyond this many columns, heatmap cells are too narrow for their values to be written in them.
MAX_WRITTEN = 24


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(text: str) -> str:
    """A token as a tick label: control characters escaped, ``$`` kept out of mathtext, spaces visible."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text.replace("$", r"\$").replace(" ", "\u2423") or "''"


def _numpy(x: Tensor):
    return x.detach().to("cpu", torch.float32).numpy()


def _check_labels(labels: Sequence[str], n: int, axis: str, owner: str = "the pattern") -> list[str]:
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but {owner} has {axis}={n}")
    return [_label(str(s)) for s in labels]


def plot_attention(
    pattern: Float[Tensor, "heads seq kv_seq"],
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
    head_names: Sequence[str] | None = None,
) -> Path:
    """One panel per head: row ``q`` is where the token at ``q`` looks, columns are the keys.

    Args:
        pattern: one layer's attention, e.g. ``acts["blocks"][1]["attn"]["pattern"][0]``.
        labels: the ``kv_seq`` tokens as text; the queries are the last ``seq`` of them.
        head_names: panel titles (default ``head 0``, ``head 1``, ...).
    """
    heads, seq, kv_seq = pattern.shape
    x_labels = _check_labels(labels, kv_seq, "kv_seq")
    y_labels = x_labels[kv_seq - seq:]
    names = [f"head {h}" for h in range(heads)] if head_names is None else list(head_names)
    if len(names) != heads:
        raise ValueError(f"head_names has {len(names)} entries but the pattern has heads={heads}")
    cols = min(heads, 4)
    rows = -(-heads // cols)
    side = min(max(2.6, 0.16 * kv_seq + 1.0), 9.0)
    fig = _figure(cols * side + 1.6, rows * side + (0.9 if title else 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    data = _numpy(pattern)
    font = max(4.0, min(8.0, 260 / max(kv_seq, 1) / cols ** 0.5))
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(data[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_title(names[h], fontsize=9)
        first_column = h % cols == 0
        if kv_seq <= MAX_LABELLED:
            ax.set_xticks(range(kv_seq), x_labels, rotation=90, fontsize=font)
            ax.set_yticks(range(seq), y_labels if first_column else [], fontsize=font)
        ax.set_xlabel("key", fontsize=8)
        if first_column:
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _heatmap(fig, ax, scores, name: str | None, fmt: str, *, diverging: bool = False, limit: float | None = None,
             xlabel: str = "head", xticklabels: Sequence[str] | None = None, colorbar: bool = True):
    """``scores`` ``[rows, columns]`` as an image with each value written in its cell (when they fit).
    ``diverging``: a red/blue map centred at 0, from ``-limit`` to ``limit`` (default: the largest |value|)."""
    layers, columns = scores.shape
    if diverging:
        limit = limit or float(abs(scores).max()) or 1.0
        image = ax.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest", aspect="auto")
    else:
        image = ax.imshow(scores, cmap="magma", interpolation="nearest", aspect="auto")
    lo, hi = float(scores.min()), float(scores.max())
    mid = (lo + hi) / 2
    if columns <= MAX_WRITTEN:
        for i in range(layers):
            for j in range(columns):
                v = float(scores[i, j])
                # magma is dark at the low end; the diverging map is dark at both ends.
                dark = abs(v) > 0.6 * limit if diverging else v <= mid
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8 if columns <= 12 else 6,
                        color="white" if dark else "black")
    if xticklabels is None:
        ax.set_xticks(range(columns))
    elif columns <= MAX_LABELLED:
        ax.set_xticks(range(columns), xticklabels, rotation=90, fontsize=max(5.0, min(8.0, 320 / columns)))
    ax.set_yticks(range(layers))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    if name:
        ax.set_title(name)
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.8)
    return image


def plot_head_scores(
    scores: Float[Tensor, "layers heads"] | dict[str, Float[Tensor, "layers heads"]],
    path: str | Path,
    *,
    title: str | None = None,
    fmt: str = ".2f",
) -> Path:
    """A layer x head heatmap with each value written in its cell; a dict of scores (e.g. what
    ``head_scores`` returns) gives one heatmap per entry, side by side, titled by its key."""
    panels = dict(scores) if isinstance(scores, dict) else {"": scores}
    if not panels:
        raise ValueError("scores is an empty dict: nothing to plot")
    shapes = {tuple(s.shape) for s in panels.values()}
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"every score must have shape [layers, heads], got {sorted(shapes)}")
    layers, heads = max(s[0] for s in shapes), max(s[1] for s in shapes)
    width = min(max(3.0, 0.55 * heads + 1.8), 12.0)
    height = min(max(2.4, 0.45 * layers + 1.4), 12.0)
    fig = _figure(width * len(panels), height + (0.4 if title else 0.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, s) in zip(axes, panels.items()):
        _heatmap(fig, ax, _numpy(s), name.replace("_", "-") or None, fmt)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


PATCH_AXES = ("layer", "position", "head")


def _patch_grid(result: Tensor, by: Sequence[str]) -> tuple[Tensor, list[str]]:
    """``result`` with its axes put in the order ``layer, head, position`` (those of ``by`` it has)."""
    by = tuple(by)
    if "layer" not in by or len(set(by)) != len(by) or not set(by) <= set(PATCH_AXES):
        raise ValueError(f"by must hold 'layer' and any of 'position', 'head', each once, got {by!r}")
    if result.ndim != len(by):
        raise ValueError(f"result has {result.ndim} axes, shape {tuple(result.shape)}, but by names {len(by)}: {by!r}")
    axes = [a for a in ("layer", "head", "position") if a in by]
    return result.permute([by.index(a) for a in axes]), axes


def _patch_ticks(grid: Tensor, axes: list[str], by: Sequence[str], labels: Sequence[str] | None) -> tuple[str, list[str] | None]:
    """The x axis of ``plot_patching``'s panels: its name and tick labels (None: the column numbers)."""
    if "position" not in axes:
        if labels is not None:
            raise ValueError(f"labels name positions, but by={tuple(by)!r} has no 'position' axis")
        return ("head", None) if "head" in axes else ("whole site", [""])
    seq = grid.shape[-1]
    return "position", [str(p) for p in range(seq)] if labels is None else _check_labels(labels, seq, "seq", "the result")


def plot_patching(
    result: Tensor,
    path: str | Path,
    *,
    by: Sequence[str] = ("layer", "position"),
    labels: Sequence[str] | None = None,
    title: str | None = None,
    label: str = "metric",
) -> Path:
    """A heatmap of a patching sweep (``patch_sweep``, ``attribution_patch``, ``head_ablation_sweep``):
    red for patches that raise the metric, blue for those that lower it, white at 0 (one colour scale
    for the whole figure, centred at 0, from minus to plus the largest |value|).

    Args:
        result: the sweep, one axis per entry of ``by`` in that order.
        by: the ``by`` the sweep was run with. ``("layer", "position")``: layer x position, with the
            tokens under the columns; ``("layer", "head")``: layer x head, the value written in each
            cell; ``("layer",)``: one column; all three axes (any order): one layer x position panel per
            head (in a grid of up to 4 columns; one column when the positions make panels wide).
        labels: the tokens as text, one per position (default: the position numbers).
        label: what the colour bar says the values are (e.g. ``"change of logit difference"``).
    """
    grid, axes = _patch_grid(result, by)
    data = _numpy(grid)
    xlabel, ticks = _patch_ticks(grid, axes, by, labels)
    panels = [(None, data if data.ndim == 2 else data[:, None])] if len(axes) < 3 else [(f"head {h}", data[:, h]) for h in range(data.shape[1])]
    columns = panels[0][1].shape[1]
    width = min(max(3.2, (0.55 if columns <= MAX_WRITTEN else 0.2) * columns + 1.8), 14.0)
    cols = max(1, min(len(panels), 4, int(20 // width)))  # wide panels (many positions) stack in one column
    rows = -(-len(panels) // cols)
    height = min(max(2.2, 0.42 * grid.shape[0] + (1.9 if "position" in axes else 1.3)), 10.0)
    # A long title (a checkpoint's path) wraps to the figure's width, about 11 characters an inch.
    title = textwrap.fill(title, max(30, int(11 * (cols * width + 1.0)))) if title else None
    fig = _figure(cols * width + 1.0, rows * height + (0.3 + 0.25 * title.count("\n") if title else 0.0))
    grid_axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, values) in zip(grid_axes.flat, panels):
        image = _heatmap(fig, ax, values, name, ".2f", diverging=True, limit=float(abs(data).max()) or 1.0, xlabel=xlabel,
                         xticklabels=ticks, colorbar=False)
    for ax in list(grid_axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=grid_axes.ravel().tolist(), shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_logit_lens(
    lens: Float[Tensor, "layers_plus_1 seq vocab"],
    labels: Sequence[str],
    decode: Callable[[int], str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """The logit lens as a (layer, position) grid: the colour is the probability of the likeliest next
    token read off the residual stream there, and that token is written in the cell.

    Args:
        lens: ``logit_lens(params, acts, cfg)`` for one sequence (row 0: the embeddings, row ``i``:
            after ``i`` blocks, the last row: the logits).
        labels: the input tokens as text, one per position.
        decode: token id -> text, e.g. ``lambda i: tokenizer.decode([i])``.
    """
    rows, seq, _ = lens.shape
    x_labels = _check_labels(labels, seq, "seq")
    probs = torch.softmax(lens.detach().to(torch.float32), dim=-1)
    top_p, top_id = probs.max(-1)
    top_p, top_id = _numpy(top_p), top_id.cpu().tolist()
    fig = _figure(min(max(4.0, 0.62 * seq + 2.0), 40.0), min(max(2.6, 0.42 * rows + 1.6), 40.0))
    ax = fig.add_subplot()
    image = ax.imshow(top_p, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    for i in range(rows):
        for j in range(seq):
            text = _label(decode(top_id[i][j]))
            text = text if len(text) <= 8 else text[:7] + "\u2026"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                    color="white" if top_p[i, j] > 0.55 else "black")
    ax.set_xticks(range(seq), x_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), ["embed"] + [f"block {i}" for i in range(rows - 1)], fontsize=8)
    ax.set_xlabel("input token (the cell guesses the one after it)")
    ax.set_ylabel("residual stream after")
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top token")
    ax.set_title(title or "logit lens: top next-token guess per layer")
    return save_figure(fig, path)


def _layer_of(node: str, n_layers: int) -> int:
    """The column a node is drawn in: -1 the embedding, ``i`` layer ``i``'s heads and MLP, ``n_layers`` the logits."""
    if node == "embed":
        return -1
    if node == "logits":
        return n_layers
    return int(node[1:].split(".")[0])


def _node_places(writers: Sequence[str], readers: Sequence[str], kept: Sequence[Sequence[int]]) -> tuple[dict, dict]:
    """Places of the circuit's nodes only (those of the ``kept`` edges, ``(writer, reader)`` indices): a column
    per layer that has one (in order, the embedding first, the logits last), its heads from the top and its
    MLP below them; a head's q / k / v inputs sit just left of it (a key/value head's by the first query head
    of its group)."""
    group = sum(r.endswith(".q") for r in readers) // max(1, sum(r.endswith(".k") for r in readers))
    n_layers = 1 + max([_layer_of(w, 0) for w in writers[1:]] or [0])

    def node_of(reader: str) -> str:
        if reader.count(".") != 2:
            return reader
        node, port = reader.rsplit(".", 1)
        layer, head = node.split(".h")
        return f"{layer}.h{int(head) * (1 if port == 'q' else group)}"

    nodes = {writers[u] for u, _ in kept} | {node_of(readers[v]) for _, v in kept}
    columns = sorted({_layer_of(n, n_layers) for n in nodes})

    def order(node: str) -> tuple:
        return (node.startswith("m"), int(node.split(".h")[1]) if ".h" in node else 0)

    places = {}
    for x, layer in enumerate(columns):
        for y, node in enumerate(sorted((n for n in nodes if _layer_of(n, n_layers) == layer), key=order)):
            places[node] = (1.25 * x, float(y))
    ports = {}
    for _, v in kept:
        r = readers[v]
        x, y = places[node_of(r)]
        port = r.rsplit(".", 1)[1] if r.count(".") == 2 else ""
        ports[r] = (x - 0.3, y + {"q": -0.22, "k": 0.0, "v": 0.22, "": 0.0}[port], port)
    return places, ports


def plot_edges(edge_scores, path: str | Path, *, k: int = 20, title: str | None = None) -> Path:
    """The top ``k`` edges of ``edge_scores`` (``interp.edges.edge_attribution``'s result) as a graph of the
    circuit's nodes only, laid out by layer (a column per layer that has one: its heads, then its MLP), an
    arrow per edge into the reader's q / k / v input, red where patching the edge raises the metric, blue
    where it lowers it, as wide as its ``|score|``."""
    from ftransformer.interp.edges import top_edges

    scores, g = edge_scores
    keep = top_edges(edge_scores, min(k, int(g.edges.sum())))
    kept = keep.nonzero().tolist()
    places, ports = _node_places(g.writers, g.readers, kept)
    xs = [p[0] for p in places.values()] or [0.0]
    ys = [p[1] for p in places.values()] or [0.0]
    fig = _figure(min(max(4.0, 0.85 * max(xs) + 2.2), 40.0), min(max(3.0, 0.9 * max(ys) + 2.2), 20.0))
    ax = fig.add_subplot()
    values = _numpy(scores)
    top = float(abs(values[_numpy(keep) > 0]).max()) if keep.any() else 1.0
    for u, v in kept:
        (x0, y0), (x1, y1, _) = places[g.writers[u]], ports[g.readers[v]]
        s = float(values[u, v])
        ax.annotate("", xy=(x1, y1), xytext=(x0 + 0.25, y0), arrowprops=dict(
            arrowstyle="-|>", color="tab:red" if s > 0 else "tab:blue", lw=0.5 + 4.0 * abs(s) / (top or 1.0),
            alpha=0.8, shrinkA=0, shrinkB=0, connectionstyle="arc3,rad=0.08"))
    for name, (x, y) in places.items():
        ax.scatter([x], [y], s=900, color="white", edgecolors="black", zorder=3)
        ax.text(x, y, name, ha="center", va="center", fontsize=6.5, zorder=4)
    for x, y, port in ports.values():
        if port:
            ax.text(x - 0.05, y, port, ha="right", va="center", fontsize=6, color="dimgray")
    ax.set_xlim(-0.8, max(xs) + 0.8)
    ax.set_ylim(max(ys) + 0.8, -0.8)
    ax.axis("off")
    title = title or f"top {int(keep.sum())} edges (red: raises the metric, blue: lowers it)"
    ax.set_title(textwrap.fill(title, max(40, int(11 * fig.get_size_inches()[0]))))  # a long path wraps to the width
    return save_figure(fig, path)


def plot_faithfulness(curve, path: str | Path, *, title: str | None = None) -> Path:
    """The normalized metric of the top-k circuits against ``k`` (``interp.edges.faithfulness``'s result, or a
    sequence of them, e.g. one per ablation: one line each, labelled by its ablation)."""
    curves = [curve] if hasattr(curve, "normalized") else list(curve)
    if not curves:
        raise ValueError("curve is empty: nothing to plot")
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    for c in curves:
        ax.plot(list(c.ks), _numpy(c.normalized), marker="o", markersize=3, label=f"{c.ablation} ablation", clip_on=False)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    if max(max(c.ks) for c in curves) > 50:
        ax.set_xscale("symlog", linthresh=1.0)
    # k >= 0: the axis starts at 0 (symlog's margins would show negative ticks, -1 and -10, of no meaning).
    ax.set_xlim(left=0, right=max(max(c.ks) for c in curves) * 1.15 + 0.5)
    ax.set_xlabel("edges kept (top k by |score|)")
    ax.set_ylabel("(M(circuit) - M(empty)) / (M(full) - M(empty))")
    ax.legend(fontsize=8)
    ax.set_title(title or "faithfulness of the top-k circuits")
    return save_figure(fig, path)


def plot_steering_sweep(values: Float[Tensor, "layers scales"], layers: Sequence[int], scales: Sequence[float],
                        path: str | Path, *, title: str | None = None, label: str = "metric") -> Path:
    """A layer x scale heatmap of a steering sweep (``interp.steering.steering_sweep``), each value in its cell."""
    if tuple(values.shape) != (len(layers), len(scales)):
        raise ValueError(f"values must have shape (layers, scales) = ({len(layers)}, {len(scales)}), "
                         f"got {tuple(values.shape)}")
    fig = _figure(max(3.5, 0.6 * len(scales) + 2.0), max(2.4, 0.4 * len(layers) + 1.4))
    ax = fig.subplots()
    _heatmap(fig, ax, _numpy(values), label, ".2f", xlabel="scale", xticklabels=[f"{s:g}" for s in scales])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_iia_heatmap(
    iia: Float[Tensor, "layers seq k"],
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """``das_sweep``'s IIA as layer x position heatmaps, one panel per subspace size ``k`` (values in [0, 1],
    written in the cells); ``layers`` / ``positions`` / ``ks`` label the axes (default: their indices)."""
    if not isinstance(iia, Tensor) or iia.ndim != 3:
        raise ValueError(f"iia must be a [layers, positions, k] tensor, got {getattr(iia, 'shape', type(iia).__name__)}")
    n_layers, n_positions, n_k = iia.shape
    layers = _check_labels([str(x) for x in (range(n_layers) if layers is None else layers)], n_layers, "layers", "iia")
    positions = _check_labels([str(x) for x in (range(n_positions) if positions is None else positions)], n_positions,
                              "positions", "iia")
    ks = _check_labels([str(x) for x in (range(1, n_k + 1) if ks is None else ks)], n_k, "k", "iia")
    width, height = min(max(3.0, 0.55 * n_positions + 1.8), 12.0), min(max(2.4, 0.45 * n_layers + 1.4), 12.0)
    fig = _figure(width * n_k, height + (0.4 if title else 0.0))
    for ax, (j, k) in zip(fig.subplots(1, n_k, squeeze=False)[0], enumerate(ks)):
        _heatmap(fig, ax, _numpy(iia[:, :, j]), f"k = {k}", ".2f", xlabel="position",
                 xticklabels=positions)
        ax.set_yticks(range(n_layers), layers)
        ax.images[0].set_clim(0.0, 1.0)
    fig.suptitle(title or "interchange-intervention accuracy (DAS)")
    return save_figure(fig, path)


__all__ = [
    "plot_attention", "plot_edges", "plot_faithfulness", "plot_head_scores", "plot_iia_heatmap", "plot_logit_lens",
    "plot_patching", "plot_steering_sweep",
]
