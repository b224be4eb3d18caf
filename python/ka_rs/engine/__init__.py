"""ka_rs.engine: training, evaluation and the machinery they share.

- :mod:`~ka_rs.engine.config`: run configs (dataclasses, TOML, ``--set`` overrides).
- :mod:`~ka_rs.engine.train`: :class:`~ka_rs.engine.train.TrainLoop` (resumable, distributed
  epoch loop with progress, JSON-lines metrics, periodic evaluation, checkpoints) and
  :func:`~ka_rs.engine.train.train_teacher`.
- :mod:`~ka_rs.engine.evaluate`: COCO AP / AP50 / AP75 over all classes and class subsets.
- :mod:`~ka_rs.engine.checkpoint`: atomic, ``weights_only``-loadable checkpoints.
- :mod:`~ka_rs.engine.distributed`: torchrun / DDP setup, samplers, gathering.
- :mod:`~ka_rs.engine.logging`: logging, progress bars, metrics files, curve plots.
- :mod:`~ka_rs.engine.commands`: the ``train-teacher``, ``evaluate`` and ``export-shapes``
  subcommands of ``ka-rs``.

Submodules are imported on use (``import ka_rs.engine`` stays cheap).
"""
