"""CPU kernels in plain C++, compiled at first use by the system's compiler, loaded with ctypes.

A family ships a kernel as a ``.cpp`` file beside its Python code (no PyTorch headers: it
takes raw pointers and sizes). :func:`load` compiles it once per source, compiler and CPU
(``-O3 -march=native``: the kernel is built for the machine it runs on) into a cache folder and
loads it; later processes load the cached library. Building against PyTorch's headers
(``torch.utils.cpp_extension``) would take about a minute per build; the DGC kernel takes
about 4 s (one library per dtype, ``defines``).

Settings (environment):

* ``DYNACONV_NATIVE=0``: never compile or load a kernel (the forms that need one are then not
  candidates, and an explicit ``impl`` naming one is a ``ValueError`` saying why);
* ``DYNACONV_CACHE_DIR``: the cache folder (default ``$XDG_CACHE_HOME/dynaconv`` or
  ``~/.cache/dynaconv``), a subfolder ``native`` holds the libraries;
* ``CXX``: the compiler (default ``c++``).

Where there is no compiler or the build fails, :func:`load` returns None and
:func:`unavailable_reason` says why (the compiler's message included); nothing is retried in
the same process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["CXX_FLAGS", "cache_dir", "load", "unavailable_reason"]

#: The compiler flags (GNU dialect: ``-ffp-contract=fast`` fuses multiply-adds).
CXX_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-std=gnu++17",
    "-shared",
    "-fPIC",
)

_LOCK = threading.Lock()
_LOADED: dict[tuple[Path, tuple[str, ...]], ctypes.CDLL | None] = {}
_REASONS: dict[tuple[Path, tuple[str, ...]], str] = {}


def cache_dir() -> Path:
    """The folder compiled kernels are kept in (see the module docstring)."""
    configured = os.environ.get("DYNACONV_CACHE_DIR")
    if configured:
        return Path(configured) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynaconv" / "native"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: ``-march=native`` builds for them)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(compiler: str) -> str:
    run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return run.stdout


def _build(source: Path, defines: tuple[str, ...]) -> ctypes.CDLL | None:
    entry = (source, defines)
    if os.environ.get("DYNACONV_NATIVE", "1") == "0":
        _REASONS[entry] = "compiled kernels are switched off (DYNACONV_NATIVE=0)"
        return None
    compiler = _compiler()
    if compiler is None:
        _REASONS[entry] = f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found)"
        return None
    flags = (*CXX_FLAGS, *(f"-D{name}" for name in defines))
    parts = [source.read_bytes(), " ".join(flags).encode()]
    parts += [_version(compiler).encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    folder = cache_dir()
    suffix = "".join(f"-{name.lower()}" for name in defines)
    target = folder / f"{source.stem}{suffix}-{key}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # built under a temporary name, then renamed: processes building at once never
            # load a half-written library
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                built = Path(scratch) / target.name
                run = subprocess.run(
                    [compiler, *flags, str(source), "-o", str(built)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if run.returncode != 0:
                    _REASONS[entry] = f"{source.name} did not compile: {run.stderr.strip()[-2000:]}"
                    return None
                os.replace(built, target)
        except (OSError, subprocess.SubprocessError) as error:
            _REASONS[entry] = f"{source.name} could not be built in {folder}: {error}"
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        _REASONS[entry] = f"{target.name} did not load: {error}"
        return None


def load(source: str | os.PathLike[str], defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library of the C++ file ``source`` (built on first use, then cached), or
    None where it cannot be built here (:func:`unavailable_reason`). ``defines``: preprocessor
    names set for this build (``-DNAME``), e.g. to build one dtype's entry points per library;
    each set is its own library. Thread-safe; one build per process and set at most."""
    entry = (Path(source).resolve(), tuple(defines))
    loaded = _LOADED.get(entry, False)
    if loaded is not False:
        return loaded
    with _LOCK:
        if entry not in _LOADED:
            _LOADED[entry] = _build(*entry)
        return _LOADED[entry]


def unavailable_reason(source: str | os.PathLike[str], defines: tuple[str, ...] = ()) -> str | None:
    """Why :func:`load` of ``source`` (with ``defines``) gave None (None where it loaded or was
    not tried)."""
    entry = (Path(source).resolve(), tuple(defines))
    if _LOADED.get(entry) is not None:
        return None
    return _REASONS.get(entry)
