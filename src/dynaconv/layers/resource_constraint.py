"""DGConv's resource-constrained training objective.

Zhang et al., "Differentiable Learning-to-Group Channels via Groupable Convolutional Neural
Networks", ICCV 2019: the task loss is scaled by ``(cost / budget) ^ 0.02`` while the cost of
the :class:`~dynaconv.layers.dgconv.GroupableConv2d` layers (their active connections, as
parameters or MACs) is above the budget, a fraction of their dense cost. The authors' sketch
writes the factor as ``(budget / cost) ^ 0.02``, a MnasNet-style *reward* to maximise;
multiplied into a loss that is minimised it would reward exceeding the budget (its gradient
raises the cost), so the exponent's sign is flipped here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .dgconv import GroupableConv2d

__all__ = ["ResourceConstraint", "resource_constrained_loss"]


class ResourceConstraint:
    """The authors' resource-constrained objective for the DGConv layers of ``model``.

    ``cost()`` is the differentiable resource of the DGConv layers: each layer's active
    connections ``2^(K + sum b)`` (its ``aux_loss()``) times ``kh * kw`` (``budget_type=
    "params"``: the kernel entries kept) or times ``kh * kw * H' * W'`` (``"macs"``: the MACs of
    one example at ``input_shape``). The budget is ``budget`` (a fraction in ``(0, 1]``) of the
    dense value of those layers. Calling it on a loss gives
    ``loss * (cost / budget) ^ exponent`` while ``cost > budget``, else ``loss`` (the authors'
    ``(budget / cost) ^ 0.02`` with the sign that penalises, see the module docstring); the
    straight-through gradient of ``cost`` pushes the gates towards fewer connections.

    Args:
        model: a model with :class:`GroupableConv2d` layers.
        budget: the allowed fraction of the dense parameters or MACs of those layers.
        budget_type: ``"params"`` or ``"macs"`` (``"macs"`` needs ``input_shape``: one
            no-grad eval forward at batch 1 records each layer's output size).
        input_shape: ``(C, H, W)`` or ``(B, C, H, W)`` of the model's input, for ``"macs"``.
        exponent: the objective's exponent (0.02 in the paper).
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float,
        budget_type: Literal["params", "macs"] = "params",
        input_shape: Sequence[int] | None = None,
        exponent: float = 0.02,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
        if budget_type not in ("params", "macs"):
            raise ValueError(f"budget_type must be 'params' or 'macs', got {budget_type!r}")
        if isinstance(exponent, bool) or not isinstance(exponent, int | float) or exponent <= 0:
            raise ValueError(f"exponent must be a positive number, got {exponent!r}")
        self.layers = [m for m in model.modules() if isinstance(m, GroupableConv2d)]
        if not self.layers:
            raise ValueError("model has no GroupableConv2d layer to constrain")
        if budget_type == "macs":
            if input_shape is None:
                raise ValueError("budget_type='macs' needs input_shape (the model's input size)")
            positions = _output_positions(model, self.layers, input_shape)
        else:
            positions = [1] * len(self.layers)
        self.scales = [
            layer.spec.kernel_numel * p for layer, p in zip(self.layers, positions, strict=True)
        ]
        self.dense = float(
            sum(layer.in_channels * layer.out_channels * s for layer, s in self._pairs())
        )
        self.budget = float(budget) * self.dense
        self.budget_type = budget_type
        self.exponent = float(exponent)

    def _pairs(self) -> Iterable[tuple[GroupableConv2d, int]]:
        return zip(self.layers, self.scales, strict=True)

    def cost(self) -> Tensor:
        """Current parameters or MACs of the DGConv layers (differentiable in the gates)."""
        return torch.stack([layer.aux_loss() * scale for layer, scale in self._pairs()]).sum()

    def __call__(self, loss: Tensor) -> Tensor:
        cost = self.cost()
        factor = (cost / self.budget) ** self.exponent
        return torch.where(cost > self.budget, loss * factor.to(loss.dtype), loss)


def _output_positions(
    model: nn.Module, layers: list[GroupableConv2d], input_shape: Sequence[int]
) -> list[int]:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or any(not isinstance(s, int) or s <= 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W), got {tuple(input_shape)}")
    sizes: dict[int, int] = {}

    def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
        sizes[id(module)] = output.shape[-2] * output.shape[-1]

    handles = [layer.register_forward_hook(record) for layer in layers]
    ref = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape[1:]), device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [i for i, layer in enumerate(layers) if id(layer) not in sizes]
    if missing:
        raise ValueError(f"{len(missing)} GroupableConv2d layer(s) did not run in the forward")
    return [sizes[id(layer)] for layer in layers]


def resource_constrained_loss(
    loss: Tensor,
    model: nn.Module,
    budget: float,
    budget_type: Literal["params", "macs"] = "params",
    input_shape: Sequence[int] | None = None,
    exponent: float = 0.02,
) -> Tensor:
    """``loss * (cost / budget) ^ exponent`` while the DGConv cost exceeds the budget.

    One-call form of :class:`ResourceConstraint` (see there). For ``"macs"`` it runs a forward
    to find the layers' output sizes on every call: build a :class:`ResourceConstraint` once
    in a training loop instead.
    """
    return ResourceConstraint(model, budget, budget_type, input_shape, exponent)(loss)
