"""ftransformer.batched: a deprecated alias of per_example and ensemble, every name forwarded with a warning."""

import pytest

from ftransformer import batched, ensemble, per_example


@pytest.mark.parametrize("name, module", [
    ("per_example_grads", per_example), ("make_per_example_train_step", per_example),
    ("noise_scale", per_example), ("stack_params", ensemble), ("make_ensemble_step", ensemble),
    ("evaluate_ensemble", ensemble),
])
def test_old_names_warn_and_forward(name, module):
    with pytest.warns(DeprecationWarning, match=rf"batched\.{name} moved to ftransformer\.{module.__name__.split('.')[-1]}"):
        got = getattr(batched, name)
    assert got is getattr(module, name)


def test_unknown_names_fail_and_dir_lists_the_old_ones():
    with pytest.raises(AttributeError, match="no attribute 'fit_ensemble'"):
        batched.fit_ensemble  # noqa: B018 - the attribute access is the test
    assert "stack_params" in dir(batched) and "per_example_grads" in dir(batched)
