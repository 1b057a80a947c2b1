"""README.md, executed: every Python block and every command line of its shell blocks.

The blocks are read from README.md itself and run in a temporary folder (never in the
checkout), offline, as a new user would run them, with exactly these documented changes:

* :data:`SUPPLIED`: names a block uses but leaves to the reader (the API tour's ``loader``,
  ``criterion`` and ``total_steps``; the checkpoint tour's ``state`` and TensorFlow ``reader``)
  are put into the block's namespace beforehand; the files a block opens are created in the
  temporary folder (a reference CondenseNet-86 checkpoint and the DGC layer's state, from the
  reference fixtures).
* :data:`SUBSTITUTIONS`: exact pieces of README text replaced before running (each must occur
  in README.md, so a substitution never goes stale silently): downloads become offline
  builds, data folders become small synthetic datasets of the same layout.
* :data:`SMALL`: flags appended to every ``dynaconv train`` command that starts a run, so it
  runs one iteration on a handful of examples (the README's own flags are kept and run first).
* ``NAME`` in ``runs/NAME/...`` is the run folder that the README's second ``train`` command
  created (its default name, ``resnet18-doconv-<time>``).
* :data:`EXCLUDED`: the lines not run here, each with the reason.
* :data:`NEEDS_EXTRA`: lines that need an optional extra; without it they must fail as a
  missing extra is documented to (exit status 2, one line naming the extra).

A README block or line that none of these accounts for fails the test, so new examples are
executed too.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynaconv
from conftest import load_fixture
from dynaconv.cli import build_parser, main
from dynaconv.train.extras import missing_modules

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: README lines that are not run, and why.
EXCLUDED: dict[str, str] = {
    "make demo": "creates the project's virtual environment; it runs `python -m dynaconv demo`, "
    "executed by tests/test_demo.py",
    "make test": "runs this test suite (and lint) itself",
}

#: README command lines that need an optional extra beyond the test extras -> that extra.
#: Where the extra is installed the line runs like any other; where it is not, the line must
#: fail exactly as documented for a missing extra: exit status 2 and one line naming it.
NEEDS_EXTRA: dict[str, str] = {
    "dynaconv export runs/NAME/best.pt --out mobile/ --format pte": "edge",
}

#: Exact README text -> what runs instead (offline, small data of the same layout).
SUBSTITUTIONS: dict[str, str] = {
    'timm.create_model("tf_efficientnet_cc_b0_8e", pretrained=True)': (
        'timm.create_model("tf_efficientnet_cc_b0_8e", pretrained=False)'  # no download
    ),
    "--nproc-per-node 8": "--nproc-per-node 2",  # two CPU processes
    "--data-dir /data/imagenet": "--data-dir {tmp}/imagenet",
    "--data-dir /usr/share/datasets/fashion-mnist": "--data-dir {tmp}/fashion-mnist",
    "--data-dir ~/data/cifar": "--data-dir {tmp}/cifar",
}

#: Appended to every ``dynaconv train`` command that starts a run (not to ``--resume``).
SMALL = (
    "--max-iters 1 --batch-size 4 --device cpu --set data.train_subset=8 "
    "--set data.val_subset=4 --set data.eval_batch_size=4 --set data.workers=0 "
    "--set data.image_size=32 --set train.progress_bar=none "
    # The plots and TensorBoard logs are tested in tests/test_train_plots.py; here they would
    # take most of the time.
    "--set train.plots=false --set train.tensorboard=false"
)


def _blocks(language: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _substitute(text: str, tmp: Path) -> str:
    for old, new in SUBSTITUTIONS.items():
        text = text.replace(old, new.format(tmp=tmp))
    return text


def test_every_substitution_and_exclusion_is_in_the_readme():
    text = README.read_text()
    for old in [*SUBSTITUTIONS, *EXCLUDED, *NEEDS_EXTRA]:
        assert old in text, f"README.md no longer contains {old!r}: update tests/test_readme.py"


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(_blocks("python")) == 2, "a Python block was added or removed: run it here too"
    assert len(_blocks("bash")) == 2


# --------------------------------------------------------------------------------------------
# Python blocks


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _run_block(code: str, namespace: dict) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    namespace["_printed"] = printed.getvalue()
    return namespace


def test_api_tour_block_runs(in_tmp):
    """The API tour, with a two-batch ``loader`` of CIFAR-sized images (SUPPLIED)."""
    (code,) = [b for b in _blocks("python") if "dynaconv.convert(" in b]
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,)))
        for _ in range(2)
    ]
    namespace = _run_block(
        _substitute(code, in_tmp),
        {"loader": batches, "criterion": nn.CrossEntropyLoss(), "total_steps": len(batches)},
    )
    assert "doconv" in namespace["_printed"] and "MACs" in namespace["_printed"]
    assert torch.isfinite(namespace["loss"])
    assert not any(isinstance(m, dynaconv.DOConv2d) for m in namespace["fast"].modules())
    assert any(isinstance(m, dynaconv.DOConv2d) for m in namespace["model"].modules())
    assert not any(in_tmp.iterdir()), "the API tour writes no file"


class _TensorFlowReader:
    """A stand-in for ``tf.train.load_checkpoint(...)`` (SUPPLIED): CondConv variables of a
    3x3, 32 -> 16 layer with 4 experts, in TensorFlow's layout."""

    def get_tensor(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(0)
        if name.endswith("condconv_kernel"):
            return rng.standard_normal((4, 3 * 3 * 32 * 16)).astype(np.float32)
        if name.endswith("condconv_bias"):
            return rng.standard_normal((4, 16)).astype(np.float32)
        raise KeyError(name)


def test_checkpoint_block_runs(in_tmp):
    """Loading the papers' checkpoints: the files and names the block expects are SUPPLIED."""
    (code,) = [b for b in _blocks("python") if "from dynaconv import compat" in b]
    condensenet = load_fixture("condensenet", "condensenet86_cifar10.pt")
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in condensenet["initial_state_dict"].items()},
            "args": condensenet["config"],
            "epoch": 0,
        },
        in_tmp / "condensenet86_cifar10.pth.tar",
    )
    dgc = load_fixture("dgc", "layer_public.pt")
    namespace = _run_block(
        _substitute(code, in_tmp), {"state": dgc["state_dict"], "reader": _TensorFlowReader()}
    )
    assert isinstance(namespace["model"], dynaconv.models.CondenseNet)
    layer = namespace["layer"]  # the reference layer: its BN-ReLU, then the DGC layer
    assert isinstance(layer.conv, dynaconv.DynamicGroupConv2d)
    assert isinstance(namespace["net"], dynaconv.models.EfficientNetCondConv)
    conv = namespace["conv"]
    assert isinstance(conv, dynaconv.CondConv2d) and conv.out_channels == 16
    x = torch.randn(2, 32, 9, 9)
    assert conv(x, routing_weights=torch.rand(2, 4)).shape == (2, 16, 5, 5)


