"""Keep freed tensor memory in the process's heap (glibc's ``malloc``), for CPU work.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block over its *mmap threshold*
(128 KiB at start, raised as large blocks are freed, to at most 32 MiB) with fresh pages from
the system, and returns the heap's top to the system once more than its *trim threshold* is
free there. A forward that allocates and frees multi-megabyte activations, workspaces or
gathered kernels can then take page faults, and have the kernel zero the pages, on many
calls (how often varies between processes, with where the heap and the mappings lie; in
one pair of runs, one thread, torchvision's ResNet-18 at batch 16 took 10% longer with the
defaults: README, ``benchmarks/NOTES.md``).

:func:`retain_freed_memory` fixes both thresholds (``mallopt``), so blocks up to
``mmap_threshold`` come from the heap and freed memory stays there for the next call. The
price is memory: up to ``trim_threshold`` bytes freed by the process are kept rather than
given back. It changes the whole process's allocator, so the library never calls it on its
own; an application (a training or inference script, a benchmark) may, once, at start. The
same settings can be given from outside with glibc's tunables, before the process starts::

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["MAX_MMAP_THRESHOLD", "retain_freed_memory"]

#: ``mallopt`` parameters (glibc's ``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: The largest mmap threshold glibc accepts on 64-bit systems (``HEAP_MAX_SIZE / 2``).
MAX_MMAP_THRESHOLD = 32 * 2**20


@functools.cache
def _mallopt() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def retain_freed_memory(
    mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 2**30
) -> bool:
    """Keep freed blocks of up to ``mmap_threshold`` bytes, and up to ``trim_threshold`` bytes
    of freed memory in all, in the heap for reuse (see the module docstring).

    Returns ``True`` where the settings took effect (Linux with glibc), ``False`` elsewhere
    (nothing changed). Process-wide and not undone; call it once, at the start of an
    application.
    """
    for name, value, high in (
        ("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD),
        ("trim_threshold", trim_threshold, 2**31 - 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
            raise ValueError(f"{name} must be an int in [1, {high}] bytes, got {value!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
