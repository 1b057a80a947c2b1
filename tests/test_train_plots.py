"""Structure plots: the per-layer table, the generic mask plot and per-family plotters."""

from __future__ import annotations

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


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _MaskedLayer(), _RoutedLayer())


def test_structure_plots_table_generic_masks_and_registered_plotter(tmp_path):
    seen = {}

    def routed(fig, layers, activations):
        name, _layer = layers[0]
        seen["layers"] = [n for n, _ in layers]
        seen["route"] = activations[name]["route"].shape
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(activations[name]["route"].mean(0))
        return True

    plots.register_structure_plot("routed_test", routed)
    try:
        written = plots.plot_structure(_model(), tmp_path, torch.randn(4, 1, 6, 6))
    finally:
        del plots.STRUCTURE_PLOTTERS["routed_test"]
    names = sorted(p.name for p in written)
    assert names == ["structure.png", "structure_masked_test.png", "structure_routed_test.png"]
    for path in written:
        assert path.stat().st_size > 1000
    assert seen == {"layers": ["2"], "route": (4, 3)}


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
