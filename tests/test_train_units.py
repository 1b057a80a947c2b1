"""Training system units: schedule, EMA, checkpoints, data errors (the configuration:
``tests/test_config.py``)."""

from __future__ import annotations

import gzip
import itertools
import math
import random
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dynaconv.cli import main
from dynaconv.layers._base import DynaConv2d
from dynaconv.train.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from dynaconv.train.config import (
    DEFAULTS,
    ConfigError,
    resolve_config,
)
from dynaconv.train.data import DataError, build_datasets
from dynaconv.train.ema import ModelEMA, structural_buffer_names
from dynaconv.train.engine import learning_rate

# --------------------------------------------------------------------------------------------
# learning-rate schedule


def test_learning_rate_warmup_then_cosine():
    optim = {
        **DEFAULTS["optim"],
        "lr": 0.4,
        "min_lr": 0.01,
        "warmup_epochs": 2,
        "warmup_start": 0.1,
    }
    per_epoch, total = 10, 100
    lrs = [learning_rate(optim, t, total, per_epoch) for t in range(total)]
    assert lrs[0] == pytest.approx(0.04)
    assert lrs[10] == pytest.approx(0.04 + 0.36 * 10 / 20)
    assert lrs[20] == pytest.approx(0.4)  # first cosine iteration is the peak
    assert all(a < b for a, b in itertools.pairwise(lrs[:20]))
    assert all(a > b for a, b in itertools.pairwise(lrs[20:]))
    mid = 20 + 40
    assert lrs[mid] == pytest.approx(0.01 + 0.5 * 0.39 * (1 + math.cos(math.pi * 40 / 80)))
    constant = {**optim, "schedule": "constant", "warmup_epochs": 0}
    assert learning_rate(constant, 77, total, per_epoch) == 0.4


# --------------------------------------------------------------------------------------------
# EMA


class _MaskedConv(DynaConv2d):
    """A minimal dynaconv layer with a float mask buffer (structural by the layer rule)."""

    method = "test"

    def __init__(self) -> None:
        super().__init__(3, 4, 1)
        self.weight_raw = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.register_buffer("mask", torch.ones(4, 3))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.spec.conv2d(self.norm(x), self.weight_raw * self.mask[..., None, None], None)


