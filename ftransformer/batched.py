"""Deprecated: the vmap tools moved to ``ftransformer.per_example`` and ``ftransformer.ensemble``.

Every old name still resolves here, with a ``DeprecationWarning`` naming its new home.
"""

from ftransformer.deprecation import forwarder

# old name -> (new module, new name)
_MOVED = {
    "per_example_grads": ("per_example", "per_example_grads"),
    "per_example_grad_norms": ("per_example", "per_example_grad_norms"),
    "make_per_example_train_step": ("per_example", "make_per_example_train_step"),
    "NoiseScale": ("per_example", "NoiseScale"),
    "gradient_noise_scale": ("per_example", "gradient_noise_scale"),
    "noise_scale": ("per_example", "noise_scale"),
    "stack_params": ("ensemble", "stack_params"),
    "unstack_params": ("ensemble", "unstack_params"),
    "init_ensemble": ("ensemble", "init_ensemble"),
    "make_ensemble_step": ("ensemble", "make_ensemble_step"),
    "evaluate_ensemble": ("ensemble", "evaluate_ensemble"),
    "member_name": ("ensemble", "member_name"),
    "plot_members": ("ensemble", "plot_members"),
    "format_ranking": ("ensemble", "format_ranking"),
}


__getattr__ = forwarder("ftransformer.batched", _MOVED, removal="ftransformer.batched will be removed")


def __dir__() -> list[str]:
    return sorted(_MOVED)
