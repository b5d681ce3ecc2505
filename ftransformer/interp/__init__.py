"""Learning-path step 9, interpretability: activations as return values, interventions as arguments,
analyses as pure functions of them, and plots.

* ``activations``: ``forward_with_activations`` and the table of activation paths;
* ``interventions``: head ablation, activation patching, steering, ``head_ablation_sweep``;
* ``patching``: ``patch_sweep``, exact activation patching sweeps as vmapped runs from the patched layer;
* ``attribution``: ``attribution_patch`` (AtP / AtP*, every patch estimated from one forward + backward) and
  ``atp_report`` (an estimate next to the exact sweep);
* ``edges``: the writer -> reader graph of a model, exact circuits and edge patching (``circuit_logits``,
  ``edge_patch_sweep``), EAP / EAP-IG edge attribution from one forward + backward, top-k circuits and
  their faithfulness curves;
* ``analysis``: attention entropy, previous-token and induction scores, logit lens, direct logit
  attribution, loss per position;
* ``steering``: steering vectors from prompt pairs (``steering_vector``), ``steering.steer`` (a site path and
  a scale) and the layer x scale ``steering_sweep`` as one vmap;
* ``das``: distributed alignment search, a trainable rotation whose first k coordinates are swapped between a
  base and a source run (``train_das``, ``iia``), trained by ``grad`` over the intervention params only;
* ``boundless``: Boundless DAS, the subspace size learned as a soft boundary (``train_boundless_das``);
* ``hypotheses``: ``das_sweep``, DAS over (layer x position x k) as ONE stacked step, each hypothesis its own optimizer state;
* ``planted``: ground truth for them, a hand-set model that stores a known variable in a known subspace;
* ``reft``: LoReFT, the low-rank edit ``h + R^T (W h + b - R h)`` at chosen positions and DiReFT ``h + R^T (W h + b)`` (``train_reft``);
* ``weights``: weight processing as pure params transforms (``fold_layer_norm``, ``center_writing_weights``,
  ``center_unembed``, ``fold_value_biases``) and per-head QK / OV circuits kept factored, composition scores;
* ``plots``: attention grids, layer x head heatmaps, the logit lens, as PNG files (matplotlib, Agg).
"""

from ftransformer.interp.activations import activation_paths, forward_with_activations
from ftransformer.interp.analysis import (
    attention_entropy,
    direct_logit_attribution,
    head_scores,
    induction_scores,
    logit_lens,
    loss_per_position,
    previous_token_scores,
    repeated_random_tokens,
    repeated_stretches,
    stacked_patterns,
)
from ftransformer.interp.attribution import atp_report, attribution_patch
from ftransformer.interp.boundless import boundless_das_params, boundless_intervention, learned_size, train_boundless_das
from ftransformer.interp.das import das_intervention, das_params, iia, orthogonal, principal_angles, train_das
from ftransformer.interp.hypotheses import DasSweep, das_sweep
from ftransformer.interp.edges import (
    EdgeScores,
    Faithfulness,
    Graph,
    circuit_logits,
    edge_attribution,
    edge_patch_sweep,
    faithfulness,
    graph,
    reader_gradients,
    top_edges,
    writer_values,
)
from ftransformer.interp.interventions import (
    ablate_heads,
    combine,
    head_ablation_sweep,
    head_means,
    masked_heads,
    patch,
    steer,
)
from ftransformer.interp.patching import patch_sweep, replace_sweep
from ftransformer.interp.plots import (
    plot_attention,
    plot_edges,
    plot_faithfulness,
    plot_head_scores,
    plot_iia_heatmap,
    plot_logit_lens,
    plot_patching,
)
from ftransformer.interp.reft import direft_intervention, loreft_intervention, reft_params, train_reft
from ftransformer.interp.steering import steering_sweep, steering_vector
from ftransformer.interp.weights import (
    FactoredMatrix,
    center_unembed,
    center_writing_weights,
    composition_scores,
    fold_layer_norm,
    fold_value_biases,
    ov_circuit,
    qk_circuit,
)

__all__ = [
    "EdgeScores", "Faithfulness", "Graph", "circuit_logits", "edge_attribution", "edge_patch_sweep", "faithfulness",
    "graph", "reader_gradients", "top_edges", "writer_values", "plot_edges", "plot_faithfulness", "plot_patching",
    "FactoredMatrix", "center_unembed", "center_writing_weights", "composition_scores", "fold_layer_norm",
    "fold_value_biases", "ov_circuit", "qk_circuit",
    "ablate_heads", "activation_paths", "atp_report", "attribution_patch", "attention_entropy", "combine", "direct_logit_attribution",
    "forward_with_activations", "head_ablation_sweep", "head_means", "head_scores", "induction_scores",
    "logit_lens", "loss_per_position", "masked_heads", "patch", "patch_sweep", "replace_sweep", "plot_attention", "plot_head_scores",
    "plot_logit_lens", "previous_token_scores",
    "repeated_random_tokens", "repeated_stretches", "stacked_patterns", "steer",
    "steering_sweep", "steering_vector",
    "das_intervention", "das_params", "iia", "orthogonal", "principal_angles", "train_das",
    "boundless_das_params", "boundless_intervention", "learned_size", "train_boundless_das", "DasSweep", "das_sweep",
    "plot_iia_heatmap",
    "direft_intervention", "loreft_intervention", "reft_params", "train_reft",
]
