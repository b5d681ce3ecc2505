"""Pictures of curvature: a spectral density as a PNG (matplotlib imported on the first call)."""

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
