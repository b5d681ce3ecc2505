"""The one leaf op every projection uses: ``x @ w + b`` with ``w`` stored ``[d_in, d_out]``."""

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def linear(
    x: Float[Tensor, "*batch d_in"], w: Float[Tensor, "d_in d_out"], b: Float[Tensor, " d_out"] | None = None
) -> Float[Tensor, "*batch d_out"]:
    """Affine map. ``w`` is ``[d_in, d_out]`` (the order of ``x @ w``, and of GPT-2's Conv1D)."""
    # F.linear wants [d_out, d_in]; the transpose is a free view and one fused addmm does the rest.
    return F.linear(x, w.t(), b)