class _Declared(nn.Module):
    structural_buffers = ("gate_state",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gate_state", torch.full((5,), 0.5))
        self.register_buffer("statistic", torch.zeros(5))


def test_ema_copies_structural_buffers_and_averages_the_rest():
    model = nn.Sequential(_MaskedConv(), _Declared())
    assert structural_buffer_names(model) == {
        "0.mask",
        "0.stage",
        "0.norm.num_batches_tracked",
        "1.gate_state",
    }
    ema = ModelEMA(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].mask[1:, :2] = 0.0
        model[0].stage.fill_(3)
        model[0].weight_raw.add_(1.0)
        model[0].norm.running_mean.fill_(2.0)
        model[0].norm.num_batches_tracked.fill_(9)
        model[1].gate_state.fill_(1.0)
        model[1].statistic.fill_(4.0)
    ema.update(model)
    state = ema.module.state_dict()
    for name in ("0.mask", "0.stage", "0.norm.num_batches_tracked", "1.gate_state"):
        assert torch.equal(state[name], model.state_dict()[name]), name
    torch.testing.assert_close(
        state["0.weight_raw"], 0.75 * before["0.weight_raw"] + 0.25 * model[0].weight_raw
    )
    torch.testing.assert_close(state["0.norm.running_mean"], torch.full((3,), 0.5))
    torch.testing.assert_close(state["1.statistic"], torch.full((5,), 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


# --------------------------------------------------------------------------------------------
# checkpoints


def _payload() -> dict:
    return {"format": FORMAT, "version": VERSION, "model": {"w": torch.arange(4.0)}}


def test_checkpoint_roundtrip_truncated_and_foreign(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save(_payload(), path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*truncated, corrupt"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a dynaconv training checkpoint"):
        load_checkpoint(foreign)

    code = tmp_path / "code.pt"
    torch.save({"format": FORMAT, "version": VERSION, "obj": _Declared()}, code)
    with pytest.raises(CheckpointError, match=r"code\.pt"):
        load_checkpoint(code)  # weights_only refuses to unpickle the module class

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    atomic_save({"format": FORMAT, "version": VERSION, "rng": capture_rng()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    restore_rng(load_checkpoint(path)["rng"])
    actual = (random.random(), np.random.rand(), torch.rand(2))
    assert actual[0] == expected[0] and actual[1] == expected[1]
    assert torch.equal(actual[2], expected[2])


# --------------------------------------------------------------------------------------------
# data errors


def test_missing_data_dir_names_path_and_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder (runs/NAME) is relative: never in the checkout
    missing = tmp_path / "nowhere"
    config = resolve_config(None, overrides=["data.dataset=fashion_mnist", f"data.dir={missing}"])
    with pytest.raises(DataError, match=r"nowhere.*train-images-idx3-ubyte\[\.gz\]"):
        build_datasets(config["data"], 0)
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(missing), "--epochs", "1"])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    config = resolve_config(None, overrides=["data.dataset=cifar10", f"data.dir={empty}"])
    with pytest.raises(DataError, match=r"empty.*data_batch_1"):
        build_datasets(config["data"], 0)
    config = resolve_config(None, overrides=["data.dataset=imagenet", f"data.dir={empty}"])
    with pytest.raises(DataError, match=r"empty/train does not exist.*ImageFolder"):
        build_datasets(config["data"], 0)
    config = resolve_config(None, overrides=["data.dataset=mnist"])
    with pytest.raises(DataError, match="--data-dir"):
        build_datasets(config["data"], 0)


def _write_idx(path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(data[: len(data) - truncate])


def test_idx_files_read_and_malformed_ones_rejected(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 28, 28))
    labels = rng.integers(0, 10, (6,))
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    config = resolve_config(None, overrides=["data.dataset=mnist", f"data.dir={tmp_path}"])
    train, _val, info = build_datasets(config["data"], 0)
    assert len(train) == 6 and info.image_size == 28
    image, label = train[2]
    assert image.shape == (1, 28, 28) and label == int(labels[2])
    expected = (torch.tensor(images[2], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(image[0], expected)

    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, truncate=100)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is truncated"):
        build_datasets(config["data"], 0)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        build_datasets(config["data"], 0)


# --------------------------------------------------------------------------------------------
# DGConv resource objective


def test_resource_objective_is_the_dgconv_resource_constraint():
    """``loss.resource`` builds ``ResourceConstraint`` itself (no helper name is resolved)."""
    from dynaconv.layers.dgconv.layer import GroupableConv2d
    from dynaconv.layers.dgconv.resource_constraint import ResourceConstraint
    from dynaconv.train.engine import resource_objective

    torch.manual_seed(0)
    model = nn.Sequential(GroupableConv2d(4, 4, 3, padding=1))
    settings = {"enabled": True, "budget": 0.25, "budget_type": "params", "exponent": 0.5}
    objective = resource_objective(model, settings, (4, 8, 8))
    assert isinstance(objective, ResourceConstraint)
    layer = model[0]
    with torch.no_grad():
        layer.gate.fill_(1.0)  # every gate on: dense, cost 2^(2 + 2) * 9 = 144 = 4 x budget 36
    loss = torch.tensor(3.0)
    scaled = objective(loss)
    torch.testing.assert_close(scaled, torch.tensor(3.0 * (144 / 36) ** 0.5))
    scaled.backward()
    assert layer.gate.grad is not None and bool((layer.gate.grad > 0).all())
    with torch.no_grad():
        layer.gate.fill_(-1.0)  # every gate off: cost 2^2 * 9 = 36, within budget
    torch.testing.assert_close(objective(loss), loss)
    macs = resource_objective(model, {**settings, "budget_type": "macs"}, (4, 8, 8))
    assert macs.budget_type == "macs" and macs.dense == 4 * 4 * 9 * 64
    with pytest.raises(ConfigError, match="needs DGConv layers"):
        resource_objective(nn.Sequential(nn.Conv2d(4, 4, 1)), settings, (4, 8, 8))


# --------------------------------------------------------------------------------------------
# sampling and augmentation determinism


def test_sampler_shards_cover_the_global_order_and_skip_resumes_it():
    from dynaconv.train.data import ResumableSampler

    data = list(range(50))
    single = ResumableSampler(data, 1, 0, seed=3)
    shards = [ResumableSampler(data, 2, rank, seed=3) for rank in range(2)]
    for sampler in (single, *shards):
        sampler.set_epoch(4)
    order = list(single)
    rank0, rank1 = list(shards[0]), list(shards[1])
    assert sorted(order) == data and order != data
    assert rank0 == order[0::2] and rank1 == order[1::2]  # global batch b = union of shards
    single.set_epoch(4)
    single.skip(20)
    assert list(single) == order[20:]
    assert list(single) == order  # the skip applies to one pass only
    single.set_epoch(5)
    assert list(single) != order


def test_augmentation_depends_on_seed_epoch_index_not_on_workers():
    from torch.utils.data import DataLoader

    config = resolve_config(None, overrides=["data.augment=[random_crop,hflip]"])
    train, _, _ = build_datasets(config["data"], seed=7)
    train.epoch = 2
    first = train[5][0]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(train[5][0], first)
    train.epoch = 3
    assert not torch.equal(train[5][0], first)
    train.epoch = 2

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(train, batch_size=16, num_workers=workers, shuffle=False)
        return [images for images, _ in (next(iter(loader)),)]

    assert torch.equal(batches(0)[0], batches(2)[0])


def test_imagenet_folder_tree_with_recipe_augmentations(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = resolve_config(
        "doconv-resnet18-imagenet", overrides=[f"data.dir={tmp_path}", "data.image_size=32"]
    )
    train, val, info = build_datasets(config["data"], 0)
    assert len(train) == 4 and len(val) == 4 and info.channels == 3
    image, label = train[3]
    assert image.shape == (3, 32, 32) and label == 1 and image.dtype == torch.float32
    assert val[0][0].shape == (3, 32, 32)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(DataError, match="class folders differ"):
        build_datasets(config["data"], 0)


def test_ema_keeps_copying_structure_after_the_averaged_module_moves():
    """The EMA is torch's AveragedModel with the structural-copy rule; the rule follows the
    averaged module's tensors when they move (``.to``), not their first storage."""
    model = nn.Sequential(_MaskedConv(), _Declared())
    ema = ModelEMA(model, decay=0.5)
    assert isinstance(ema.averaged, AveragedModel) and ema.module is ema.averaged.module
    ema.module.to(torch.float64)
    model.to(torch.float64)
    with torch.no_grad():
        model[0].mask[1:, :2] = 0.0
        model[1].gate_state.fill_(1.0)
        model[1].statistic.fill_(4.0)
    ema.update(model)
    state = ema.state_dict()
    assert torch.equal(state["0.mask"], model[0].mask)
    assert torch.equal(state["1.gate_state"], model[1].gate_state)
    torch.testing.assert_close(state["1.statistic"], torch.full((5,), 2.0, dtype=torch.float64))
