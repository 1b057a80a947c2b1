"""Structure plots: the per-layer table and the one plotter of the layers' structure maps."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dynaconv.layers._base import DynaConv2d
from dynaconv.train import plots


class _MaskedLayer(DynaConv2d):
    method = "masked_test"

    def __init__(self) -> None:
        super().__init__(8, 8, 1)
        self.weight_raw = nn.Parameter(torch.randn(8, 8, 1, 1))
        mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.spec.conv2d(x, self.weight_raw * self.mask[..., None, None], None)

    def structure(self) -> str:
        return f"kept {int(self.mask.sum())}/64"


class _RoutedLayer(DynaConv2d):
    method = "routed_test"

    def __init__(self) -> None:
        super().__init__(8, 8, 1)
        self.route = nn.Linear(8, 3)
        self.weight_raw = nn.Parameter(torch.randn(3, 8, 8, 1, 1))

    def forward(self, x):
        r = torch.sigmoid(self.route(x.mean((2, 3))))
        kernel = torch.einsum("be,eoi->boi", r, self.weight_raw[..., 0, 0]).mean(0)
        return self.spec.conv2d(x, kernel[..., None, None], None)


class _HookedLayer(_RoutedLayer):
    """A family that states its structure maps: one of each kind the plotter draws."""

    method = "hooked_test"
    seen: ClassVar[dict] = {}

    def structure_maps(self, outputs):
        self.seen["route"] = outputs["route"].shape
        return {
            "experts used": torch.tensor(3.0),
            "mean routing": outputs["route"].mean(0),
            "kernel": self.weight_raw[0, :, :, 0, 0].detach(),
        }


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _MaskedLayer(), _RoutedLayer())


def test_structure_plots_table_generic_masks_and_the_layers_hook(tmp_path):
    model = nn.Sequential(_model(), _HookedLayer(), _HookedLayer())
    written = plots.plot_structure(model, tmp_path, torch.randn(4, 1, 6, 6))
    names = sorted(p.name for p in written)
    assert names == ["structure.png", "structure_hooked_test.png", "structure_masked_test.png"]
    for path in written:
        assert path.stat().st_size > 1000
    assert _HookedLayer.seen == {"route": (4, 3)}


def test_generic_plot_declines_when_nothing_binary(tmp_path):
    written = plots.plot_structure(nn.Sequential(_RoutedLayer()), tmp_path, torch.randn(2, 8, 4, 4))
    assert [p.name for p in written] == ["structure.png"]


def test_curves_plot(tmp_path):
    rows = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e,
            "train_acc": 0.3 * e,
            "val_acc": 0.28 * e,
            "ema_val_acc": None,
            "lr": 0.1 / e,
        }
        for e in (1, 2, 3)
    ]
    plots.plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
