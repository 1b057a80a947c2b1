"""PNG plots at the end of a run: training curves and the learned structure.

* ``curves.png``: training/validation loss and accuracy and the learning rate per epoch.
* ``structure.png``: a table of every dynaconv layer with its ``structure()`` string,
  parameters and (for the profiled batch) dense and active MACs.
* ``structure_<method>.png``: one figure per method family present, drawn by the plotter
  of the kind the family registered (``structure_plot`` of
  :func:`dynaconv.families.register_family`), or one registered for that method with
  :func:`register_structure_plot`, or by the generic plotter (any 0/1-valued buffer or
  parameter of a layer, e.g. a connectivity mask, drawn as an image).

Plotters receive ``(figure, layers, activations)`` where ``layers`` is a list of
``(name, layer)`` and ``activations`` maps a layer name to the outputs of its sub-modules,
recorded on one validation batch (``{sub_module_name: tensor}``), and return ``False`` when
they have nothing to draw. A family picks a kind where it registers; a plotter of its own
is registered here without editing the family:

    from dynaconv.train.plots import register_structure_plot
    register_structure_plot("mymethod", my_plotter)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynaconv.families import FAMILIES
from dynaconv.layers._base import DynaConv2d
from dynaconv.lifecycle import dynaconv_layers

__all__ = [
    "STRUCTURE_PLOTTERS",
    "plot_curves",
    "plot_structure",
    "record_activations",
    "register_structure_plot",
    "structure_plotter",
]

Layers = list[tuple[str, DynaConv2d]]
Activations = dict[str, dict[str, Tensor]]
Plotter = Callable[[Any, Layers, Activations], bool]

#: Method name -> plotter registered with :func:`register_structure_plot` (overrides the kind).
STRUCTURE_PLOTTERS: dict[str, Plotter] = {}


def register_structure_plot(method: str, plotter: Plotter) -> None:
    """Use ``plotter`` for the layers whose ``method`` is ``method``."""
    STRUCTURE_PLOTTERS[method] = plotter


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


def _binary_tensors(layer: nn.Module) -> dict[str, Tensor]:
    found = {}
    named = [*layer.named_buffers(recurse=False), *layer.named_parameters(recurse=False)]
    for name, value in named:
        if value is None or value.numel() < 2 or value.dim() < 2:
            continue
        data = value.detach().float().cpu()
        if bool(((data == 0) | (data == 1)).all()):
            found[name] = data.reshape(data.shape[0], -1)
    return found


def plot_binary_structure(fig: Any, layers: Layers, activations: Activations) -> bool:
    """Generic: every 0/1-valued buffer or parameter (masks) of each layer as an image."""
    panels = [
        (f"{name}.{key}", image)
        for name, layer in layers
        for key, image in _binary_tensors(layer).items()
    ][:16]
    if not panels:
        return False
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig.set_size_inches(4 * cols, 3.2 * rows)
    for index, (title, image) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        ax.imshow(image.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
        ax.set_title(f"{title[-40:]} ({image.mean():.0%} on)", fontsize=8)
        ax.set_xlabel("input (x kernel)")
        ax.set_ylabel("output")
    return True


def plot_dgconv_groups(fig: Any, layers: Layers, activations: Activations) -> bool:
    """DGConv: learned number of groups per layer, from each layer's ``gate`` (2^zero gates)."""
    names, groups = [], []
    for name, layer in layers:
        gate = getattr(layer, "gate", None)
        if not isinstance(gate, Tensor) or gate.dim() != 1:
            continue
        names.append(name)
        groups.append(2 ** int((gate.detach() < 0).sum()))  # gates with b = 0
    if not names:
        return plot_binary_structure(fig, layers, activations)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), groups)
    ax.set_yscale("log", base=2)
    ax.set_xticks(range(len(names)), [n[-25:] for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("groups")
    ax.set_title("DGConv: learned groups per layer")
    fig.set_size_inches(max(6, 0.35 * len(names) + 2), 5)
    return True


def _heatmap_of_outputs(
    fig: Any,
    layers: Layers,
    activations: Activations,
    width_of: Callable[[DynaConv2d], int],
    title: str,
) -> bool:
    rows, names = [], []
    for name, layer in layers:
        width = width_of(layer)
        outputs = [
            out
            for out in activations.get(name, {}).values()
            if out.dim() == 2 and out.shape[1] == width
        ]
        if outputs:
            rows.append(torch.stack([o.mean(0) for o in outputs]).mean(0))
            names.append(name)
    if not rows:
        return plot_binary_structure(fig, layers, activations)
    longest = max(len(r) for r in rows)
    image = torch.full((len(rows), longest), float("nan"))
    for i, row in enumerate(rows):
        image[i, : len(row)] = row
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(image.numpy(), aspect="auto", interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_yticks(range(len(names)), [n[-30:] for n in names], fontsize=7)
    ax.set_title(title)
    fig.set_size_inches(10, 1.5 + 0.3 * len(names))
    return True


def plot_condconv_routing(fig: Any, layers: Layers, activations: Activations) -> bool:
    """CondConv: mean routing weight per expert and layer on a validation batch.

    The routing function is ``sigmoid(Linear(GAP(x)))`` with ``E`` outputs (docs/methods.md); the
    plot shows the recorded ``(B, E)`` outputs in ``[0, 1]`` of each layer's sub-modules
    (``E = num_experts`` of the layer), or ``sigmoid`` of the ``(B, E)`` logits if only those
    are recorded.
    """

    def experts(layer: DynaConv2d) -> int:
        return int(getattr(layer, "num_experts", -1))

    def routing(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        weights = {k: v for k, v in outputs.items() if bool(((v >= 0) & (v <= 1)).all())}
        return weights or {k: torch.sigmoid(v) for k, v in outputs.items()}

    routed = {name: routing(outputs) for name, outputs in activations.items()}
    return _heatmap_of_outputs(
        fig, layers, routed, experts, "CondConv: mean routing weight per expert"
    )


def plot_dgc_channel_usage(fig: Any, layers: Layers, activations: Activations) -> bool:
    """DGC: mean saliency per input channel (the heads' ``Cin``-wide outputs) per layer."""
    return _heatmap_of_outputs(
        fig,
        layers,
        activations,
        lambda layer: layer.in_channels,
        "DGC: mean channel saliency (input channel usage) per layer",
    )


#: Structure-plot kind (:data:`dynaconv.families.STRUCTURE_PLOT_KINDS`) -> plotter.
PLOTTERS_BY_KIND: dict[str, Plotter] = {
    "binary": plot_binary_structure,
    "groups": plot_dgconv_groups,
    "routing": plot_condconv_routing,
    "channel_usage": plot_dgc_channel_usage,
}


def structure_plotter(method: str) -> Plotter:
    """The plotter of ``method``: one registered with :func:`register_structure_plot`, else the
    one of the kind its family registered (:class:`dynaconv.families.Family`), else the
    generic binary plotter."""
    if method in STRUCTURE_PLOTTERS:
        return STRUCTURE_PLOTTERS[method]
    family = FAMILIES.get(method)
    return PLOTTERS_BY_KIND[family.structure_plot if family else "binary"]


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
        plotter = structure_plotter(method)
        if plotter(fig, members, activations):
            path = folder / f"structure_{method}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
