"""The ``dynaconv`` application: the command line and the commands it runs on trained models.

* :mod:`.app`: the parser and :func:`main` (``python -m dynaconv``, the ``dynaconv`` script);
* :mod:`.commands`: eval, deploy, profile and export on a trained model.

Training itself is :mod:`dynaconv.train` (configuration, data, the :class:`~dynaconv.train.engine.Trainer`
and its run folder), usable from Python without the command line; the demo is :mod:`dynaconv.demo`.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
