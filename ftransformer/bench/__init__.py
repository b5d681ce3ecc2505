"""Benchmarks behind ``ftransformer bench``: each module has ``add_arguments(parser)`` and ``run(args) -> int``.

* ``train``: one training step of the functional model against a plain ``torch.nn`` GPT (``train_steps``
  builds both; ``scaling`` times them across processes with ``--nproc``);
* ``generate``: generation speed against baselines.

Every benchmark times through ``timing``: interleaved repetitions, medians, and ``--threads`` restored on exit.
"""
