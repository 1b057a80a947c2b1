"""Datasets, augmentations and samplers for training.

Supported (``data.dataset``):

* ``digits``: scikit-learn's 8x8 digits, built in (1,797 images; a fixed 80/20 split).
* ``mnist`` / ``fashion_mnist``: the four idx files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``) directly in ``data.dir`` (Debian's ``dataset-fashion-mnist`` layout in
  ``/usr/share/datasets/fashion-mnist``) or in torchvision's ``DIR/MNIST/raw`` /
  ``DIR/FashionMNIST/raw``. ``data.download`` fetches them through torchvision.
* ``cifar10`` / ``cifar100``: torchvision's python batches ``DIR/cifar-10-batches-py`` /
  ``DIR/cifar-100-python`` (or ``data.dir`` pointing at that folder); downloadable.
* ``imagenet``: an ImageFolder tree ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*``.

Missing or malformed data raises :class:`DataError` naming the path and the expected layout;
there is never a fallback to other data. Label values outside the dataset's classes, more class
folders than it has classes, images that cannot be read, and examples whose transformed size is
not the configured one are errors naming the file (or example).

Augmentations are a deterministic function of ``(seed, epoch, example index)`` (each example
is transformed under its own seeded generator state), so they do not depend on the number of
data-loader workers or processes, and a resumed run sees exactly the data the uninterrupted
one would have seen.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "DataError",
    "DatasetInfo",
    "ResumableSampler",
    "SeededTransformDataset",
    "build_datasets",
    "dataset_info",
]


class DataError(RuntimeError):
    """Missing or malformed dataset files (the message names the path and the layout)."""


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 8, (0.3,), (0.4,)),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def dataset_info(data_config: dict[str, Any]) -> DatasetInfo:
    """Classes, channels, (eval) image size and normalisation of the configured dataset."""
    info = _INFO[data_config["dataset"]]
    size = data_config.get("image_size") or info.image_size
    channels = data_config.get("channels") or info.channels
    return DatasetInfo(info.num_classes, channels, size, info.mean, info.std)


# --------------------------------------------------------------------------------------------
# raw loaders


class TensorImages(Dataset):
    """Images ``(N, C, H, W)`` (uint8 or float in [0, 1]) with integer labels.

    ``source`` names where the labels came from (for error messages).
    """

    def __init__(
        self, images: Tensor, labels: Tensor, num_classes: int, source: str = "labels"
    ) -> None:
        self.images = images
        self.labels = labels.long()
        self.classes = list(range(num_classes))
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def _load_digits() -> tuple[TensorImages, TensorImages]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    train, val = order[:cut], order[cut:]
    return TensorImages(images[train], labels[train], 10), TensorImages(
        images[val], labels[val], 10
    )


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _idx_layout(name: str) -> str:
    files = ", ".join(f"{f}[.gz]" for f in _IDX_FILES.values())
    return (
        f"expected the idx files {files} directly in the folder (as Debian's "
        f"dataset-{name.replace('_', '-')} installs them) or in "
        f"DIR/{_TORCHVISION_FOLDER[name]}/raw/ (torchvision's layout); pass --download to fetch them"
    )


def _find_idx(root: Path, name: str, stem: str) -> Path | None:
    for folder in (root, root / _TORCHVISION_FOLDER[name] / "raw"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, name: str) -> Tensor:
    # Not torchvision's read_image_file/read_label_file: they read neither gzip files (as
    # Debian installs the datasets) nor check the header beyond asserts, so a truncated or
    # foreign file fails with an AssertionError or a view error instead of a DataError naming
    # the file and the expected layout; the format itself is 20 lines (magic, shape, bytes).
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}; {_idx_layout(name)}") from None
    if len(data) < 8:
        raise DataError(f"{path} is not an idx file (too short); {_idx_layout(name)}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(
            f"{path} is not an idx file of unsigned bytes (bad magic); {_idx_layout(name)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = 1
    for size in shape:
        count *= size
    if len(data) - offset != count:
        raise DataError(
            f"{path} is truncated or malformed: header says shape {shape} "
            f"({count} bytes), file holds {len(data) - offset}; {_idx_layout(name)}"
        )
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape)


def _load_idx_dataset(name: str, root: Path, download: bool) -> tuple[TensorImages, TensorImages]:
    paths = {key: _find_idx(root, name, stem) for key, stem in _IDX_FILES.items()}
    if any(p is None for p in paths.values()) and download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        for train in (True, False):
            try:
                cls(str(root), train=train, download=True)
            except Exception as error:  # network or checksum failures, reported generically
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise DataError(f"{name}: cannot download into {root}: {first}") from None
        paths = {key: _find_idx(root, name, stem) for key, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{name}: {', '.join(missing)} not found in {root}; {_idx_layout(name)}")
    tensors = {key: _read_idx(path, name) for key, path in paths.items()}  # type: ignore[arg-type]
    splits = []
    for split in ("train", "val"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(
                f"{name} in {root}: {split} images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)} do not match; {_idx_layout(name)}"
            )
        source = str(paths[f"{split}_labels"])
        splits.append(TensorImages(images.unsqueeze(1), labels, 10, source))
    return splits[0], splits[1]


def _load_cifar(name: str, root: Path, download: bool) -> tuple[TensorImages, TensorImages]:
    import torchvision

    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    files = (
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        if name == "cifar10"
        else ["train", "test"]
    )
    layout = (
        f"expected torchvision's python version of {name.upper()}: {root}/{folder}/ holding "
        f"{', '.join(files)} (or pass the {folder} folder itself); pass --download to fetch it"
    )
    if root.name == folder:
        root = root.parent
    if not download and not all((root / folder / f).is_file() for f in files):
        raise DataError(f"{name}: dataset not found at {root / folder}; {layout}")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except Exception as error:  # torchvision reports missing/corrupt files generically
            raise DataError(f"{name}: cannot load {root / folder}: {error}; {layout}") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        source = str(root / folder)
        splits.append(TensorImages(images, torch.tensor(ds.targets), len(ds.classes), source))
    return splits[0], splits[1]


def _load_imagenet(root: Path) -> tuple[Dataset, Dataset]:
    import torchvision

    layout = (
        f"expected an ImageFolder tree: {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image> with the same class folders"
    )
    splits = []
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"imagenet: {folder} does not exist; {layout}")
        try:
            splits.append(torchvision.datasets.ImageFolder(str(folder), loader=load_image))
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"imagenet: cannot read {folder}: {error}; {layout}") from None
    if splits[0].classes != splits[1].classes:
        raise DataError(f"imagenet: train and val class folders differ in {root}; {layout}")
    return splits[0], splits[1]


def load_image(path: str) -> Any:
    """An RGB PIL image from ``path``, or :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def _check_labels(dataset: Dataset, num_classes: int, name: str, split: str) -> None:
    """:class:`DataError` for labels outside ``[0, num_classes)``, naming the file."""
    if isinstance(dataset, TensorImages) and len(dataset.labels):
        low, high = int(dataset.labels.min()), int(dataset.labels.max())
        bad = low if low < 0 else high
        if low < 0 or high >= num_classes:
            raise DataError(
                f"{dataset.source}: label value {bad} is out of range for {name}'s "
                f"{num_classes} classes (0..{num_classes - 1}); the {split} labels are corrupt"
            )
    classes = getattr(dataset, "classes", None)
    root = getattr(dataset, "root", None)
    if root is not None and classes is not None and len(classes) > num_classes:
        raise DataError(
            f"{root}: {len(classes)} class folders, but {name} has {num_classes} classes"
        )


