"""Data attribution and curvature as transforms of the loss: Hessian / Gauss-Newton products and spectra, EK-FAC influence."""

from ftransformer.attribution import curvature, ekfac
from ftransformer.attribution.ekfac import fit_factors, load_factors, pairwise_scores, pairwise_token_scores, precondition, save_factors

__all__ = ["curvature", "ekfac", "fit_factors", "load_factors", "pairwise_scores", "pairwise_token_scores",
           "precondition", "save_factors"]
