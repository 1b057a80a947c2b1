"""The run folder: what a run writes there, and the rules that keep it whole.

A run writes ``config.yaml`` and, at the end of every epoch, the **epoch set**

* ``last.pt``: the checkpoint (also rewritten mid-epoch with ``train.checkpoint_every_iters``);
* ``best.pt``: a copy of ``last.pt`` as written at the end of the best evaluated epoch;
* ``best.safetensors``: the evaluation weights (EMA when enabled) of ``best.pt``, tagged with
  its iteration in the metadata;
* ``metrics.csv``: the history rows of ``last.pt``;

then, at the end, ``model.safetensors``, ``summary.json``, plots and ``tensorboard/``.

Rules:

1. **No silent overwrite**: a new run refuses a folder that holds artefacts of a run
   (:func:`prepare_run_folder`), unless it resumes a checkpoint of that folder or
   ``overwrite`` is asked. This is checked before any data is read. With ``overwrite`` the
   previous run's artefacts (and only those) are deleted once the new run's set-up has
   succeeded, before it writes its first file (:func:`remove_artefacts`), so old and new files
   never mix and a run that fails to start loses nothing.
2. **The epoch set is consistent**: ``last.pt`` is the source of truth and is written first
   (atomically: temporary file, then rename); the others derive from it and are written after,
   each atomically. A run killed between two of these writes leaves a ``last.pt`` that holds
   everything needed to restore the rest, and resuming does so (``Trainer.repair_run_folder``)
   before training on: ``best.pt`` is copied from ``last.pt`` when that epoch was the best (or
   taken from beside the resumed checkpoint), ``best.safetensors`` is rebuilt from ``best.pt``,
   ``metrics.csv`` from the history rows.
3. **No stale temporaries**: the temporary files a killed run left (``.NAME.XXXX.tmp``) are
   removed when a run starts or resumes in the folder.
4. **One run at a time**: a run holds an exclusive lock on its folder (:class:`RunLock`, the
   file ``.dynaconv.lock`` holding its pid, locked with ``flock``) from its first check to its
   end; another ``train`` into that folder (new, ``--resume`` or ``--overwrite``) is refused
   with one line naming the holder's pid while it lives. A lock left by a dead process is
   reclaimed (the operating system releases ``flock`` locks with their process).
5. **No symlinked artefacts**: a folder whose artefacts (``tensorboard/`` included) are
   symbolic links is refused before anything is deleted or written.
6. **A run that fails before its first checkpoint leaves nothing that blocks a rerun**: the
   files it wrote (``config.yaml``, ``tensorboard/``) are removed, and the folder too when the
   run created it and it is empty (:meth:`RunLock.abandon`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid in the lock file decides
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ARTEFACTS",
    "LOCK_NAME",
    "RunFolderError",
    "RunLock",
    "existing_artefacts",
    "make_writable_folder",
    "prepare_run_folder",
    "remove_artefacts",
    "remove_stale_temporaries",
]

#: Files a run writes in its folder (plots ``structure*.png`` and ``tensorboard/`` besides).
ARTEFACTS = (
    "config.yaml",
    "last.pt",
    "best.pt",
    "best.safetensors",
    "model.safetensors",
    "metrics.csv",
    "summary.json",
    "curves.png",
)
ARTEFACT_PATTERNS = ("structure.png", "structure_*.png")
ARTEFACT_FOLDERS = ("tensorboard",)
#: The lock file of a run folder (not an artefact: removed when the run ends).
LOCK_NAME = ".dynaconv.lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used (holds another run, cannot be created or written)."""