def _describe(dataset: Any, index: int) -> str:
    """The file of example ``index`` when known (ImageFolder), else its index."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and 0 <= index < len(samples):
        return f"image {samples[index][0]}"
    return f"example {index}"


def _layout(name: str, root: Path) -> str:
    if name in _TORCHVISION_FOLDER:
        return _idx_layout(name)
    if name in ("cifar10", "cifar100"):
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        return f"expected torchvision's {root}/{folder}/ (pass --download to fetch it)"
    return (
        f"expected an ImageFolder tree {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    )


def _load_raw(data: dict[str, Any]) -> tuple[Dataset, Dataset]:
    name = data["dataset"]
    if name == "digits":
        return _load_digits()
    if data["dir"] is None:
        raise DataError(f"{name}: no data folder given; pass --data-dir DIR (data.dir)")
    root = Path(data["dir"]).expanduser()
    if not root.is_dir() and not data["download"]:
        raise DataError(f"{name}: data folder {root} does not exist; {_layout(name, root)}")
    root.mkdir(parents=True, exist_ok=True)
    if name in ("mnist", "fashion_mnist"):
        return _load_idx_dataset(name, root, data["download"])
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, data["download"])
    if data["download"]:
        raise DataError("imagenet cannot be downloaded; pass the folder of an ImageFolder tree")
    return _load_imagenet(root)


# --------------------------------------------------------------------------------------------
# transforms


def _transforms(data: dict[str, Any], info: DatasetInfo, train: bool) -> tuple[Any, bool]:
    """The transform of one split and whether it is random."""
    from torchvision.transforms import v2

    ops: list[Any] = []
    is_imagenet = data["dataset"] == "imagenet"
    if is_imagenet:
        ops.append(v2.ToImage())
    augment = data["augment"] if train else []
    size = info.image_size
    if is_imagenet and not train:
        resize = data["eval_resize"] or round(size / 0.875)
        ops += [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    if "random_resized_crop" in augment:
        ops.append(v2.RandomResizedCrop(size, antialias=True))
    elif is_imagenet and train:
        ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if "random_crop" in augment:
        ops.append(v2.RandomCrop(size, padding=data["crop_padding"]))
    if "hflip" in augment:
        ops.append(v2.RandomHorizontalFlip())
    if "color_jitter" in augment:
        ops.append(v2.ColorJitter(0.4, 0.4, 0.4))
    if "autoaugment" in augment:
        ops.append(v2.AutoAugment())
    if not is_imagenet and size != _INFO[data["dataset"]].image_size:
        ops.append(v2.Resize(size, antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    native = _INFO[data["dataset"]].channels
    if info.channels != native:
        if native != 1:
            raise DataError(
                f"data.channels={info.channels} needs a single-channel dataset, "
                f"{data['dataset']} has {native}"
            )
        ops.append(RepeatChannels(info.channels))
    return v2.Compose(ops), bool(augment)


class RepeatChannels:
    """Repeat a grey image's channel ``count`` times (grey data into RGB models)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, image: Tensor) -> Tensor:
        return image.expand(self.count, *image.shape[1:]).contiguous()


def _example_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919_993 + index * 2_654_435_761) % (2**63 - 1)


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[i]`` under a seed fixed by ``(seed, epoch, i)``.

    ``shape``: the ``(C, H, W)`` every transformed example must have (None: unchecked); an
    example of another shape is a :class:`DataError` naming its file.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Any,
        random: bool,
        seed: int,
        shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.base = base
        self.transform = transform
        self.random = random
        self.seed = seed
        self.shape = shape
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        if not self.random:
            return self._checked(self.transform(image), index), label
        state = torch.get_rng_state()
        try:
            # Only the CPU generator (torch.manual_seed would also queue CUDA seeding).
            torch.default_generator.manual_seed(_example_seed(self.seed, self.epoch, index))
            return self._checked(self.transform(image), index), label
        finally:
            torch.set_rng_state(state)

    def _checked(self, image: Tensor, index: int) -> Tensor:
        if self.shape is not None and tuple(image.shape) != self.shape:
            base = self.base.base if isinstance(self.base, _Subset) else self.base
            raise DataError(
                f"{_describe(base, index)} has shape {tuple(image.shape)} after the transforms, "
                f"expected {self.shape} (data.image_size / data.channels)"
            )
        return image


class _Subset(Dataset):
    def __init__(self, base: Dataset, count: int) -> None:
        self.base = base
        self.count = min(count, len(base))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        return self.base[index]


def build_datasets(
    data: dict[str, Any], seed: int
) -> tuple[SeededTransformDataset, SeededTransformDataset, DatasetInfo]:
    """The training and validation datasets of ``data`` (the ``data`` config section)."""
    info = dataset_info(data)
    train, val = _load_raw(data)
    num_classes = _INFO[data["dataset"]].num_classes
    _check_labels(train, num_classes, data["dataset"], "training")
    _check_labels(val, num_classes, data["dataset"], "validation")
    if data["train_subset"]:
        train = _Subset(train, data["train_subset"])
    if data["val_subset"]:
        val = _Subset(val, data["val_subset"])
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise DataError(f"{data['dataset']}: empty training or validation split")
    train_tf, train_random = _transforms(data, info, train=True)
    val_tf, _ = _transforms(data, info, train=False)
    shape = (info.channels, info.image_size, info.image_size)
    return (
        SeededTransformDataset(train, train_tf, train_random, seed, shape),
        SeededTransformDataset(val, val_tf, False, seed, shape),
        info,
    )


# --------------------------------------------------------------------------------------------
# sampling


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can start mid-epoch.

    The order of an epoch depends only on ``(seed, epoch)``: call :meth:`set_epoch` every
    epoch. :meth:`skip` drops this rank's first ``count`` examples of the current epoch (used
    when resuming mid-epoch); it applies to the next iteration only.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._skip = 0

    def skip(self, count: int) -> None:
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        indices: Sequence[int] = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world``-th example starting at ``rank``, in order (evaluation; no padding)."""

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
