"""Learning-path step 9a: a model's intermediate values as return values, and interventions as arguments.

``forward_with_activations`` runs the very code of ``forward`` (the same mask and rotary tables, built
once per call) with a ``Tap`` (``layers/tap.py``) threaded through it, and returns the logits together
with every intermediate value, named:

======================================  ==========================================  ==============================
path                                    shape                                       what it is
======================================  ==========================================  ==============================
``embed``                               ``[*batch, seq, d_model]``                  residual stream entering block 0
``blocks.{i}.resid_pre``                ``[*batch, seq, d_model]``                  residual stream entering block i
``blocks.{i}.attn.q``                   ``[*batch, heads, seq, head_dim]``          queries (after rotary, if any)
``blocks.{i}.attn.k`` / ``.v``          ``[*batch, kv_heads, seq, head_dim]``       keys (after rotary) / values
``blocks.{i}.attn.pattern``             ``[*batch, heads, seq, kv_seq]``            softmax rows: query -> keys
``blocks.{i}.attn.head_out``            ``[*batch, heads, seq, d_model]``           each head's write to the residual
``blocks.{i}.resid_mid``                ``[*batch, seq, d_model]``                  after the attention sublayer
``blocks.{i}.mlp.hidden``               ``[*batch, seq, d_ff]``                     after the activation (no MLP: absent)
``blocks.{i}.resid_post``               ``[*batch, seq, d_model]``                  after the whole block
``final``                               ``[*batch, seq, d_model]``                  what the unembedding reads (after ln_f)
======================================  ==========================================  ==============================

``acts`` nests them: ``acts["blocks"][1]["attn"]["pattern"]``. In a post-LN model ``resid_mid`` and
``resid_post`` are the normed sums, as they flow on. In the parallel layouts (``Config.residual``
``"parallel"`` / ``"parallel_shared_norm"``, GPT-NeoX / GPT-J) both sublayers read ``resid_pre``:
``resid_mid`` is ``resid_pre`` plus the attention's write alone (nothing reads it; it is where that
write ends), and ``resid_post`` is ``resid_mid`` plus the MLP's write, computed from ``resid_pre``.
In the sandwich layout (``norm_position="sandwich"``, Gemma 2/3) each sublayer's output is normed again
(``ln1_post`` / ``ln2_post``) before it is added: ``head_out`` is each head's write *before* that norm, so
``resid_mid - resid_pre`` is ``ln1_post`` of their sum, not the sum itself (the same holds for the
``"output"`` layout, OLMo-2, with ``ln1``). ``mlp.hidden`` is the gated product for SwiGLU / GeGLU. ``head_out`` summed over heads plus ``b_o`` is the
attention sublayer's output.

An intervention maps a path to a function ``value -> value`` of the same shape; what it returns flows
on through the model (and is what ``acts`` records). Interventions are arguments, not hooks: nothing is
registered or removed, and the whole call runs under ``torch.func.grad``, ``vmap`` and ``compile``.
"""

from collections.abc import Callable

from ftransformer.config import Config
from ftransformer.layers.block import has_mlp
from ftransformer.layers.tap import Tap
from ftransformer.model import check_tokens, forward_unchecked
from ftransformer.tree import unflatten_paths
from ftransformer.shapes import Logits, Tokens

ATTN_SITES = ("q", "k", "v", "pattern", "head_out")


def activation_paths(cfg: Config) -> list[str]:
    """Every activation path of a model with this config, in the order the forward pass reaches them."""
    paths = ["embed"]
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        paths += [b + "resid_pre"] + [f"{b}attn.{s}" for s in ATTN_SITES] + [b + "resid_mid"]
        if has_mlp(cfg):
            paths.append(b + "mlp.hidden")
        paths.append(b + "resid_post")
    return paths + ["final"]


def check_interventions(interventions, cfg: Config) -> dict[str, Callable]:
    """The interventions as a dict, or ``ValueError`` naming an unknown path and listing the valid ones."""
    if interventions is None:
        return {}
    if not isinstance(interventions, dict):
        raise TypeError(f"interventions must be a dict of path -> function, got {type(interventions).__name__}")
    valid = activation_paths(cfg)
    for path, fn in interventions.items():
        if path not in valid:
            raise ValueError(f"unknown activation path {path!r}; valid paths are: {', '.join(valid)}")
        if not callable(fn):
            raise TypeError(f"the intervention at {path!r} must be a function value -> value, got {type(fn).__name__}")
    return dict(interventions)


def forward_with_activations(
    params: dict, tokens: Tokens, cfg: Config, *, interventions: dict | None = None
) -> tuple[Logits, dict]:
    """``forward`` (no dropout) that also returns every intermediate value, with optional interventions.

    Args:
        interventions: ``{"blocks.1.attn.head_out": fn, ...}``; each ``fn`` gets the value at that path
            and returns its replacement (same shape). See ``interp.interventions`` for ready-made ones.

    Returns:
        ``(logits, acts)``: the logits (equal to ``forward``'s, bit for bit, without interventions) and
        the activation tree described in this module's table.
    """
    check_tokens(tokens, cfg)
    tap = Tap(check_interventions(interventions, cfg))
    logits = forward_unchecked(params, tokens, cfg, tap=tap)
    return logits, unflatten_paths(tap.acts)
