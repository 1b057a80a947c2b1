"""The demo: a quick run end to end (trained once for the module), its table, and its failure
reporting."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from dynaconv import DeployVerificationError, demo
from dynaconv.cli import main as cli_main
from dynaconv.train.engine import Trainer

STEPS = 4


@dataclass
class DemoRun:
    """The quick demo run once for the module: what it printed and returned, its Trainers."""

    code: int
    output: str
    results: dict[str, demo.DemoResult]
    trainers: dict[str, Trainer]
    folder_during_training: dict[str, bool]


@pytest.fixture(scope="module")
def quick_demo() -> Iterator[DemoRun]:
    """``dynaconv.demo.main`` with few steps, every method, as a user runs it: one thread and
    no Triton interpreter (a user's CPU machine has none; the test session sets one up)."""
    results: dict[str, demo.DemoResult] = {}
    trainers: dict[str, Trainer] = {}
    folder_during_training: dict[str, bool] = {}
    real_train, real_run_demo = demo.train, demo.run_demo

    def train(config):
        trainer = real_train(config)
        method = (config["model"]["convert"] or {}).get("method", demo.PLAIN)
        trainers[method] = trainer
        folder_during_training[method] = (trainer.out / "summary.json").is_file()
        return trainer

    def run_demo(*args, **kwargs):
        rows = real_run_demo(*args, **kwargs)
        results.update((row.method, row) for row in rows)
        return rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TRITON_INTERPRET", "0")
            patch.setattr(demo, "train", train)
            patch.setattr(demo, "run_demo", run_demo)
            code = demo.main(steps=STEPS, latency_batch=32, latency_reps=1, stream=out)
    finally:
        torch.set_num_threads(threads)
    yield DemoRun(code, out.getvalue(), results, trainers, folder_during_training)


def test_quick_demo_runs_every_method_and_exits_zero(quick_demo):
    assert quick_demo.code == 0, quick_demo.output
    lines = quick_demo.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    end = next(i for i in range(header + 2, len(lines)) if lines[i].startswith("---"))
    rows = {line.split()[0]: line for line in lines[header + 2 : end]}
    assert list(rows)[:6] == ["plain", *demo.DEMO_METHODS]
    for method, row in rows.items():
        cells = row.split()
        assert cells[1] == cells[2], f"{method}: accuracy changed by deploy"
    assert "all deployments verified" in quick_demo.output


def test_rows_hold_accuracy_counts_and_structure(quick_demo):
    plain, doconv = quick_demo.results["plain"], quick_demo.results["doconv"]
    for row in (plain, doconv):
        assert row.status == "ok" and not row.failed
        assert row.accuracy == row.accuracy_deployed and row.changed_predictions == 0
        assert 0.0 <= row.accuracy <= 1.0
        assert row.params_deployed == plain.params
        assert row.macs == row.macs_active == plain.macs
        assert row.latency_ms > 0 and row.latency_deployed_ms > 0
    assert doconv.params > doconv.params_deployed
    assert doconv.converted == 6 and doconv.skipped == {}
    assert doconv.structure == "D_mul=9 x3; D_mul=1 x3"
    table = demo.format_table([plain, doconv])
    assert table.splitlines()[0].split()[:3] == ["method", "acc", "acc"]
    assert any(line.startswith("doconv ") and "6/0" in line for line in table.splitlines())


def test_each_method_trains_through_the_trainer_in_a_temporary_folder(quick_demo):
    """The CLI's Trainer runs each row: the method's options, aux weight and step budget."""
    assert set(quick_demo.trainers) == {"plain", *demo.DEMO_METHODS}
    row = quick_demo.results["dgc"]
    assert row.status == "ok" and row.converted == 5 and len(row.skipped) == 1
    for method, trainer in quick_demo.trainers.items():
        assert quick_demo.folder_during_training[method], method
        assert not trainer.out.exists(), method  # the temporary run folder is removed
        config = trainer.config
        assert config["model"]["name"] == "digits_cnn" and config["data"]["dataset"] == "digits"
        assert config["train"]["max_iters"] == STEPS and trainer.state["iteration"] == STEPS
        assert not config["train"]["tensorboard"] and not config["train"]["plots"]
        assert config["train"]["progress_bar"] == "none"
        if method == "plain":
            assert config["model"]["convert"] is None
            continue
        options = demo.DEMO_METHODS[method]
        assert config["model"]["convert"] == {"method": method, "options": dict(options)}
        assert config["loss"]["aux_weight"] == demo.AUX_LOSS_WEIGHTS[method]


def test_failed_verification_makes_the_exit_status_non_zero(monkeypatch):
    def broken_deploy(model, **kwargs):
        raise DeployVerificationError("deployed model differs from the original")

    monkeypatch.setattr(demo, "deploy", broken_deploy)
    out = io.StringIO()
    assert demo.main(steps=2, methods=["plain"], latency_batch=8, latency_reps=1, stream=out) == 1
    assert "deploy verification failed" in out.getvalue()
    assert "FAILED: plain" in out.getvalue()


def test_an_error_in_one_method_is_reported_and_the_others_run(monkeypatch):
    real_train = demo.train

    def train(config):
        if config["model"]["convert"]:
            raise RuntimeError("boom")
        return real_train(config)

    monkeypatch.setattr(demo, "train", train)
    plain, doconv = demo.run_demo(["plain", "doconv"], steps=2, latency_batch=8, latency_reps=1)
    assert plain.status == "ok"
    assert doconv.failed and doconv.status == "failed: RuntimeError: boom"


def test_an_output_folder_keeps_the_runs_and_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(steps=2, methods=["plain"], latency_batch=8, latency_reps=1, out_dir=out) == 0
    assert (out / "plain" / "summary.json").is_file() and (out / "plain" / "best.pt").is_file()
    with pytest.raises(ValueError, match=r"out_dir: .*plain already holds a run"):
        demo.run_demo(["plain"], steps=2, out_dir=out)
    capsys.readouterr()
    assert cli_main(["demo", "--out", str(out)]) == 2  # refused before any training
    captured = capsys.readouterr()
    assert "dynaconv demo: error: out_dir:" in captured.err and captured.out == ""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        demo.run_demo(["plain"], steps=2, out_dir=tmp_path / "file")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"methods": ["plain", "nope"]}, "methods must be among"), ({"steps": 0}, "steps")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo.run_demo(**kwargs)
