"""dynaconv.heap: glibc's thresholds fixed so freed tensor memory is reused, not refaulted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dynaconv import heap

#: Page faults of 20 calls that each allocate 28 MiB of tensors (filled in place) and free
#: them together, as a forward frees its activations, in a new process, with or without
#: :func:`retain_freed_memory` (called before the allocations).
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from dynaconv.heap import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    def call():
        return [torch.empty(n * 2**20).fill_(1.0) for n in (3, 3, 1)]
    call()  # the first call faults its pages in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        call()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(heap._mallopt() is None, reason="glibc's mallopt is not available here")
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = _faults("retain")
    assert applied == "True"
    _, default = _faults("default")
    pages = 28 * 2**20 // 4096  # one call's
    assert retained < pages / 2  # reused: not even half a call's pages faulted again
    assert default > 10 * pages  # glibc's default gives them back and faults them again


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"mmap_threshold": 0}, "mmap_threshold"),
        ({"mmap_threshold": heap.MAX_MMAP_THRESHOLD + 1}, "mmap_threshold"),
        ({"trim_threshold": -5}, "trim_threshold"),
        ({"trim_threshold": 1.5}, "trim_threshold"),
        ({"mmap_threshold": True}, "mmap_threshold"),
    ],
)
def test_bad_thresholds_are_refused_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        heap.retain_freed_memory(**kwargs)
