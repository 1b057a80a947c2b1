"""What a new user meets first: imports, run names, the command line's help and errors, missing
extras, exports that onnxruntime refuses, MACs of layers dynaconv does not know, the docs.

(README.md's own examples are executed by tests/test_readme.py.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaconv
from dynaconv.cli import build_parser, commands, main
from dynaconv.train import extras
from dynaconv.train.config import resolve_config
from dynaconv.train.engine import Trainer
from dynaconv.train.extras import EXTRAS
from dynaconv.train.runnames import claim_run_folder, default_run_name

ROOT = Path(__file__).resolve().parents[1]

#: Small, quick runs: a few iterations of the digits CNN, no plots or logs.
QUICK = [
    "--recipe",
    "digits-small",
    "--max-iters",
    "2",
    "--set",
    "model.kwargs.width=8",
    "--set",
    "train.plots=false",
    "--set",
    "train.tensorboard=false",
    "--set",
    "train.progress_bar=none",
]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a clean ``sys.modules``) with the checkout's ``src``."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --------------------------------------------------------------------------------------------
# 1. compat's submodules


def test_compat_timm_and_tensorflow_are_attributes_of_the_package(tmp_path):
    """``from dynaconv import compat; compat.timm...`` as the README writes it (fresh process:
    here another test may already have imported the submodules), without importing timm."""
    result = _python(
        """
        import sys
        from dynaconv import compat
        assert callable(compat.timm.model_from_timm), "compat.timm"
        assert callable(compat.tensorflow.condconv_from_tensorflow), "compat.tensorflow"
        assert "timm" not in sys.modules, "compat.timm must not need timm"
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# 2. run names


def test_default_run_name_is_model_method_time():
    config = resolve_config(None, {"model.name": "resnet18"}, ["model.convert.method=doconv"])
    assert config["name"] is None  # derived when the run starts
    when = 1_780_000_000.0
    name = default_run_name(config, when)
    assert name.startswith("resnet18-doconv-") and len(name.split("-")) == 4
    assert default_run_name(resolve_config(None), when).startswith("digits_cnn-")
    assert resolve_config("digits-small")["name"] == "digits-small"  # a recipe keeps its name


def test_claimed_run_folders_never_collide(tmp_path):
    first = claim_run_folder("net-20260101-120000", tmp_path)
    second = claim_run_folder("net-20260101-120000", tmp_path)
    third = claim_run_folder("net-20260101-120000", tmp_path)
    assert [p.name for p in (first, second, third)] == [
        "net-20260101-120000",
        "net-20260101-120000-2",
        "net-20260101-120000-3",
    ]


def test_two_model_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch, capsys):
    """The README's ``--model`` commands used to share ``runs/run``; the second was refused."""
    monkeypatch.chdir(tmp_path)
    frozen = 1_780_000_000.0
    monkeypatch.setattr("dynaconv.train.runnames.time.time", lambda: frozen)
    argv = ["train", *QUICK, "--set", "name=null", "--convert", "doconv"]
    assert main(argv) == 0
    assert main(argv) == 0, capsys.readouterr().err
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and folders[1] == folders[0] + "-2", folders
    assert folders[0].startswith("digits_cnn-doconv-")
    for folder in folders:
        stored = (tmp_path / "runs" / folder / "config.yaml").read_text()
        assert f"name: {folder}" in stored  # resuming finds the run's own folder
        assert (tmp_path / "runs" / folder / "last.pt").is_file()


