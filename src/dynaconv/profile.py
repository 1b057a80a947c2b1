"""Honest parameter and MAC counts: stored, deployed, dense and active.

Counting conventions (``convention="dense"``, the default):

* ``params``: parameters stored in the model (``numel`` of every ``nn.Parameter``; buffers
  such as masks, gates and indices are not parameters).
* ``params_deployed``: parameters of ``dynaconv.deploy(model)``: what inference keeps.
* ``macs``: dense multiply-accumulates of one forward at ``input_shape`` (the batch in
  ``input_shape`` included): ``nn.Conv2d`` ``B * Cout * Cin/groups * kh * kw * H' * W'``,
  ``nn.Linear`` ``in * out`` per row, and each dynaconv layer's dense conv. Normalisation,
  activations, pooling and element-wise ops count nothing, as in ``FlopCounterMode``
  (whose FLOPs are 2 x these MACs for a deployed model).
* ``macs_active``: what really has to be computed: DGC's kept channels, DGConv's learned
  groups, LGC's kept connections, plus CondConv's kernel mixing (``B * E * numel(W_e)``).

``convention="reference"`` reproduces the counter of the papers' repositories
(CondenseNet's ``measure_model``, used by DGC too): it also counts one op per element for
ReLU, pooling windows, and the linear layers' bias. Use it to compare with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .layers._base import DynaConv2d

__all__ = ["LayerProfile", "Profile", "profile"]

Convention = Literal["dense", "reference"]


@dataclass
class LayerProfile:
    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    macs: int
    macs_active: int
    structure: str = ""


class Profile(dict):
    """Dict with ``params``, ``params_deployed``, ``macs``, ``macs_active`` and ``layers``.

    ``layers`` (also the attribute ``.layers``) is the per-layer breakdown; ``str()`` of a
    profile is a table.
    """

    def __init__(self, layers: list[LayerProfile], **totals: int) -> None:
        super().__init__(totals, layers=layers)

    @property
    def layers(self) -> list[LayerProfile]:
        return self["layers"]

    def __str__(self) -> str:
        header = f"{'layer':40s} {'type':22s} {'output':>18s} {'params':>10s} {'MACs':>14s} {'active MACs':>14s}"
        lines = [header, "-" * len(header)]
        for row in self.layers:
            lines.append(
                f"{row.name[-40:]:40s} {row.kind[:22]:22s} {'x'.join(map(str, row.output_shape[1:])):>18s} "
                f"{row.params:>10,d} {row.macs:>14,d} {row.macs_active:>14,d}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"params {self['params']:,d} (deployed {self['params_deployed']:,d})  "
            f"MACs {self['macs']:,d} (active {self['macs_active']:,d})"
        )
        return "\n".join(lines)


def _direct_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _conv_macs(module: nn.Conv2d, output_shape: Sequence[int]) -> int:
    batch, cout, *spatial = output_shape
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    positions = 1
    for s in spatial:
        positions *= s
    return batch * cout * (module.in_channels // module.groups) * kernel * positions


def _reference_extra(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Ops the reference counter adds beyond conv/linear multiply-accumulates."""
    if isinstance(module, nn.ReLU):
        return x.numel()
    if isinstance(module, nn.AvgPool2d | nn.MaxPool2d):
        kernel = (
            module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        )
        return y.numel() * kernel * kernel
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return x.numel()
    if isinstance(module, nn.Linear) and module.bias is not None:
        return x.numel() // module.in_features * module.out_features
    return 0


def _count(model: nn.Module, x: torch.Tensor, convention: Convention) -> list[LayerProfile]:
    rows: list[LayerProfile] = []
    handles = []
    counted_inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, DynaConv2d):
            counted_inside.update(id(m) for m in module.modules() if m is not module)

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if id(module) in counted_inside or not isinstance(output, torch.Tensor):
                return
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            in_shape = tuple(inp.shape) if inp is not None else ()
            out_shape = tuple(output.shape)
            structure = ""
            if isinstance(module, DynaConv2d):
                counter = module.count_macs
                if convention == "reference" and hasattr(module, "count_macs_reference"):
                    counter = module.count_macs_reference  # the layer's own reference rules
                macs, active = counter(in_shape, out_shape)
                params = sum(p.numel() for p in module.parameters())
                structure = module.structure()
            elif hasattr(module, "count_macs") and callable(module.count_macs):
                macs, active = module.count_macs(in_shape, out_shape)
                params = sum(p.numel() for p in module.parameters())
                counted_inside.update(id(m) for m in module.modules() if m is not module)
            elif isinstance(module, nn.Conv2d):
                macs = active = _conv_macs(module, out_shape)
                params = _direct_params(module)
            elif isinstance(module, nn.Linear):
                macs = active = (
                    output.numel() // module.out_features * module.in_features * module.out_features
                )
                params = _direct_params(module)
            else:
                macs = active = 0
                params = _direct_params(module)
            if convention == "reference" and inp is not None:
                extra = _reference_extra(module, inp, output)
                macs += extra
                active += extra
            if macs or params:
                rows.append(
                    LayerProfile(
                        name,
                        type(module).__name__,
                        in_shape,
                        out_shape,
                        params,
                        macs,
                        active,
                        structure,
                    )
                )

        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name or type(model).__name__)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def profile(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    convention: Convention = "dense",
    deployed: bool = True,
) -> Profile:
    """Parameters and MACs of ``model`` for one forward at ``input_shape`` (batch included).

    Runs one eval-mode forward (no state changes) on a random input. With ``deployed``
    (default) it also deploys a copy to count ``params_deployed``; see the module docstring
    for the conventions.
    """
    if convention not in ("dense", "reference"):
        raise ValueError(f"convention must be 'dense' or 'reference', got {convention!r}")
    if len(input_shape) < 2 or any(not isinstance(s, int) or s <= 0 for s in input_shape):
        raise ValueError(
            f"input_shape must be positive ints (batch first), got {tuple(input_shape)}"
        )
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(
        device
    )
    was_training = model.training
    model.eval()
    try:
        rows = _count(model, x, convention)
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    if deployed:
        from .lifecycle import deploy

        params_deployed = sum(p.numel() for p in deploy(model, verify=False).parameters())
    else:
        params_deployed = params
    return Profile(
        rows,
        params=params,
        params_deployed=params_deployed,
        macs=sum(r.macs for r in rows),
        macs_active=sum(r.macs_active for r in rows),
    )
