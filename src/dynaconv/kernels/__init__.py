"""Fused Triton kernels for the fast paths (one module per family).

Triton ships with the CUDA builds of PyTorch on Linux. Every kernel has a plain PyTorch
reference path that it is tested against in float64-equivalent checks; on a machine without a
GPU, tests run the kernels through Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported), which accepts CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "autotune_configs",
    "interpreting",
    "triton_available",
    "triton_preferred",
    "triton_usable",
]


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors here (CUDA, or the interpreter on CPU)."""
    if not triton_available():
        return False
    if interpreting():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def triton_preferred(*tensors: torch.Tensor) -> bool:
    """Whether an ``impl="auto"`` choice should run a Triton kernel: CUDA tensors only.

    The interpreter (:func:`interpreting`) runs kernels on CPU tensors for tests that ask for
    a Triton path explicitly; it is far slower than PyTorch, so automatic choices skip it.
    """
    return triton_available() and bool(tensors) and all(t.is_cuda for t in tensors)


def autotune_configs(configs: list) -> list:
    """The configurations a kernel autotunes over: all of them, or only the first when
    ``DYNACONV_TRITON_AUTOTUNE=0`` (read when the kernel is built). Correctness tests on a GPU
    set it, since tuning every new test shape compiles each configuration."""
    if os.environ.get("DYNACONV_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs
