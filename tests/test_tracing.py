"""ftransformer.tracing: the one place that asks whether torch traces."""

import torch

from ftransformer.tracing import compiling, functorch_wrapped, is_tracing


def test_eager_code_is_not_tracing():
    x = torch.zeros(3)
    assert not compiling()
    assert not functorch_wrapped(x)
    assert not is_tracing(x)


def test_a_vmapped_tensor_is_tracing():
    seen = []

    def probe(x):
        seen.append((functorch_wrapped(x), is_tracing(x)))
        return x

    torch.func.vmap(probe)(torch.zeros(2, 3))
    assert seen == [(True, True)]


def test_a_grad_transformed_tensor_is_tracing():
    seen = []

    def f(x):
        seen.append(is_tracing(x))
        return x.sum()

    torch.func.grad(f)(torch.zeros(3))
    assert seen == [True]