def existing_artefacts(out: Path) -> list[Path]:
    """The files and folders of a previous run in ``out`` (see :data:`ARTEFACTS`)."""
    if not out.is_dir():
        return []
    found = [out / name for name in ARTEFACTS if os.path.lexists(out / name)]
    for pattern in ARTEFACT_PATTERNS:
        found += sorted(out.glob(pattern))
    found += [out / name for name in ARTEFACT_FOLDERS if os.path.lexists(out / name)]
    return found


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary files ``.NAME.XXXX.tmp`` of the artefacts, left by a killed run."""
    if not out.is_dir():
        return []
    return sorted(
        path for name in ARTEFACTS for path in out.glob(f".{name}.*.tmp") if path.is_file()
    )


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove :func:`stale_temporaries`; the removed paths."""
    removed = stale_temporaries(out)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _same_folder(checkpoint: Path, out: Path) -> bool:
    try:
        return checkpoint.resolve().parent == out.resolve()
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock of a run folder (module docstring, rules 4 and 6).

    :meth:`acquire` creates ``FOLDER/.dynaconv.lock`` holding this process's pid and locks it
    (``flock``, not blocking); :class:`RunFolderError` names the holder's pid when another
    process holds it. :meth:`release` removes the file and unlocks.
    """

    def __init__(self, folder: Path, created: bool = False) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.created = created  # the run created the folder (abandon may remove it)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()[:20] or "unknown"
        except OSError:
            return "unknown"

    def _refuse(self) -> RunFolderError:
        return RunFolderError(
            f"{self.folder} is in use by a running training (pid {self._holder()}, lock file "
            f"{self.path}); wait for it to end or choose another --out"
        )

    def acquire(self) -> RunLock:
        for _ in range(100):
            if fcntl is None:  # pragma: no cover
                self._acquire_by_pid()
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file meanwhile: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise self._refuse()

    def _acquire_by_pid(self) -> None:  # pragma: no cover - non-POSIX fallback
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self._holder()
            if holder.isdigit() and _pid_alive(int(holder)):
                raise self._refuse() from None
            self.path.unlink(missing_ok=True)  # a dead holder's lock is reclaimed
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock (nothing when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def abandon(self, written: list[Path]) -> None:
        """A run that failed before its first checkpoint: remove the ``written`` artefacts,
        the folder when this run created it and it is now empty, and the lock."""
        if self._fd is None:
            return
        for path in written:
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
        remove_stale_temporaries(self.folder)
        self.release()
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def __del__(self) -> None:
        self.release()


def prepare_run_folder(
    out: Path, *, resume: Path | None, overwrite: bool, is_main: bool = True
) -> tuple[list[Path], RunLock | None]:
    """Check, create and lock the run folder ``out`` before any work (module docstring).

    * ``out`` with a previous run's artefacts: refused unless ``resume`` is a checkpoint in
      ``out`` (the run continues) or ``overwrite``; symlinked artefacts are refused either way;
    * ``out`` must be creatable and writable, and not in use by another run (the main process
      takes its lock, released by the caller);
    * stale temporary files in ``out`` are removed (main process).

    Returns the artefacts that ``overwrite`` replaces (pass them to :func:`remove_artefacts`
    when the new run starts writing; empty otherwise) and the lock (None on other ranks).
    """
    if out.is_symlink() and not out.is_dir():
        raise RunFolderError(f"train.out_dir {out} is a symbolic link to no folder")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"train.out_dir {out} exists and is not a folder")
    if resume is not None and overwrite:
        raise RunFolderError("--overwrite and --resume exclude each other")
    created = not out.exists()
    try:
        make_writable_folder(out)
    except OSError as error:
        raise RunFolderError(
            f"train.out_dir {out} cannot be created or written: {error.strerror or error}"
        ) from None
    lock = RunLock(out, created).acquire() if is_main else None
    try:
        artefacts = _check_artefacts(out, resume, overwrite)
    except BaseException:
        if lock is not None:
            lock.abandon([])
        raise
    if is_main:
        remove_stale_temporaries(out)
    return (artefacts if overwrite else []), lock


def _check_artefacts(out: Path, resume: Path | None, overwrite: bool) -> list[Path]:
    """The previous run's artefacts in ``out`` (rule 1), refusing symlinks among them (rule 5)."""
    artefacts = existing_artefacts(out)
    linked = next((path for path in artefacts if path.is_symlink()), None)
    if linked is not None:
        raise RunFolderError(
            f"{linked} is a symbolic link; a run folder's files are never written or deleted "
            "through links: remove it or choose another --out"
        )
    if artefacts and not overwrite:
        if resume is None:
            hint = (
                f"continue it with --resume {out / 'last.pt'}, "
                if (out / "last.pt").is_file()
                else ""
            )
            raise RunFolderError(
                f"{out} already holds a run ({artefacts[0].name}, ...); {hint}replace it with "
                "--overwrite, or choose another --out / --name"
            )
        if not _same_folder(resume, out):
            raise RunFolderError(
                f"{out} already holds another run ({artefacts[0].name}, ...) than {resume}; "
                "resume into the checkpoint's own folder or an empty one (--out)"
            )
    return artefacts


def make_writable_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) and check that a file can be written into it;
    ``OSError`` otherwise (the caller names the setting it came from)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.remove(probe)


def remove_artefacts(paths: list[Path]) -> None:
    """Delete a previous run's artefacts (files and folders) before a new run writes."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