# --------------------------------------------------------------------------------------------
# command lines


def _write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, 8).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (8,)))


def _write_imagenet(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for label in ("n01", "n02"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(4):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.JPEG", format="JPEG")


@pytest.fixture
def datasets(in_tmp, monkeypatch) -> Path:
    """Synthetic CIFAR-10, Fashion-MNIST and ImageNet folders in the README's layouts."""
    import torchvision.datasets.cifar as cifar

    _write_cifar10(in_tmp / "cifar")
    _write_fashion_mnist(in_tmp / "fashion-mnist")
    _write_imagenet(in_tmp / "imagenet")
    # torchvision checks the files' MD5 against the real CIFAR-10's: synthetic files differ.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    return in_tmp


def _command_lines() -> list[str]:
    return [
        line.split("#")[0].strip()
        for block in _blocks("bash")
        for line in block.splitlines()
        if line.split("#")[0].strip()
    ]


def _argv(line: str, tmp: Path, run_name: str | None) -> list[str]:
    text = _substitute(line, tmp)
    if run_name is not None:
        text = text.replace("runs/NAME", f"runs/{run_name}")
    argv = [os.path.expanduser(arg) for arg in shlex.split(text)]
    if "train" in argv and "--resume" not in argv:
        argv += shlex.split(SMALL)
    return argv


def _is_torchrun(line: str) -> bool:
    return line.startswith("torchrun ")


def test_readme_command_lines_parse_and_resolve(datasets, capsys):
    """The fast check: every ``dynaconv`` line parses, and every ``train`` line's configuration
    resolves (``--print-config``). The slow test below runs them."""
    parser = build_parser()
    for line in _command_lines():
        if line in EXCLUDED:
            continue
        argv = _argv(line, datasets, "NAME")
        argv = argv[argv.index("dynaconv") + 1 :]  # also after "torchrun ... -m"
        args = parser.parse_args(argv)
        if args.command == "train" and not args.resume:
            assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
            assert "model:" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_command_lines_run(datasets, capsys):
    """Every ``dynaconv`` line of the README, in order, in one temporary folder (about a
    minute on two cores: the trainings, deploy, ONNX export and profile of G-ResNeXt-50)."""
    runs = datasets / "runs"
    run_name = None
    ran = []
    for line in _command_lines():
        if line in EXCLUDED or _is_torchrun(line):
            continue
        assert line.startswith("dynaconv "), f"README command not handled here: {line!r}"
        argv = _argv(line, datasets, run_name)
        capsys.readouterr()
        code = main(argv[1:])
        out, err = capsys.readouterr()
        ran.append(line)
        if line in NEEDS_EXTRA and missing_modules(NEEDS_EXTRA[line]):
            assert code == 2 and not out, f"{line!r} without its extra: {code}, {out!r}"
            assert len(err.strip().splitlines()) == 1, err
            assert f"dynaconv[{NEEDS_EXTRA[line]}]" in err, err
            continue
        assert code == 0, f"{line!r} exited with {code}: {err.strip()[-2000:]}"
        if "--model resnet18" in line:  # the run that NAME stands for
            (folder,) = runs.glob("resnet18-doconv-*")
            run_name = folder.name
        if argv[1] == "export":
            summary = json.loads(out)  # stdout is the JSON summary, nothing else
            runtime = "executorch" if "--format pte" in line else "onnxruntime"
            assert summary[f"max_rel_error_{runtime}"] < 1e-4
        if argv[1] == "profile":
            assert "MACs" in out
    assert (datasets / "deployed" / "deployed.safetensors").is_file()
    assert (datasets / "exported" / "model.onnx").is_file()
    # The two --model runs got their own folders (no collision), named model-method-time.
    names = sorted(p.name for p in runs.iterdir())
    assert "condensenet86-cifar10" in names
    assert any(n.startswith("efficientnet_b0-condconv-") for n in names), names
    assert len(ran) == len(_command_lines()) - len(EXCLUDED) - 1  # the torchrun line below


@pytest.mark.slow
def test_readme_torchrun_line_runs(datasets):
    """The README's ``torchrun`` line, with two CPU processes on synthetic ImageNet."""
    (line,) = [line for line in _command_lines() if _is_torchrun(line)]
    argv = _argv(line, datasets, None)
    argv[0] = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        argv, cwd=datasets, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (datasets / "runs" / "dyresnet18-imagenet" / "last.pt").is_file()
