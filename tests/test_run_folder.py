"""Run-folder integrity: no silent overwrite, an end-of-epoch set that survives kills, resume
consistency, stale temporary files removed, a NaN stop that keeps the last good set."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from dynaconv.cli import main
from dynaconv.train import checkpoint, engine
from dynaconv.train.checkpoint import load_checkpoint
from dynaconv.train.runfolder import ARTEFACTS, stale_temporaries

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [
        "train",
        "--recipe",
        "digits-small",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--ema",
        "0.5",
        "--set",
        "model.kwargs.width=4",
        "--set",
        "data.train_subset=64",
        "--set",
        "data.val_subset=48",
        "--set",
        "optim.lr=0.2",
        "--set",
        "train.plots=false",
        "--set",
        "train.tensorboard=false",
        *extra,
    ]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (the reference for the kill tests)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _no_data(monkeypatch) -> None:
    """Fail the test if the data is loaded (a refusal must come before any work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded before the run folder was checked")

    monkeypatch.setattr(engine, "build_datasets", refuse)


# --------------------------------------------------------------------------------------------
# no silent overwrite


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_second_train_into_a_run_folder_is_refused_before_any_work(finished, capsys, monkeypatch):
    before = _snapshot(finished)
    _no_data(monkeypatch)
    assert main(_args(finished)) == 2
    err = _one_line_error(capsys)
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert _snapshot(finished) == before


@settings(
    max_examples=15,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(present=st.sets(st.sampled_from((*ARTEFACTS, "structure_lgc.png", "tensorboard"))))
def test_any_artefact_of_a_run_makes_the_folder_occupied(monkeypatch, capsys, present):
    _no_data(monkeypatch)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        out.mkdir()
        (out / "notes.txt").write_text("not a run artefact")
        for name in present:
            if name == "tensorboard":
                (out / name).mkdir()
            else:
                (out / name).write_bytes(b"previous run")
        if not present:  # a folder without artefacts is free: the run starts (data is loaded)
            with pytest.raises(AssertionError, match="data was loaded"):
                main(_args(out))
            return
        before = _snapshot(out)
        assert main(_args(out)) == 2
        assert "already holds a run" in _one_line_error(capsys)
        assert _snapshot(out) == before


def test_overwrite_deletes_the_previous_run_first(finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for item in finished.iterdir():
        if item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    (out / "structure_lgc.png").write_bytes(b"a plot of the previous run")
    (out / ".last.pt.abcd.tmp").write_bytes(b"left by a killed run")
    (out / "notes.txt").write_text("the user's own file")
    before = _snapshot(out)
    # a replacement that fails to start loses nothing
    assert main(_args(out, "--overwrite", "--set", "data.dataset=mnist", epochs=1)) == 2
    assert "--data-dir" in _one_line_error(capsys)
    assert {k: v for k, v in _snapshot(out).items() if not k.endswith(".tmp")} == {
        k: v for k, v in before.items() if not k.endswith(".tmp")
    }
    assert main(_args(out, "--overwrite", "--max-iters", "2", epochs=1)) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert "structure_lgc.png" not in names and not stale_temporaries(out)
    assert (out / "notes.txt").read_text() == "the user's own file"
    state = load_checkpoint(out / "last.pt")["state"]
    assert state["iteration"] == 2 and len(state["history"]) == 1
    assert load_checkpoint(out / "best.pt")["state"]["iteration"] == 2
    assert _metrics_rows(out) == _strip(state["history"])


def test_resume_into_a_folder_of_another_run_is_refused(finished, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes((finished / "last.pt").read_bytes())
    before = _snapshot(finished)
    assert main(["train", "--resume", str(other / "last.pt"), "--out", str(finished)]) == 2
    assert "another run" in _one_line_error(capsys)
    assert _snapshot(finished) == before
    with pytest.raises(SystemExit) as stop:  # argparse: the two exclude each other
        main([*_args(tmp_path / "x"), "--resume", str(other / "last.pt"), "--overwrite"])
    assert stop.value.code == 2


def test_an_out_dir_that_cannot_be_created_fails_before_any_work(tmp_path, capsys, monkeypatch):
    _no_data(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    for out in (blocker, blocker / "run"):
        assert main(_args(out)) == 2
        assert "train.out_dir" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------------
# the end-of-epoch set under kills


class Killed(BaseException):
    """A simulated kill (not an Exception: nothing in the trainer may catch it)."""


def _strip(rows: list[dict]) -> list[dict]:
    """History rows as metrics.csv holds them, without the wall-clock column."""
    return [
        {k: "" if v is None else str(v) for k, v in row.items() if k != "elapsed_s"} for row in rows
    ]


def _metrics_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as handle:
        return [
            {k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)
        ]


def _assert_consistent_set(out: Path) -> None:
    """best.pt is the best epoch's checkpoint, best.safetensors its weights, metrics.csv the
    history of last.pt; no temporary file is left."""
    last = load_checkpoint(out / "last.pt")
    state = last["state"]
    best = load_checkpoint(out / "best.pt")
    assert best["state"]["iteration"] == state["best_iteration"]
    best_rows = [r for r in state["history"] if r["iteration"] == state["best_iteration"]]
    assert len(best_rows) == 1 and best_rows[0]["ema_val_acc"] == state["best_acc"]
    weights = load_file(str(out / "best.safetensors"))
    assert weights.keys() == best["ema"].keys()
    assert all(torch.equal(weights[k], best["ema"][k]) for k in weights)
    with safe_open(str(out / "best.safetensors"), "pt") as handle:
        assert handle.metadata()["iteration"] == str(state["best_iteration"])
    assert _metrics_rows(out) == _strip(state["history"])
    assert not stale_temporaries(out)


def _assert_same_results(out: Path, reference: Path) -> None:
    for name in ("last.pt", "best.pt"):
        ours, theirs = load_checkpoint(out / name), load_checkpoint(reference / name)
        for part in ("model", "ema"):
            assert ours[part].keys() == theirs[part].keys()
            for key, value in theirs[part].items():
                assert torch.equal(ours[part][key], value), (name, part, key)
        assert _strip(ours["state"]["history"]) == _strip(theirs["state"]["history"])
        assert ours["state"]["best_iteration"] == theirs["state"]["best_iteration"]
    for name in ("best.safetensors", "model.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(reference / name))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert _metrics_rows(out) == _metrics_rows(reference)


def _record_writes(monkeypatch) -> list[str]:
    writes: list[str] = []
    original = checkpoint._atomic_write

    def recording(path, write):
        writes.append(Path(path).name)
        return original(path, write)

    monkeypatch.setattr(checkpoint, "_atomic_write", recording)
    return writes


def _kill_at(monkeypatch, number: int) -> None:
    """The ``number``-th atomic write dies after writing its temporary file, as a kill would."""
    original = checkpoint._atomic_write
    count = [0]

    def killing(path, write):
        count[0] += 1
        if count[0] == number:
            path = Path(path)
            fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with open(fd, "wb") as handle:
                handle.write(b"half a file")
            raise Killed(path.name)
        return original(path, write)

    monkeypatch.setattr(checkpoint, "_atomic_write", killing)


def test_a_kill_between_any_two_writes_loses_nothing_after_resume(
    finished, tmp_path, monkeypatch, capsys
):
    with monkeypatch.context() as patch:
        writes = _record_writes(patch)
        assert main(_args(tmp_path / "recorded")) == 0
    epoch_set = {"last.pt", "best.pt", "best.safetensors", "metrics.csv"}
    assert epoch_set <= set(writes) and writes.count("best.pt") >= 1
    for number, name in enumerate(writes, start=1):
        out = tmp_path / f"killed-{number}"
        with monkeypatch.context() as patch:
            _kill_at(patch, number)
            with pytest.raises(Killed, match=name.replace(".", r"\.")):
                main(_args(out))
        if (out / "last.pt").exists():
            assert stale_temporaries(out), "the simulated kill leaves its temporary file"
            assert main(["train", "--resume", str(out / "last.pt")]) == 0, number
        else:
            # killed (here: an exception) before the first checkpoint: the run removed what
            # it wrote, so starting again is not refused
            assert not out.exists(), number
            assert main(_args(out)) == 0, number
        capsys.readouterr()
        _assert_consistent_set(out)
        _assert_same_results(out, finished)


def test_resume_restores_a_missing_or_stale_set_from_last_pt(tmp_path, capsys):
    """A kill right after ``last.pt`` of a best epoch: best.pt missing, best.safetensors and
    metrics.csv stale. Resuming rebuilds all three from ``last.pt``."""
    reference = tmp_path / "reference"
    assert main(_args(reference, "--max-iters", "2", epochs=1)) == 0  # one epoch: the best
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((reference / "last.pt").read_bytes())
    (out / "metrics.csv").write_text("epoch\n")
    (out / "best.safetensors").write_bytes((reference / "model.safetensors").read_bytes()[:99])
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "restored best.pt" in err and "restored best.safetensors" in err
    assert "restored metrics.csv" in err
    _assert_consistent_set(out)
    _assert_same_results(out, reference)


# --------------------------------------------------------------------------------------------
# NaN stop


@pytest.mark.parametrize("where", ["model", "ema"])
def test_nonfinite_buffer_stops_and_keeps_the_last_good_set(
    finished, tmp_path, monkeypatch, capsys, where
):
    out = tmp_path / "run"
    assert main(_args(out, "--max-iters", "2", epochs=3)) == 0  # one good epoch
    capsys.readouterr()
    good = _snapshot(out)
    step = engine.Trainer._step

    def poisoning(self, images, labels):
        result = step(self, images, labels)
        module = self.model if where == "model" else self.ema.module
        with torch.no_grad():
            module.features[1].running_var[0] = float("inf")  # the first BatchNorm
        return result

    monkeypatch.setattr(engine.Trainer, "_step", poisoning)
    assert main(["train", "--resume", str(out / "last.pt"), "--max-iters", "4"]) == 3
    err = capsys.readouterr().err
    assert f"{where}.features.1.running_var" in err and "Traceback" not in err
    assert _snapshot(out) == {**good, "config.yaml": _snapshot(out)["config.yaml"]}
    assert not stale_temporaries(out)
    _assert_consistent_set(out)
