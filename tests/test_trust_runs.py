"""Trust, second round: what a run, a resume, a deploy and an export may write and read.

* Resuming writes where the command line says (default: the checkpoint's own folder) and
  downloads only when the command line asks, whatever the checkpoint stores.
* A run folder is locked while its training runs: a second training (new, ``--resume``,
  ``--overwrite``) is one line and exit status 2; a dead holder's lock is reclaimed.
* ``deploy`` / ``export`` never write through symbolic links nor replace a file without
  ``--overwrite``.
* Bad option values are one line and exit status 2, and a run that fails before its first
  checkpoint leaves no folder that blocks a rerun.
* Checkpoints and safetensors carry the digest of every tensor; changed bytes are refused
  naming the file; nothing non-finite is resumed, written as final weights or printed as JSON.
* The EMA's structure is the model's at every iteration, whatever ``train.ema_every``.
* The smaller things: metrics.csv with CRLF rows, a conversion of no layer, a symlinked
  ``tensorboard/`` with ``--overwrite``, ``max_iters``, file modes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import dynaconv
from conftest import TINY_RUN
from dynaconv.cli import main
from dynaconv.layers import DynamicGroupConv2d
from dynaconv.train import engine
from dynaconv.train.checkpoint import atomic_save, load_checkpoint
from dynaconv.train.config import resolve_config
from dynaconv.train.ema import structural_buffer_names, structural_parameter_names
from dynaconv.train.factory import learning_rate
from dynaconv.train.runfolder import LOCK_NAME, RunLock

SMALL = [
    *TINY_RUN,
    "--set",
    "train.progress_bar=none",
]


def _train(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--recipe",
        "digits-small",
        "--max-iters",
        "2",
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


def _refused(argv: list[str], capsys, names: str, code: int = 2) -> str:
    """``argv`` exits ``code`` with one line on stderr naming ``names``."""
    result = main(argv)
    err = capsys.readouterr().err
    assert result == code, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert names in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run (digits, 2 iterations, EMA)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train(out, "--ema", "0.5")) == 0
    return out


def _copy_run(run: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for item in run.iterdir():
        if item.is_file():
            (to / item.name).write_bytes(item.read_bytes())
    return to


def _doctor(path: Path, change) -> None:
    """Change the checkpoint at ``path`` with ``change(payload)`` and write it with fresh
    digests (a checkpoint that is *valid* but says something else)."""
    payload = load_checkpoint(path)
    change(payload)
    atomic_save(payload, path)


def _doctor_config(path: Path, **values) -> None:
    def change(payload):
        config = yaml.safe_load(payload["config"])
        for dotted, value in values.items():
            section, key = dotted.split("__")
            config[section][key] = value
        payload["config"] = yaml.safe_dump(config, sort_keys=False)

    _doctor(path, change)


# --------------------------------------------------------------------------------------------
# 3. resume: the command line decides where to write and whether to download


def test_resume_writes_into_the_checkpoint_folder_not_a_stored_out_dir(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    _doctor_config(folder / "last.pt", train__out_dir=str(elsewhere))
    assert main(["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"]) == 0
    capsys.readouterr()
    assert not elsewhere.exists()
    assert load_checkpoint(folder / "last.pt")["state"]["iteration"] == 4
    # --out on the command line is where a resume writes (an empty folder)
    chosen = tmp_path / "chosen"
    argv = ["train", "--resume", str(folder / "last.pt"), "--max-iters", "6", "--out", str(chosen)]
    assert main(argv) == 0
    capsys.readouterr()
    assert load_checkpoint(chosen / "last.pt")["state"]["iteration"] == 6
    assert not elsewhere.exists()


def test_a_stored_download_is_not_followed(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    target = tmp_path / "download-here"
    _doctor_config(
        folder / "last.pt",
        data__dataset="fashion_mnist",
        data__dir=str(target),
        data__download=True,
    )
    _refused(["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"], capsys, "fashion")
    _refused(["eval", str(folder / "last.pt")], capsys, "fashion")
    assert not target.exists()


# --------------------------------------------------------------------------------------------
# 4. one training per run folder


def test_a_locked_run_folder_refuses_every_other_training(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    lock = RunLock(folder).acquire()
    try:
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        for argv in (
            _train(folder),
            _train(folder, "--overwrite"),
            ["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"],
        ):
            _refused(argv, capsys, f"in use by a running training (pid {os.getpid()}")
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = RunLock(fresh).acquire()
        _refused(_train(fresh), capsys, "in use")
        other.release()
    finally:
        lock.release()
    assert load_checkpoint(folder / "last.pt")["state"]["iteration"] == 2  # untouched
    assert main(["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"]) == 0
    assert not (folder / LOCK_NAME).exists()  # released at the end


def test_a_dead_holders_lock_is_reclaimed(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / LOCK_NAME).write_text(dead.stdout)
    assert main(_train(out)) == 0
    capsys.readouterr()
    assert not (out / LOCK_NAME).exists()


def test_two_concurrent_trainings_on_one_folder(tmp_path):
    """Started together, one run wins and the folder holds that run alone."""
    out = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(Path(dynaconv.__file__).parents[1])}
    argv = [sys.executable, "-m", "dynaconv", *_train(out, "--max-iters", "30")]
    runs = [
        subprocess.Popen([*argv, "--seed", str(seed)], env=env, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    results = [(process.wait(timeout=600), process.stderr.read()) for process in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and ("in use" in loser or "already holds" in loser)
    winner = 1 + [code for code, _ in results].index(0)
    stored = yaml.safe_load(load_checkpoint(out / "last.pt")["config"])
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["train"]["seed"] == written["train"]["seed"] == winner
    assert not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------
# 5. deploy / export outputs


@pytest.mark.parametrize("command", ["deploy", "export"])
def test_outputs_are_never_written_through_links_or_over_files(run, tmp_path, capsys, command):
    victim = tmp_path / "victim.yaml"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    argv = [command, str(run / "best.pt"), "--out", str(out)]
    _refused(argv, capsys, "symbolic link")
    _refused([*argv, "--overwrite"], capsys, "symbolic link")
    assert victim.read_text() == "precious\n"
    linked = tmp_path / "linked-out"
    linked.symlink_to(out, target_is_directory=True)
    _refused([command, str(run / "best.pt"), "--out", str(linked)], capsys, "symbolic link")
    # an existing output is replaced only with --overwrite
    (out / "config.yaml").unlink()
    clean = tmp_path / "clean"
    assert main([command, str(run / "best.pt"), "--out", str(clean)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in clean.iterdir()}
    _refused([command, str(run / "best.pt"), "--out", str(clean)], capsys, "--overwrite")
    assert {p.name: p.read_bytes() for p in clean.iterdir()} == before
    assert main([command, str(run / "best.pt"), "--out", str(clean), "--overwrite"]) == 0
    capsys.readouterr()
    assert not [p for p in clean.iterdir() if p.name.endswith(".tmp")]


def test_deploy_into_a_run_folder_keeps_its_config(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    config = (folder / "config.yaml").read_bytes()
    _refused(["deploy", str(folder / "best.pt"), "--out", str(folder)], capsys, "config.yaml")
    assert (folder / "config.yaml").read_bytes() == config


# --------------------------------------------------------------------------------------------
# 6. bad values: one line, exit 2, no folder left behind


BAD_VALUES = [
    (["--convert", "lgc", "--convert-opt", "learned_groups=0"], "learned_groups"),
    (["--convert", "lgc", "--convert-opt", "condense_factor=0"], "condense_factor"),
    (["--convert", "lgc", "--convert-opt", 'learned_groups="4"'], "learned_groups"),
    (["--convert", "dgc", "--convert-opt", "heads=0"], "heads"),
    (["--set", "model.kwargs.width=0"], "width"),
    (["--set", "model.kwargs.width=-5"], "width"),
    (["--set", "model.kwargs.width=abc"], "width"),
    (["--set", "model.kwargs.num_classes=3"], "num_classes"),
]


@pytest.mark.parametrize(("extra", "names"), BAD_VALUES)
def test_bad_values_are_one_line_and_leave_no_folder(tmp_path, capsys, extra, names):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "digits-small", "--max-iters", "2", "--out", str(out), *SMALL[2:]]
    err = _refused([*argv, *extra], capsys, names)
    assert "%" not in err and len(err) < 500
    assert not out.exists()


def test_a_run_failing_in_its_first_epoch_leaves_no_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def failing(self, images, labels):
        raise RuntimeError("a failure inside the first step")

    with monkeypatch.context() as patch:
        patch.setattr(engine.Trainer, "_step", failing)
        with pytest.raises(RuntimeError, match="first step"):
            main(_train(out, "--set", "train.tensorboard=true"))
    assert not out.exists()
    assert main(_train(out)) == 0  # the rerun is not refused
    capsys.readouterr()


def test_a_failure_in_an_existing_folder_removes_only_what_the_run_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(_train(out, "--set", "model.kwargs.width=0"), capsys, "width")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("method", "options", "names"),
    [
        ("lgc", {"learned_groups": 0}, "learned_groups"),
        ("lgc", {"condense_factor": 0}, "condense_factor"),
        ("lgc", {"learned_groups": "4"}, "learned_groups"),
        ("dgc", {"heads": 0}, "heads"),
        ("dgc", {"heads": "2"}, "heads"),
    ],
)
def test_convert_validates_options_before_arithmetic(method, options, names):
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1))
    with pytest.raises(ValueError, match=names):
        dynaconv.convert(model, method, **options)


def test_convert_of_no_module_and_dgc_inputs_smaller_than_the_kernel():
    for model in (None, 3):
        with pytest.raises(ValueError, match=r"model must be an nn\.Module"):
            dynaconv.convert(model, "lgc")
    layer = DynamicGroupConv2d(8, 8, 3, heads=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(2, 8, 2, 2))
    assert layer(torch.randn(2, 8, 3, 3)).shape == (2, 8, 1, 1)


# --------------------------------------------------------------------------------------------
# 7. integrity and finiteness


def test_changed_tensor_bytes_are_refused_naming_the_file(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    payload = torch.load(folder / "best.pt", weights_only=True)
    key = next(iter(payload["model"]))
    raw = (folder / "best.pt").read_bytes()
    weight = payload["model"][key].contiguous().numpy().tobytes()
    assert raw.count(weight) == 1
    flipped = bytearray(weight)
    flipped[0] ^= 0x40
    (folder / "best.pt").write_bytes(raw.replace(weight, bytes(flipped)))
    err = _refused(["eval", str(folder / "best.pt")], capsys, "best.pt")
    assert "digest" in err and key in err
    # rewritten with torch.save after a change: the stored digests no longer match
    payload["model"][key] = payload["model"][key] + 1
    torch.save(payload, folder / "last.pt")
    for argv in (
        ["eval", str(folder / "last.pt")],
        ["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"],
    ):
        _refused(argv, capsys, "last.pt")


def test_changed_safetensors_are_refused(run, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(run / "model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata)
    err = _refused(["eval", str(tmp_path / "model.safetensors")], capsys, "model.safetensors")
    assert key in err


def test_nan_weights_print_json_without_nan(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")

    def poison(payload):
        for state in (payload["model"], payload["ema"]):
            weight = next(v for v in state.values() if v.is_floating_point())
            weight.fill_(float("nan"))

    _doctor(folder / "best.pt", poison)
    assert main(["eval", str(folder / "best.pt")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert result["loss"] is None


def test_resuming_a_finished_run_with_a_nan_ema_writes_nothing(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")

    def poison(payload):
        weight = next(v for v in payload["ema"].values() if v.is_floating_point())
        weight.view(-1)[0] = float("nan")

    _doctor(folder / "last.pt", poison)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    err = _refused(["train", "--resume", str(folder / "last.pt")], capsys, "NaN", code=3)
    assert "ema." in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    for name in ("model.safetensors", "best.safetensors"):
        assert all(t.isfinite().all() for t in load_file(str(folder / name)).values())


def test_final_weights_are_checked_for_finiteness(tmp_path, capsys, monkeypatch):
    """A model that becomes non-finite after the last checkpoint never reaches model.safetensors."""
    finish = engine.Trainer._finish

    def poisoned(self):
        with torch.no_grad():
            next(self.eval_model().parameters()).view(-1)[0] = float("inf")
        return finish(self)

    monkeypatch.setattr(engine.Trainer, "_finish", poisoned)
    out = tmp_path / "run"
    assert main(_train(out)) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "NaN or infinite" in err.strip().splitlines()[-1]
    assert not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------
# 8. EMA structure with ema_every > 1


@pytest.mark.parametrize(
    ("method", "options"),
    [("lgc", {"learned_groups": 2, "condense_factor": 4}), ("dgc", {"heads": 2})],
)
def test_ema_structure_is_the_models_at_every_iteration(tmp_path, monkeypatch, method, options):
    config = resolve_config(
        None,
        {
            "model.kwargs": {"width": 8},
            "model.convert": {"method": method, "options": options},
            "data.train_subset": 320,
            "data.val_subset": 32,
            "train.epochs": 1,
            "train.ema_decay": 0.9,
            "train.ema_every": 4,
            "train.out_dir": str(tmp_path / "run"),
            "train.progress_bar": "none",
            "train.tensorboard": False,
            "train.plots": False,
        },
    )
    step = engine.Trainer._step
    lags: list[str] = []

    def checked(self, images, labels):
        result = step(self, images, labels)
        model = dict(self.model.named_buffers()) | dict(self.model.named_parameters())
        ema = dict(self.ema.module.named_buffers()) | dict(self.ema.module.named_parameters())
        names = structural_buffer_names(self.model) | structural_parameter_names(self.model)
        lags.extend(
            f"{self.state['iteration']}:{name}"
            for name in names
            if not torch.equal(model[name], ema[name])
        )
        structures = [
            (a.structure(), b.structure())
            for a, b in zip(self.model.modules(), self.ema.module.modules(), strict=True)
            if hasattr(a, "structure") and isinstance(a, dynaconv.layers.DynaConv2d)
        ]
        lags.extend(f"{self.state['iteration']}:{a}!={b}" for a, b in structures if a != b)
        return result

    monkeypatch.setattr(engine.Trainer, "_step", checked)
    trainer = engine.Trainer(config, verbose=False)
    trainer.fit()
    assert trainer.state["iteration"] == 5 and trainer.config["train"]["ema_every"] == 4
    assert lags == []


# --------------------------------------------------------------------------------------------
# 9. the smaller things


def test_resume_restores_nothing_from_an_intact_folder(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    assert b"\r\n" in (folder / "metrics.csv").read_bytes()  # csv rows end in CRLF
    assert main(["train", "--resume", str(folder / "last.pt"), "--max-iters", "4"]) == 0
    assert "restored" not in capsys.readouterr().err
    assert main(["train", "--resume", str(folder / "last.pt"), "--max-iters", "6"]) == 0
    assert "restored" not in capsys.readouterr().err


def test_a_conversion_of_no_layer_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train(out, "--convert", "lgc", "--set", "model.convert.include=nothing*")
    _refused(argv, capsys, "no layer")
    assert not out.exists()


def test_overwrite_with_a_symlinked_tensorboard_deletes_nothing(run, tmp_path, capsys):
    folder = _copy_run(run, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (folder / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in folder.iterdir())
    _refused(_train(folder, "--overwrite"), capsys, "symbolic link")
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert load_checkpoint(folder / "last.pt")["state"]["iteration"] == 2


def test_max_iters_is_the_length_of_the_schedules(tmp_path, capsys):
    """``train.max_iters`` shorter than the epochs: the run is max_iters iterations long and
    its schedules span exactly them (config.py's TrainConfig.max_iters); a resume that changes the
    length says so."""
    out = tmp_path / "run"
    assert (
        main(_train(out, "--epochs", "10", "--max-iters", "3", "--set", "optim.min_lr=0.01")) == 0
    )
    capsys.readouterr()
    payload = load_checkpoint(out / "last.pt")
    config = yaml.safe_load(payload["config"])
    state = payload["state"]
    assert state["iteration"] == 3 and state["total_iters"] == 3
    per_epoch = 64 // config["data"]["batch_size"]
    expected = learning_rate(config["optim"], 2, 3, per_epoch)  # the last step's: t = 2 of 3
    assert state["history"][-1]["lr"] == pytest.approx(expected)
    assert main(["train", "--resume", str(out / "last.pt"), "--max-iters", "5"]) == 0
    err = capsys.readouterr().err
    assert "written by a run of 3 iterations, this one has 5" in err
    assert load_checkpoint(out / "last.pt")["state"]["total_iters"] == 5


def test_safetensors_files_have_the_mode_of_the_checkpoints(run):
    mode = stat.S_IMODE((run / "last.pt").stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    for name in ("model.safetensors", "best.safetensors", "summary.json", "config.yaml"):
        assert stat.S_IMODE((run / name).stat().st_mode) == mode, name


def test_a_network_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    from dynaconv.train.config import ConfigError

    config = resolve_config(
        None,
        {"train.out_dir": str(tmp_path / "run"), "train.tensorboard": False, "train.plots": False},
    )

    def three_logits(num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))

    with pytest.raises(ConfigError, match="gives 3 logits but the data has 10 classes"):
        engine.Trainer(config, network=three_logits, verbose=False)

    def wrong_input(num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, num_classes))

    with pytest.raises(ConfigError, match=r"does not run on the data's input \(1, 8, 8\)"):
        engine.Trainer(config, network=wrong_input, verbose=False)
    assert not (tmp_path / "run").exists()