def test_a_failed_run_leaves_no_folder_it_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")]
    assert main(argv) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not list((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------------------------
# 7. the command line explains itself


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_top_level_help_has_no_docstring_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert ":mod:" not in text and "``" not in text and ":func:" not in text
    for command in ("train", "eval", "deploy", "export", "profile", "demo"):
        assert command in text
    assert "exit status" in text


def test_every_option_of_every_command_has_help_and_every_command_a_description():
    for name, parser in _subparsers(build_parser()).items():
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_model_flag_says_which_names_it_takes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torchvision" in text and "timm" in text and "dynaconv.list_models()" in text


def test_profile_help_lists_only_profile_options(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = capsys.readouterr().out
    for training_only in ("--lr", "--epochs", "--ema", "--amp", "--resume", "--max-iters"):
        assert training_only not in text, training_only
    for option in ("--recipe", "--model", "--convert", "--convention", "--batch", "--progress"):
        assert option in text, option


def test_epoch_count_of_a_run_continued_past_its_first_max_iters(tmp_path):
    """A first run of 3 iterations ends epoch 1 early; resumed to 6, the display must count 2
    epochs ("epoch 2/2"), not the 1 that 6 iterations of a 56-iteration epoch would take."""
    config = resolve_config(
        "digits-small",
        {"train.max_iters": 6, "train.out_dir": str(tmp_path / "run")},
        ["train.plots=false", "train.tensorboard=false"],
    )
    trainer = Trainer(config, verbose=False)
    assert trainer.iters_per_epoch > 6
    assert trainer.epochs_of_run() == 1
    trainer.state.update(epoch=1, iteration=3, batches_done=0)  # as resumed after 3 iterations
    assert trainer.epochs_of_run() == 2
    trainer.state.update(epoch=1, iteration=4, batches_done=1)  # killed one step into epoch 2
    assert trainer.epochs_of_run() == 2


def test_readme_outputs_are_ignored_by_git(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "status"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    for path in ("deployed/model.onnx", "exported/model.onnx", "runs/x/last.pt"):
        result = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "-q", path], capture_output=True
        )
        assert result.returncode == 0, f"{path} is not ignored by git"


# --------------------------------------------------------------------------------------------
# 6. missing extras


def test_help_works_and_commands_name_the_missing_extra_on_a_core_only_install(tmp_path):
    """A core-only install: none of the extras' modules. ``--help`` works; ``train`` is one
    line and exit 2, and writes nothing."""
    absent = [name for names in EXTRAS.values() for name in names]
    result = _python(
        f"""
        import sys
        for name in {absent!r}:
            sys.modules[name] = None  # as if it were not installed
        from dynaconv.cli import main
        try:
            main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        try:
            main(["train", "--help"])
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        code = main(["train", "--model", "resnet18", "--out", {str(tmp_path / "run")!r}])
        sys.exit(code)
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "usage: dynaconv" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert 'pip install "dynaconv[train]"' in line and "yaml" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first_hour") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return out / "last.pt"


def test_export_without_the_export_extra_writes_nothing(checkpoint, tmp_path):
    result = _python(
        f"""
        import sys
        sys.modules["onnxscript"] = None  # as if "dynaconv[export]" were not installed
        from dynaconv.cli import main
        sys.exit(main(["export", {str(checkpoint)!r}, "--out", {str(tmp_path / "out")!r}]))
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert 'pip install "dynaconv[export]"' in line and "onnxscript" in line
    assert not (tmp_path / "out").exists()


def test_pte_export_without_the_edge_extra_writes_nothing(checkpoint, tmp_path):
    """``--format pte`` needs the ``edge`` extra (ExecuTorch), not the ``export`` extra."""
    result = _python(
        f"""
        import sys
        sys.modules["executorch"] = None  # as if "dynaconv[edge]" were not installed
        sys.modules["onnxscript"] = None  # the ONNX extra is not what pte needs
        from dynaconv.cli import main
        out = {str(tmp_path / "out")!r}
        sys.exit(main(["export", {str(checkpoint)!r}, "--out", out, "--format", "pte"]))
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert 'pip install "dynaconv[edge]"' in line and "executorch" in line
    assert "onnxscript" not in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 5. export checks the file it writes


def test_export_prints_only_json_and_keeps_checked_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout)  # nothing but the summary on stdout (| jq works)
    assert summary["max_rel_error_onnxruntime"] < 1e-4
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "export.json",
        "model.onnx",
        "model.pt2",
    ]


def test_export_refuses_an_onnx_file_onnxruntime_cannot_load(
    checkpoint, tmp_path, capsys, monkeypatch
):
    def broken_export(model, args, path, **kwargs):
        Path(path).write_bytes(b"\x08\x07not an ONNX model")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "onnxruntime" in line and "does not load or run" in line
    assert captured.out == ""
    assert not any(out.iterdir()), "no model file may be left as if it were good"


def test_export_refuses_an_onnx_file_whose_outputs_differ(checkpoint, tmp_path, monkeypatch):
    real = commands._run_onnx
    monkeypatch.setattr(commands, "_run_onnx", lambda path, batch: real(path, batch) * 1.01)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 4
    assert not any(out.iterdir())


def test_export_reports_an_exporter_failure_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\nmore lines")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "torch.onnx.export failed" in line
    assert not any(out.iterdir())


class _FakeExecuTorch:
    """ExecuTorch's lowering and runtime replaced (``write_pte``/``run_pte``), to check what
    ``export --format pte`` does around them where executorch is not installed: the program
    runs the exported model itself, scaled by ``factor`` (1: a faithful runtime)."""

    def __init__(self, monkeypatch, factor: float = 1.0, loads: bool = True) -> None:
        self.model: nn.Module | None = None
        self.factor, self.loads, self.written = factor, loads, []
        real_importable = extras._importable
        monkeypatch.setattr(
            extras, "_importable", lambda name: name == "executorch" or real_importable(name)
        )
        monkeypatch.setattr(commands, "write_pte", self.write)
        monkeypatch.setattr(commands, "run_pte", self.run)

    def write(self, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
        self.model = model
        self.written.append((Path(path), tuple(example.shape)))
        Path(path).write_bytes(b"a fake ExecuTorch program")
        return Path(path)

    def run(self, path: Path, x: torch.Tensor) -> torch.Tensor:
        if not self.loads:
            raise RuntimeError("InvalidProgram\nmore lines")
        with torch.no_grad():
            return self.model(x) * self.factor


def test_pte_export_stages_its_files_and_prints_only_json(
    checkpoint, tmp_path, capsys, monkeypatch
):
    fake = _FakeExecuTorch(monkeypatch)
    out = tmp_path / "mobile"
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "pte"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["batch"] == 1 and summary["max_rel_error_executorch"] < 1e-4
    assert "onnx" not in summary and summary["pte"] == str(out / "model.pte")
    ((written, shape),) = fake.written
    assert written.parent != out and shape[0] == 1  # staged, for the fixed batch of 1
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "export.json",
        "model.pt2",
        "model.pte",
    ]
    # a second export into the same folder needs --overwrite (trust: nothing replaced silently)
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "pte"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_pte_export_refuses_a_program_whose_outputs_differ(checkpoint, tmp_path, monkeypatch):
    _FakeExecuTorch(monkeypatch, factor=1.01)
    out = tmp_path / "mobile"
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "pte"]) == 4
    assert not any(out.iterdir()), "no model file may be left as if it were good"


def test_pte_export_refuses_a_program_the_runtime_cannot_load(
    checkpoint, tmp_path, capsys, monkeypatch
):
    _FakeExecuTorch(monkeypatch, loads=False)
    out = tmp_path / "mobile"
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "pte"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "ExecuTorch" in line and "does not load or run" in line and captured.out == ""
    assert not any(out.iterdir())


# --------------------------------------------------------------------------------------------
# 4. profile counts what it does not know


class _ScaledMatmul(nn.Module):
    """A layer dynaconv has no rule for: ``x @ W`` over the last dimension, then a scale."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features))
        self.scale = nn.Parameter(torch.ones(()))
        self.inner = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x @ self.weight) * self.scale


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def test_profile_counts_a_foreign_layer_by_the_flop_counter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(2), _ScaledMatmul(36)).eval()
    report = dynaconv.profile(model, (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert report["macs"] == report["macs_active"] == _flop_counter_macs(model, x)
    assert report.flop_counted == ["2"]
    (row,) = [r for r in report.layers if r.name == "2"]
    assert row.macs == 2 * 8 * 36 * 36 and row.params == 36 * 36 + 1  # own ops, own params
    assert "counted by torch.utils.flop_counter" in str(report) and "2" in str(report)


def test_profile_of_timm_condconv_efficientnet_equals_the_flop_counter():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False).eval()
    shape = (2, 3, 64, 64)
    report = dynaconv.profile(model, shape)
    expected = _flop_counter_macs(model, torch.randn(shape))
    assert report["macs"] == expected  # timm's CondConv2d used to count 0
    assert len(report.flop_counted) == 3 * 8  # conv_pw, conv_dw, conv_pwl of 8 blocks
    assert all(name.startswith("blocks.") for name in report.flop_counted)


# --------------------------------------------------------------------------------------------
# 8. counts are ints; the package installs without a deprecation warning


def test_reference_macs_are_ints_even_when_the_rules_give_fractions():
    """DGC's heads count at ``gate_factor`` in the reference convention: 818,819.2 MACs here."""
    layer = dynaconv.DynamicGroupConv2d(64, 64, 3, padding=1, heads=4, gate_factor=0.45)
    model = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), layer)
    shape = (1, 64, 7, 7)
    report = dynaconv.profile(model, shape, convention="reference", deployed=False)
    exact = dynaconv.profiling.own_count(layer, shape, shape, "reference").active
    assert exact != int(exact), "the example must produce a fraction"
    extra = 64 * 7 * 7  # the ReLU's ops in this convention
    assert report["macs_active"] == round(exact + extra)
    assert isinstance(report["macs_active"], int) and isinstance(report["macs"], int)
    assert all(isinstance(r.macs_active, int) for r in report.layers)
    assert "active" in str(report)


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # a table here is deprecated (setuptools 77)
    requires = project["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in requires), requires
