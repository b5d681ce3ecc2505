"""The public API's shape: a short top level, named submodules, old names forwarded with a warning."""

import importlib
import inspect
import pkgutil

import pytest

import ftransformer as ft


def test_every_exported_name_resolves_and_the_top_level_stays_small():
    for name in ft.__all__:
        assert hasattr(ft, name), name
    functions_and_classes = [n for n in ft.__all__ if not inspect.ismodule(getattr(ft, n))]
    assert 25 <= len(functions_and_classes) <= 35, functions_and_classes


def test_no_exported_function_shares_a_name_with_a_submodule():
    submodules = {m.name for m in pkgutil.iter_modules(ft.__path__)} - {"__main__"}
    for name in ft.__all__:
        value = getattr(ft, name)
        if not inspect.ismodule(value):
            assert name not in submodules, f"ft.{name} is a {type(value).__name__} and also a module's name"
        # the attribute is what __all__ says, not a submodule that overwrote it on a later import
    for name in submodules:
        importlib.import_module(f"ftransformer.{name}")
    assert inspect.isfunction(ft.generate) and inspect.isfunction(ft.quantize)


@pytest.mark.parametrize("old", ["cross_entropy", "tree_map", "per_example_grads", "stack_params", "BPETokenizer"])
def test_the_names_02_forwarded_are_gone_in_03(old):
    with pytest.raises(AttributeError, match=f"no attribute '{old}'"):
        getattr(ft, old)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("ftransformer.batched")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fit_ensemble'"):
        ft.fit_ensemble  # noqa: B018 - the attribute access is the test
