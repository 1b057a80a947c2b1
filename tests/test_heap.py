"""dynaconv.heap: glibc's thresholds fixed so freed tensor memory is reused, not refaulted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dynaconv import heap

#: Page faults of 20 calls that each allocate 28 MiB of tensors (filled in place) and free
#: them together, as a forward frees its activations, in a new process, after
#: :func:`retain_freed_memory` with its defaults or with low thresholds. (glibc's own default
#: varies between processes, from the one to the other: it is not the control.)
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from dynaconv.heap import retain_freed_memory
    # "retain": the defaults; "give back": thresholds so low that every tensor here is mapped
    # from the system and returned on free (what glibc's default does in some processes)
    small = {"mmap_threshold": 2**17, "trim_threshold": 2**17}
    applied = retain_freed_memory(**(small if sys.argv[1] == "give back" else {}))
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
    # glibc's and PyTorch's allocator settings from outside would change the count
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(heap._mallopt() is None, reason="glibc's mallopt is not available here")
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = _faults("retain")
    assert applied == "True"
    applied, given_back = _faults("give back")
    assert applied == "True"
    pages = 28 * 2**20 // 4096  # one call's
    assert retained < pages / 2  # reused: not even half a call's pages faulted again
    assert given_back > 10 * pages  # returned on free and faulted again on every call


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
