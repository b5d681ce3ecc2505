"""Data attribution and curvature as transforms of the loss: Hessian / Gauss-Newton products and spectra."""

from ftransformer.attribution import curvature

__all__ = ["curvature"]
