"""Sparse autoencoders (dictionary learning) on any activation site: pure functions on a params pytree,
a stack of them trained by one ``vmap``-ed step, spliced back into the model as an intervention.

* ``architectures``: ReLU + L1, TopK, BatchTopK (with AuxK), JumpReLU; init and decoder normalization;
* ``stack``: the training step of one SAE and of a stack (one ``vmap``);
* ``synthetic``: superposition ground truth and how well a decoder recovered it;
* ``splice``: the SAE as an intervention (and its error-term form), ablation baselines;
* ``metrics``: reconstruction and spliced-model metrics of a whole stack in one ``vmap``;
* ``activations``: one site's activations collected to a memory-mapped file;
* ``train``: the stack's ``TrainStep`` and ``loop.fit``'s data for it (metrics.jsonl, checkpoints, resume).
"""

from ftransformer.interp.sae.activations import (
    ActivationFile, collect_activations, fit_scale, open_activations, site_activations,
)
from ftransformer.interp.sae.architectures import (
    ARCHITECTURES, HPARAMS, SAEConfig, decode, encode, init_sae, pre_activations, sae_loss,
)
from ftransformer.interp.sae.metrics import evaluate_stack, reconstruction_metrics
from ftransformer.interp.sae.splice import ablate_site, reconstruct, splice_sae
from ftransformer.interp.sae.stack import SAEState, init_stack, init_state, make_hparams, sae_step, stack_step
from ftransformer.interp.sae.synthetic import feature_directions, mean_max_cosine, superposition_batch
from ftransformer.interp.sae.train import SAEData, fit_stack, load_stack, make_sae_step

__all__ = [
    "ARCHITECTURES", "ActivationFile", "HPARAMS", "SAEConfig", "SAEData", "SAEState", "ablate_site", "collect_activations",
    "decode", "encode", "evaluate_stack", "feature_directions", "fit_scale", "fit_stack", "init_sae", "init_stack",
    "init_state", "load_stack", "make_hparams", "make_sae_step", "mean_max_cosine", "open_activations", "pre_activations",
    "reconstruct", "reconstruction_metrics", "sae_loss", "sae_step", "site_activations", "splice_sae",
    "stack_step", "superposition_batch",
]
