"""Training on the real Fashion-MNIST files of Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynaconv.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_few_hundred_steps_pass_an_accuracy_floor(tmp_path):
    out = tmp_path / "fashion"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(
            [
                "train",
                "--recipe",
                "fashion-mnist-small",
                "--data-dir",
                str(FASHION),
                "--out",
                str(out),
                "--max-iters",
                "300",
                "--lr",
                "0.01",
                # 14x14 inputs and a narrow network keep this to seconds on a CPU
                "--set",
                "data.image_size=14",
                "--set",
                "model.kwargs.width=16",
                "--set",
                "data.augment=[]",
                "--set",
                "data.val_subset=2000",
                "--set",
                "train.plots=false",
                "--set",
                "train.tensorboard=false",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 300
    # ten classes (chance 0.10); this run reaches about 0.78
    assert summary["final_val_acc"] >= 0.70
