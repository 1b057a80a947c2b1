"""Fused Triton kernels for the fast paths (one module per family).

Triton ships with the CUDA builds of PyTorch on Linux. Every kernel has a plain PyTorch
reference path that it is tested against in float64-equivalent checks; on a machine without a
GPU, tests run the kernels through Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported), which accepts CPU tensors. The switches (whether Triton is available,
usable on some tensors, preferred by automatic choices) live in :mod:`dynaconv.dispatch` and
are re-exported here.
"""

from __future__ import annotations

import os

from .dispatch import interpreting, triton_available, triton_preferred, triton_usable

__all__ = [
    "autotune_configs",
    "interpreting",
    "triton_available",
    "triton_preferred",
    "triton_usable",
]


def autotune_configs(configs: list) -> list:
    """The configurations a kernel autotunes over: all of them, or only the first when
    ``DYNACONV_TRITON_AUTOTUNE=0`` (read when the kernel is built). Correctness tests on a GPU
    set it, since tuning every new test shape compiles each configuration."""
    if os.environ.get("DYNACONV_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs
