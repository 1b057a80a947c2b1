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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "ARTEFACTS",
    "RunFolderError",
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


class RunFolderError(RuntimeError):
    """The run folder cannot be used (holds another run, cannot be created or written)."""


def existing_artefacts(out: Path) -> list[Path]:
    """The files and folders of a previous run in ``out`` (see :data:`ARTEFACTS`)."""
    if not out.is_dir():
        return []
    found = [out / name for name in ARTEFACTS if (out / name).exists()]
    for pattern in ARTEFACT_PATTERNS:
        found += sorted(out.glob(pattern))
    found += [out / name for name in ARTEFACT_FOLDERS if (out / name).is_dir()]
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


def prepare_run_folder(
    out: Path, *, resume: Path | None, overwrite: bool, is_main: bool = True
) -> list[Path]:
    """Check and create the run folder ``out`` before any work (module docstring, rule 1).

    * ``out`` with a previous run's artefacts: refused unless ``resume`` is a checkpoint in
      ``out`` (the run continues) or ``overwrite``;
    * ``out`` must be creatable and writable;
    * stale temporary files in ``out`` are removed (main process).

    Returns the artefacts that ``overwrite`` replaces (pass them to :func:`remove_artefacts`
    when the new run starts writing); empty otherwise.
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"train.out_dir {out} exists and is not a folder")
    if resume is not None and overwrite:
        raise RunFolderError("--overwrite and --resume exclude each other")
    artefacts = existing_artefacts(out)
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
    try:
        make_writable_folder(out)
    except OSError as error:
        raise RunFolderError(
            f"train.out_dir {out} cannot be created or written: {error.strerror or error}"
        ) from None
    if is_main:
        remove_stale_temporaries(out)
    return artefacts if overwrite else []


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
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
