"""The demo: a quick run end to end, its table, and its failure reporting."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynaconv import DeployVerificationError, demo
from dynaconv.train.cli import main as cli_main

SRC = Path(__file__).resolve().parents[1] / "src"


def test_quick_demo_runs_every_method_and_exits_zero():
    """``python -m dynaconv demo`` with few steps, as a user runs it (no Triton interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    code = (
        "from dynaconv.demo import main; "
        "raise SystemExit(main(steps=4, latency_batch=32, latency_reps=1))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    end = next(i for i in range(header + 2, len(lines)) if lines[i].startswith("---"))
    rows = {line.split()[0]: line for line in lines[header + 2 : end]}
    assert list(rows)[:6] == ["plain", *demo.DEMO_METHODS]
    for method, row in rows.items():
        if "not available yet" not in row:
            cells = row.split()
            assert cells[1] == cells[2], f"{method}: accuracy changed by deploy"
    assert "all deployments verified" in run.stdout


def test_rows_hold_accuracy_counts_and_structure():
    plain, doconv = demo.run_demo(["plain", "doconv"], steps=5, latency_batch=16, latency_reps=1)
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


def test_unavailable_family_gets_a_row(monkeypatch):
    def not_yet(method):
        raise NotImplementedError(f"method {method!r} is not implemented yet")

    monkeypatch.setattr(demo, "layer_class", not_yet)
    (row,) = demo.run_demo(["dgc"], steps=2)
    assert row.status == "not available yet" and not row.failed
    assert "not available yet" in demo.format_table([row])


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


def test_each_method_trains_through_the_trainer_in_a_temporary_folder(monkeypatch):
    """The CLI's Trainer runs each row: the method's options, aux weight and step budget."""
    real_train = demo.train
    trainers = []

    def train(config):
        trainer = real_train(config)
        assert trainer.out.is_dir() and (trainer.out / "summary.json").is_file()
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(demo, "train", train)
    (row,) = demo.run_demo(["dgc"], steps=3, latency_batch=8, latency_reps=1)
    assert row.status == "ok" and row.converted == 5 and len(row.skipped) == 1
    (trainer,) = trainers
    config = trainer.config
    assert config["model"]["name"] == "digits_cnn" and config["data"]["dataset"] == "digits"
    assert config["model"]["convert"] == {"method": "dgc", "options": demo.DEMO_METHODS["dgc"]}
    assert config["loss"]["aux_weight"] == demo.AUX_LOSS_WEIGHTS["dgc"]
    assert config["train"]["max_iters"] == 3 and trainer.state["iteration"] == 3
    assert not config["train"]["tensorboard"] and not config["train"]["plots"]
    assert config["train"]["progress_bar"] == "none"
    assert not trainer.out.exists()  # the temporary run folder is removed


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
