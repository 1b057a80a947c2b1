"""The training switches on a GPU: AMP (bf16, fp16 with GradScaler), channels_last, compile."""

from __future__ import annotations

import json

import pytest
import torch

from dynaconv.cli import main
from dynaconv.train.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "switches",
    [
        ["--amp", "bf16", "--channels-last"],
        ["--amp", "fp16", "--set", "optim.clip_grad_norm=1.0"],
        ["--compile", "--amp", "bf16"],
    ],
    ids=["bf16-channels-last", "fp16-scaler-clip", "compile-bf16"],
)
def test_digits_on_gpu_with_switches(tmp_path, switches, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--recipe",
        "digits-small",
        "--device",
        "cuda",
        "--convert",
        "doconv",
        "--epochs",
        "3",
        "--ema",
        "0.9",
        "--out",
        str(out),
        *switches,
    ]
    assert main(args) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_acc"] > 0.8
    checkpoint = load_checkpoint(out / "last.pt")
    if "fp16" in switches:
        assert checkpoint["scaler"] is not None and checkpoint["scaler"]["scale"] > 0
    assert main(["eval", str(out / "best.pt"), "--device", "cuda"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["best_val_acc"], abs=2 / 360)
    assert main(["export", str(out / "best.pt"), "--out", str(tmp_path / "export")]) == 0
