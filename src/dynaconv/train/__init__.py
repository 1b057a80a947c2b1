"""The training system (kept apart from the library: nothing in dynaconv's layers imports it).

* :mod:`.config`: defaults, recipes (``recipes/*.yaml``), command-line overrides;
* :mod:`.data`: datasets, augmentations, resumable distributed sampling;
* :mod:`.engine`: :class:`~.engine.Trainer` / :func:`~.engine.train` (DDP, AMP, EMA, schedule);
* :mod:`.checkpoint`: atomic, weights-only checkpoints and safetensors;
* :mod:`.ema`: the EMA that copies structural buffers;
* :mod:`.plots`: training curves and learned-structure plots (extensible per method);
* :mod:`.commands`: eval, deploy, profile and export on a trained model;
* :mod:`.cli`: the ``dynaconv`` command line.
"""
