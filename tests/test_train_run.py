"""End-to-end training through the command line on scikit-learn's digits (seconds on a CPU)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dynaconv.cli import main
from dynaconv.cli.commands import load_deployed, load_trained
from dynaconv.layers.doconv.layer import DOConv2d
from dynaconv.train.checkpoint import CheckpointError, load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _single_thread_deterministic():
    """Runs here and in the subprocesses use one thread, so results can be compared bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """Two epochs of the small CNN converted to DO-Conv, with an EMA, through the CLI."""
    out = tmp_path_factory.mktemp("digits") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(
            [
                "train",
                "--recipe",
                "digits-small",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--convert",
                "doconv",
                "--ema",
                "0.9",
                "--set",
                "model.kwargs.width=16",
                "--set",
                "train.log_every_iters=10",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def test_training_writes_logs_plots_checkpoints_and_weights(digits_run):
    out = digits_run
    for name in (
        "config.yaml",
        "metrics.csv",
        "last.pt",
        "best.pt",
        "model.safetensors",
        "best.safetensors",
        "summary.json",
        "curves.png",
        "structure.png",
        "structure_doconv.png",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 * (1437 // 32)
    assert summary["final_val_acc"] > 0.5  # ten classes: chance is 0.1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["convert"]["method"] == "doconv"
    assert config["train"]["ema_decay"] == 0.9
    checkpoint = load_checkpoint(out / "last.pt")
    assert yaml.safe_load(checkpoint["config"]) == config
    assert checkpoint["state"]["epoch"] == 2 and checkpoint["ema"] is not None
    weights = load_file(str(out / "model.safetensors"))
    for key, value in checkpoint["ema"].items():  # the final weights are the EMA's
        assert torch.equal(weights[key], value), key
    model, _ = load_trained(out / "model.safetensors")
    assert any(isinstance(m, DOConv2d) for m in model.modules())


def test_eval_deploy_profile_export_subcommands(digits_run, tmp_path, capsys):
    out = digits_run
    assert main(["eval", str(out / "best.pt")]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert result["examples"] == 360
    assert result["accuracy"] == pytest.approx(summary["best_val_acc"])

    deployed_dir = tmp_path / "deployed"
    assert main(["deploy", str(out / "best.pt"), "--out", str(deployed_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_deployed"] < report["params"]  # DO-Conv folds into plain convs
    assert report["max_rel_error"] < 1e-4
    rebuilt = load_deployed(deployed_dir)
    assert not any(isinstance(m, DOConv2d) for m in rebuilt.modules())
    assert main(["eval", str(deployed_dir)]) == 0  # rebuilt from config.yaml + safetensors
    deployed_result = json.loads(capsys.readouterr().out)
    assert deployed_result["accuracy"] == pytest.approx(result["accuracy"], abs=1 / 360)
    assert main(["eval", "--unsafe-load-pt2", str(deployed_dir / "deployed.pt2")]) == 0

    # A deploy folder whose deployed tensors do not match today's layout (another version's
    # deployment, or an edited file): one clear error that says what to do, not a torch error.
    from safetensors.torch import load_file as read_tensors
    from safetensors.torch import save_file

    tensors = read_tensors(deployed_dir / "deployed.safetensors")
    stale = tmp_path / "stale"
    shutil.copytree(deployed_dir, stale)
    renamed = {f"old_layout.{key}": value for key, value in tensors.items()}
    save_file(renamed, stale / "deployed.safetensors")
    with pytest.raises(CheckpointError, match="deploy the trained weights again"):
        load_deployed(stale)
    program_result = json.loads(capsys.readouterr().out)
    assert program_result["accuracy"] == pytest.approx(result["accuracy"], abs=1 / 360)

    assert main(["profile", str(out / "model.safetensors"), "--batch", "2"]) == 0
    table = capsys.readouterr().out
    assert "DOConv2d" in table and "MACs" in table

    export_dir = tmp_path / "exported"
    assert main(["export", str(out / "best.pt"), "--out", str(export_dir)]) == 0
    exported = json.loads((export_dir / "export.json").read_text())
    assert (export_dir / "model.onnx").is_file() and (export_dir / "model.pt2").is_file()
    assert exported["max_rel_error_onnxruntime"] < 1e-4


def test_torchvision_model_with_convert(tmp_path):
    out = tmp_path / "tv"
    code = main(
        [
            "train",
            "--model",
            "resnet18",
            "--convert",
            "doconv",
            "--dataset",
            "digits",
            "--max-iters",
            "2",
            "--out",
            str(out),
            "--set",
            "data.channels=3",
            "--set",
            "data.val_subset=32",
            "--set",
            "train.plots=false",
            "--set",
            "train.tensorboard=false",
        ]
    )
    assert code == 0
    assert load_checkpoint(out / "last.pt")["state"]["iteration"] == 2


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((digits_run / "last.pt").read_bytes())
    good = (run / "last.pt").read_bytes()
    code = main(
        [
            "train",
            "--resume",
            str(run / "last.pt"),
            "--epochs",
            "3",
            "--out",
            str(run),
            "--set",
            "optim.lr=1.0e+30",
            "--set",
            "optim.warmup_epochs=0",
        ]
    )
    assert code == 3
    assert "stopped" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == good
    assert not list(run.glob(".*.tmp"))


def test_truncated_checkpoint_is_a_clear_cli_error(digits_run, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    data = (digits_run / "last.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    assert main(["eval", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.pt" in err and "truncated" in err and "Traceback" not in err
    assert main(["train", "--resume", str(broken)]) == 2


def _resume_args(out: Path) -> list[str]:
    return [
        "train",
        "--recipe",
        "digits-small",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--convert",
        "doconv",
        "--ema",
        "0.8",
        "--deterministic",
        "--checkpoint-every",
        "3",
        "--set",
        "data.train_subset=640",
        "--set",
        "model.kwargs.width=8",
        "--set",
        "data.augment=[random_crop]",
        "--set",
        "data.crop_padding=1",
        "--set",
        "train.plots=false",
        "--set",
        "train.tensorboard=false",
    ]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dynaconv", *_resume_args(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while not (killed / "last.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    state = load_checkpoint(killed / "last.pt")["state"]
    assert 0 < state["batches_done"] < 640 // 32, "the kill must land mid-epoch"
    assert state["iteration"] < 2 * (640 // 32)

    # The killed process ran on one thread; so must these runs, since float sums done on a
    # different number of threads round differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", str(killed / "last.pt")]) == 0
        uninterrupted = tmp_path / "uninterrupted"
        assert main(_resume_args(uninterrupted)) == 0
    finally:
        torch.set_num_threads(threads)

    resumed_ckpt = load_checkpoint(killed / "last.pt")
    straight_ckpt = load_checkpoint(uninterrupted / "last.pt")
    assert resumed_ckpt["state"]["iteration"] == straight_ckpt["state"]["iteration"]
    for part in ("model", "ema"):
        for key, value in straight_ckpt[part].items():
            assert torch.equal(resumed_ckpt[part][key], value), (part, key)
    for key in ("history",):
        rows_a = [
            {k: v for k, v in r.items() if k != "elapsed_s"} for r in resumed_ckpt["state"][key]
        ]
        rows_b = [
            {k: v for k, v in r.items() if k != "elapsed_s"} for r in straight_ckpt["state"][key]
        ]
        assert rows_a == rows_b


def test_profile_of_a_recipe_at_a_progress(capsys):
    assert (
        main(["profile", "--recipe", "digits-small", "--convert", "lgc", "--progress", "1.0"]) == 0
    )
    condensed = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["profile", "--recipe", "digits-small", "--convert", "lgc"]) == 0
    dense = capsys.readouterr().out.strip().splitlines()[-1]
    active = [
        int(line.split("active ")[1].rstrip(")").replace(",", "")) for line in (condensed, dense)
    ]
    assert active[0] < active[1]  # condensed layers compute fewer MACs
    with pytest.raises(SystemExit):
        main(["profile", "--recipe", "digits-small", "--progress", "2"])
    assert "progress must be a number in [0, 1]" in capsys.readouterr().err


def test_a_quiet_trainer_prints_nothing_and_keeps_the_conversion_report(tmp_path, capsys):
    """``Trainer(verbose=False)`` (the demo's) prints no epoch line and no summary."""
    from dynaconv.train.config import resolve_config
    from dynaconv.train.engine import Trainer

    flags = {
        "model.kwargs": {"width": 8},
        "model.convert": {"method": "doconv"},
        "train.max_iters": 3,
        "train.out_dir": str(tmp_path / "run"),
        "train.progress_bar": "none",
        "train.tensorboard": False,
        "train.plots": False,
    }
    trainer = Trainer(resolve_config(None, flags), verbose=False)
    summary = trainer.fit()
    assert summary["iterations"] == 3 and 0.0 <= summary["final_val_acc"] <= 1.0
    captured = capsys.readouterr()
    assert captured.out == "" and "epoch" not in captured.err
    report = trainer.conversion_report
    assert report is not None and len(report.converted) == 6 and report.skipped == {}
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_finished_run_has_its_schedules_at_progress_one(tmp_path):
    """After the last iteration the schedules are at iterations done / total = 1.0, so the
    saved and deployed model has its final structure even when training is short."""
    from dynaconv.cli import main
    from dynaconv.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    argv = ["train", "--recipe", "digits-small", "--max-iters", "2", "--out", str(out)]
    argv += ["--set", "model.convert={method: dgc, options: {heads: 2, gate_factor: 0.5}}"]
    argv += ["--set", "train.plots=false", "--set", "train.tensorboard=false"]
    assert main(argv) == 0
    model = load_checkpoint(out / "last.pt")["model"]
    weights = {k[: -len("fc1_weight")]: v for k, v in model.items() if k.endswith(".fc1_weight")}
    counts = {k: int(model[f"{k}inactive_channels"]) for k in weights}
    # DGC's schedule ends at p >= 3/4; two iterations reach p = 1/2 before the last step.
    assert counts and all(
        count == round(weights[k].shape[-1] * 0.5) for k, count in counts.items()
    ), counts
