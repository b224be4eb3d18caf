"""ka_rs.engine: training, evaluation and the machinery they share; one job per module.

- :mod:`~ka_rs.engine.loop`: :class:`~ka_rs.engine.loop.TrainLoop`, the resumable, distributed
  epoch loop (optimiser, schedule, progress, JSON-lines metrics, periodic evaluation,
  checkpoints, mixed precision) that teacher training and amalgamation both run.
- :mod:`~ka_rs.engine.train`: teacher training (:func:`~ka_rs.engine.train.train_teacher`).
- :mod:`~ka_rs.engine.amalgamate`: amalgamation (:func:`~ka_rs.engine.amalgamate.amalgamate`);
  its configuration in :mod:`~ka_rs.engine.amalgamate_config`, the teachers' cached outputs in
  :mod:`~ka_rs.engine.teacher_cache`.
- :mod:`~ka_rs.engine.config`: run configs (dataclasses, TOML, ``--set`` overrides).
- :mod:`~ka_rs.engine.datasets`: the datasets a run reads (shapes / COCO / VOC, class subsets).
- :mod:`~ka_rs.engine.evaluate`: COCO AP / AP50 / AP75 over all classes and class subsets.
- :mod:`~ka_rs.engine.checkpoint`: atomic, digest-checked, ``weights_only``-loadable
  checkpoints.
- :mod:`~ka_rs.engine.amp`: the mixed-precision policy (``train.amp``).
- :mod:`~ka_rs.engine.distributed`: torchrun / DDP setup, samplers, gathering.
- :mod:`~ka_rs.engine.logging`: logging, progress bars, metrics files, atomic output writes.
- :mod:`~ka_rs.engine.plots`: curve plots.
- :mod:`~ka_rs.engine.commands`, :mod:`~ka_rs.engine.amalgamate_commands`: the ``ka-rs``
  subcommands.

Submodules are imported on use (``import ka_rs.engine`` stays cheap).
"""
