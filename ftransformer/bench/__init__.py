"""Benchmarks behind ``ftransformer bench``: each module has ``add_arguments(parser)`` and ``run(args) -> int``.

* ``train``: one training step of the functional model against a plain ``torch.nn`` GPT;
* ``generate``: generation speed against baselines.
"""
