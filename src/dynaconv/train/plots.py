"""PNG plots at the end of a run: training curves and the learned structure.

* ``curves.png``: training/validation loss and accuracy and the learning rate per epoch.
* ``structure.png``: a table of every dynaconv layer with its ``structure()`` string,
  parameters and (for the profiled batch) dense and active MACs.
* ``structure_<method>.png``: one figure per method family present, drawn by one plotter
  (:func:`plot_structure_maps`) from each layer's ``structure_maps`` hook
  (:meth:`dynaconv.layers.DynaConv2d.structure_maps`), which receives the outputs of the
  layer's sub-modules recorded on one validation batch. A family changes its figure by
  overriding that hook; nothing is registered here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynaconv.layers._base import DynaConv2d
from dynaconv.lifecycle import dynaconv_layers

__all__ = [
    "plot_curves",
    "plot_structure",
    "plot_structure_maps",
    "record_activations",
]

Layers = list[tuple[str, DynaConv2d]]
Activations = dict[str, dict[str, Tensor]]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# curves


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss, accuracy and learning rate per epoch from the run's history rows."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    curves = {
        0: (("train_loss", "train"), ("val_loss", "validation")),
        1: (("train_acc", "train"), ("val_acc", "validation"), ("ema_val_acc", "validation (EMA)")),
    }
    for axis, keys in curves.items():
        for key, label in keys:
            # epochs without validation (train.eval_every_epochs > 1) have no value
            points = [(e, row.get(key)) for e, row in zip(epochs, history, strict=True)]
            points = [(e, v) for e, v in points if v is not None and v == v]
            if points:
                axes[axis].plot(*zip(*points, strict=True), marker="o", label=label)
    axes[2].plot(epochs, [row["lr"] for row in history], marker="o")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# structure


def record_activations(model: nn.Module, batch: Tensor) -> Activations:
    """Outputs of every sub-module of every dynaconv layer on one batch (eval mode)."""
    records: Activations = {}
    handles = []
    for name, layer in dynaconv_layers(model):
        records[name] = {}
        for sub_name, sub in layer.named_modules():
            if sub is layer:
                continue

            def hook(_m: nn.Module, _i: Any, out: Any, store=records[name], key=sub_name) -> None:
                if isinstance(out, Tensor):
                    store[key] = out.detach().float().cpu()

            handles.append(sub.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return records


def _structure_table(model: nn.Module, path: Path, input_shape: Sequence[int] | None) -> None:
    plt = _pyplot()
    layers = list(dynaconv_layers(model))
    macs: dict[str, tuple[int, int]] = {}
    if input_shape is not None and layers:
        from dynaconv.profiling import profile

        try:
            report = profile(model, input_shape, deployed=False)
            macs = {row.name: (row.macs, row.macs_active) for row in report.layers}
        except Exception:  # the table is still useful without MACs
            macs = {}
    rows = [
        [
            name[-38:],
            type(layer).__name__,
            (layer.structure() or "-")[:60],
            f"{sum(p.numel() for p in layer.parameters()):,d}",
            f"{macs[name][1] / max(macs[name][0], 1):.2f}" if name in macs else "-",
        ]
        for name, layer in layers
    ] or [["(no dynaconv layers)", "-", "-", "-", "-"]]
    height = 1.2 + 0.28 * len(rows)
    fig, ax = plt.subplots(figsize=(14, height))
    ax.axis("off")
    table = ax.table(
        cellText=rows,
        colLabels=["layer", "type", "structure", "params", "active/dense MACs"],
        loc="upper center",
        cellLoc="left",
        colWidths=[0.28, 0.16, 0.38, 0.08, 0.1],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title("learned structure per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_structure_maps(fig: Any, layers: Layers, activations: Activations) -> bool:
    """Draw the ``structure_maps`` of ``layers`` (one family's) on ``fig``; ``False`` when
    they have none. Per map name: 0-d maps as bars over the layers, 1-d maps as a heat map
    with a row per layer, 2-d maps as one image per layer (at most 16 panels in all)."""
    by_key: dict[str, list[tuple[str, Tensor]]] = {}
    for name, layer in layers:
        for key, value in layer.structure_maps(activations.get(name, {})).items():
            by_key.setdefault(key, []).append((name, value.detach().float().cpu()))
    panels: list[tuple[str, list[tuple[str, Tensor]]]] = []
    for key, maps in by_key.items():
        if maps[0][1].dim() == 2:
            panels += [(f"{name}.{key}", [(name, image)]) for name, image in maps]
        else:
            panels.append((key, maps))
    panels = panels[:16]
    if not panels:
        return False
    cols = min(4, len(panels)) if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig.set_size_inches(max(6, 4.5 * cols), max(3.2, 1.5 + 0.3 * len(layers)) * rows)
    for index, (title, maps) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        names = [name[-30:] for name, _ in maps]
        values = [value for _, value in maps]
        if values[0].dim() == 0:
            ax.bar(range(len(values)), [float(v) for v in values])
            if min(values) > 0 and max(values) / min(values) >= 8:
                ax.set_yscale("log", base=2)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_title(title)
        elif values[0].dim() == 1:
            image = torch.full((len(values), max(len(v) for v in values)), float("nan"))
            for i, row in enumerate(values):
                image[i, : len(row)] = row
            shown = ax.imshow(image.numpy(), aspect="auto", interpolation="nearest")
            fig.colorbar(shown, ax=ax)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_title(title)
        else:
            image = values[0]
            ax.imshow(image.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
            ax.set_title(f"{title[-40:]} ({image.mean():.0%} on)", fontsize=8)
            ax.set_xlabel("input (x kernel)")
            ax.set_ylabel("output")
    return True


def plot_structure(
    model: nn.Module,
    folder: str | Path,
    batch: Tensor | None = None,
) -> list[Path]:
    """Write ``structure.png`` and one ``structure_<method>.png`` per family; the paths."""
    plt = _pyplot()
    folder = Path(folder)
    written = [folder / "structure.png"]
    _structure_table(model, written[0], None if batch is None else tuple(batch.shape))
    layers = list(dynaconv_layers(model))
    activations = record_activations(model, batch) if batch is not None and layers else {}
    by_method: dict[str, Layers] = {}
    for name, layer in layers:
        by_method.setdefault(layer.method or type(layer).__name__, []).append((name, layer))
    for method, members in by_method.items():
        fig = plt.figure()
        if plot_structure_maps(fig, members, activations):
            path = folder / f"structure_{method}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
