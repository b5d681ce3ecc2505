"""Sparse autoencoders (dictionary learning) on any activation site: pure functions on a params pytree,
a stack of them trained by one ``vmap``-ed step, spliced back into the model as an intervention.

* ``architectures``: ReLU + L1, TopK, BatchTopK (with AuxK), JumpReLU; init and decoder normalization;
* ``stack``: the training step of one SAE and of a stack (one ``vmap``);
"""
