"""The layers' tensor math as plain functions, shared by :mod:`dynaconv.layers` and
:mod:`dynaconv.kernels` (which both import it, so neither imports the other's internals).

One module per family. Functions take tensors and a :class:`~dynaconv.layers.ConvSpec` (the
conv geometry) and hold no state; which of several exact forms runs is decided by
:mod:`dynaconv.dispatch`.
"""
