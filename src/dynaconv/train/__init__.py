"""The training system (kept apart from the library: nothing in dynaconv's layers imports it),
usable from Python; the command line and the commands on trained models are :mod:`dynaconv.cli`.

* :mod:`.config`: defaults, recipes (``recipes/*.yaml``), command-line overrides, validation;
* :mod:`.names`: the only place a configured name becomes code (model registries, never imports);
* :mod:`.data`: datasets, augmentations, resumable distributed sampling;
* :mod:`.engine`: :class:`~.engine.Trainer` / :func:`~.engine.train` (DDP, AMP, EMA, schedule);
* :mod:`.runfolder`: the run folder's rules (no silent overwrite, a consistent epoch set);
* :mod:`.checkpoint`: atomic, weights-only checkpoints and safetensors;
* :mod:`.ema`: the EMA that copies structural buffers;
* :mod:`.plots`: training curves and learned-structure plots (extensible per method).

No file read by the training system runs code: checkpoints load with ``weights_only=True``,
weights are safetensors, configurations are validated YAML whose names resolve through model
registries only, and a ``.pt2`` is loaded only on explicit request (``--unsafe-load-pt2``).
"""
