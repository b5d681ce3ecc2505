"""Pictures of curvature and attribution: a spectral density, influence scores, as PNGs (matplotlib on the first call)."""

from pathlib import Path

import torch

from ftransformer.io import save_figure


def plot_spectrum(density, path, *, title: str | None = None) -> Path:
    """Draw a ``curvature.Density`` (log density against eigenvalue, Ritz nodes as ticks) and write it to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not hasattr(density, "density") or density.grid.shape != density.density.shape:
        raise TypeError("density must be a curvature.Density (grid and density of one shape), "
                        f"got {type(density).__name__}")
    grid, values = density.grid.detach().double().cpu(), density.density.detach().double().cpu()
    floor = float(values.max()) * 1e-8 if float(values.max()) > 0 else 1e-12
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.semilogy(grid.numpy(), values.clamp_min(floor).numpy(), lw=1.2)
    nodes = density.nodes.detach().double().cpu()[density.weights.detach().cpu() > 0]
    ticks = torch.full_like(nodes, floor)
    ax.plot(nodes.numpy(), ticks.numpy(), "|", color="black", ms=8, alpha=0.4, label="Ritz values")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (stochastic Lanczos quadrature)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_influence(scores, labels, path, *, title: str | None = None) -> Path:
    """Horizontal bars: one per training sequence (``labels``, cut to 48 characters), its score, largest on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    if len(labels) != values.numel() or values.numel() == 0:
        raise ValueError(f"plot_influence needs one label per score (>= 1), got {len(labels)} labels "
                         f"and {values.numel()} scores")
    shown = [repr(text)[1:-1][:45] + ("..." if len(repr(text)) > 47 else "") for text in labels]
    fig = Figure(figsize=(7.2, 0.9 + 0.32 * len(shown)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = torch.arange(values.numel()).numpy()
    ax.barh(rows, values.numpy(), color=["tab:blue" if v >= 0 else "tab:red" for v in values.tolist()])
    ax.set_yticks(rows, shown, fontsize=8, family="monospace")
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("influence score (positive: lowered the query's loss)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
