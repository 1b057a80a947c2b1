"""DGConv's resource-constrained training objective.

Zhang et al., "Differentiable Learning-to-Group Channels via Groupable Convolutional Neural
Networks", ICCV 2019: the task loss is scaled by ``(cost / budget) ^ 0.02`` while the cost of
the :class:`~dynaconv.layers.dgconv.GroupableConv2d` layers (their active connections, as
parameters or MACs) is above the budget, a fraction of their dense cost. The authors' sketch
writes the factor as ``(budget / cost) ^ 0.02``, a MnasNet-style *reward* to maximise;
multiplied into a loss that is minimised it would reward exceeding the budget (its gradient
raises the cost), so the exponent's sign is flipped here.

That one-sided objective stops pushing once the cost is under the budget, and nothing keeps
the gates from drifting further below it or back above it: in a 2-epoch Fashion-MNIST study
three seeds under a 50% budget ended at 58%, 29% and 46% of the connections. Two additions
make the budget a promise:

* ``two_sided=True`` also scales the loss by ``(budget / cost) ^ exponent`` while the cost is
  *under* the budget (MnasNet's two-sided reward, as a loss), so training is pulled towards
  the budget from both sides;
* :meth:`ResourceConstraint.finalize` (at the end of training, or earlier with fine-tuning
  after it) sets the gates to the pattern closest to the budget at or under it, and freezes
  them. The search: in each layer the gates are ranked by their value (most positive first);
  keeping ``n`` gates open means opening the ``n`` highest-ranked ones, which costs
  ``scale * 2^(K + n)`` and changes the fewest, smallest gates. Over the layers' choices of
  ``n`` an exact dynamic programme over the cost (in units of the greatest common divisor of
  the layers' costs) finds the largest total cost at or under the budget and, among the
  patterns of that cost, the one whose flipped gates have the smallest total magnitude. When
  even every gate closed costs more than the budget, that (the cheapest structure, over the
  budget) is the closest achievable one and the report says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ...spec import check_number
from .layer import GATE_INIT, GroupableConv2d

__all__ = [
    "BudgetReport",
    "ResourceConstraint",
    "closest_gate_counts",
    "resource_constrained_loss",
]

log = logging.getLogger("dynaconv")

#: Most cost units the exact search of :func:`closest_gate_counts` works with; beyond it the
#: costs are rounded up to coarser units (the result stays at or under the budget).
MAX_SEARCH_UNITS = 2_000_000


@dataclass(frozen=True)
class BudgetReport:
    """The structure :meth:`ResourceConstraint.finalize` chose.

    ``cost`` and ``budget`` are in parameters or MACs (``budget_type``), ``dense`` is the cost
    with every gate open; ``fraction = cost / dense``; ``within_budget`` is ``cost <=
    budget`` (false only when the cheapest structure is over the budget); ``open_gates`` is
    the number of open gates per layer; ``flipped`` counts the gates whose sign changed.
    """

    cost: float
    budget: float
    dense: float
    open_gates: tuple[int, ...]
    flipped: int

    @property
    def fraction(self) -> float:
        return self.cost / self.dense

    @property
    def budget_fraction(self) -> float:
        return self.budget / self.dense

    @property
    def within_budget(self) -> bool:
        return self.cost <= self.budget

    def __str__(self) -> str:
        where = "at or under" if self.within_budget else "OVER (closest achievable)"
        return (
            f"{100 * self.fraction:.2f}% of the dense cost, {where} the budget of "
            f"{100 * self.budget_fraction:.2f}% ({self.flipped} gate(s) flipped)"
        )


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
        two_sided: also scale the loss by ``(budget / cost) ^ exponent`` while under the
            budget (pulls the cost up towards it); ``False`` (default) is the paper's
            one-sided objective.

    After training (or at a chosen point, with fine-tuning after it), :meth:`finalize` puts
    the gates at the pattern closest to the budget at or under it and freezes them; from then
    on calling the constraint returns the loss unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float,
        budget_type: Literal["params", "macs"] = "params",
        input_shape: Sequence[int] | None = None,
        exponent: float = 0.02,
        two_sided: bool = False,
    ) -> None:
        check_number(budget, "budget", lambda b: 0 < b <= 1, "a fraction in (0, 1]")
        if budget_type not in ("params", "macs"):
            raise ValueError(f"budget_type must be 'params' or 'macs', got {budget_type!r}")
        check_number(exponent, "exponent", lambda e: e > 0, "a positive number")
        if not isinstance(two_sided, bool):
            raise ValueError(f"two_sided must be a bool, got {two_sided!r}")
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
        self.two_sided = two_sided
        self.report: BudgetReport | None = None  # set by finalize()

    def _pairs(self) -> Iterable[tuple[GroupableConv2d, int]]:
        return zip(self.layers, self.scales, strict=True)

    def cost(self) -> Tensor:
        """Current parameters or MACs of the DGConv layers (differentiable in the gates)."""
        return torch.stack(
            [layer.active_connections() * scale for layer, scale in self._pairs()]
        ).sum()

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` has fixed the structure."""
        return self.report is not None

    def __call__(self, loss: Tensor) -> Tensor:
        """``loss * (cost / budget) ^ exponent`` over the budget; with ``two_sided`` also
        ``loss * (budget / cost) ^ exponent`` under it; ``loss`` once :meth:`finalize` ran."""
        if self.finalized:
            return loss
        cost = self.cost()
        ratio = cost / self.budget
        over = torch.where(cost > self.budget, loss * (ratio**self.exponent).to(loss.dtype), loss)
        if not self.two_sided:
            return over
        under = loss * (ratio**-self.exponent).to(loss.dtype)
        return torch.where(cost < self.budget, under, over)

    def finalize(self, freeze: bool = True) -> BudgetReport:
        """Set the gates to the pattern closest to the budget at or under it (module docstring).

        Gates that keep their sign are unchanged; a flipped gate takes the opposite sign with
        its magnitude (at least ``1e-8``, never exactly 0, which would binarise to 0.5). With
        ``freeze`` the gates stop requiring gradients (and lose any stored gradient), so
        training can go on with the structure fixed: optimizers skip parameters whose
        gradient is ``None`` (give it a fresh optimizer, or ``zero_grad(set_to_none=True)``,
        PyTorch's default, so that momentum cannot move the frozen gates). Returns (and keeps
        in ``self.report``) a :class:`BudgetReport`; a warning is logged when the cheapest
        structure is over the budget.
        """
        gates = [layer.gate.detach().double().cpu() for layer in self.layers]
        costs = [
            [scale * 2 ** (layer.num_gates + n) for n in range(layer.num_gates + 1)]
            for layer, scale in self._pairs()
        ]
        penalties = [_flip_penalties(g) for g in gates]
        counts = closest_gate_counts(costs, penalties, self.budget)
        flipped = 0
        with torch.no_grad():
            for layer, g, n in zip(self.layers, gates, counts, strict=True):
                target = _open_pattern(g, n)
                flipped += int((target != (g > 0)).sum())
                magnitude = g.abs().clamp_min(GATE_INIT)
                new = torch.where(target, magnitude, -magnitude)
                layer.gate.copy_(new.to(layer.gate.dtype))
                if freeze:
                    layer.gate.requires_grad_(False)
                    layer.gate.grad = None
        cost = float(sum(c[n] for c, n in zip(costs, counts, strict=True)))
        self.report = BudgetReport(cost, self.budget, self.dense, tuple(counts), flipped)
        if not self.report.within_budget:
            log.warning("DGConv budget not reachable: %s", self.report)
        return self.report


def _open_pattern(gates: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` highest gates (ties: the lower index first)."""
    order = torch.sort(-gates, stable=True).indices
    pattern = torch.zeros(gates.numel(), dtype=torch.bool)
    pattern[order[:count]] = True
    return pattern


def _flip_penalties(gates: Tensor) -> list[float]:
    """``penalty[n]``: total magnitude of the gates whose sign changes when the ``n`` highest
    are open and the others closed (a gate exactly 0 counts as closed, penalty 0)."""
    result = []
    for n in range(gates.numel() + 1):
        pattern = _open_pattern(gates, n)
        changed = pattern != (gates > 0)
        result.append(float(gates[changed].abs().sum()))
    return result


def closest_gate_counts(
    costs: Sequence[Sequence[float]], penalties: Sequence[Sequence[float]], budget: float
) -> list[int]:
    """Per layer, the option ``n`` (open gates) whose total cost is closest to ``budget`` at or
    under it; among equal costs, the smallest total penalty.

    ``costs[l][n]`` and ``penalties[l][n]`` are layer ``l``'s cost and flip penalty with ``n``
    gates open (costs positive integers). Exact dynamic programme over the total cost in units
    of the costs' greatest common divisor; when the budget spans more than
    :data:`MAX_SEARCH_UNITS` units, costs are rounded up and the budget down to coarser units
    (the result stays at or under the budget, possibly a little further from it). When no
    combination fits, every layer takes its cheapest option.
    """
    if len(costs) != len(penalties) or any(
        len(c) != len(p) or not c for c, p in zip(costs, penalties, strict=False)
    ):
        raise ValueError("costs and penalties must have one non-empty list per layer, alike")
    integer_costs = [[int(c) for c in layer] for layer in costs]
    if any(
        c <= 0 or c != given
        for layer, raw in zip(integer_costs, costs, strict=True)
        for c, given in zip(layer, raw, strict=True)
    ):
        raise ValueError("costs must be positive integers")
    cheapest = [min(range(len(layer)), key=layer.__getitem__) for layer in integer_costs]
    if sum(layer[n] for layer, n in zip(integer_costs, cheapest, strict=True)) > budget:
        return cheapest
    unit = reduce(math.gcd, (c for layer in integer_costs for c in layer))
    unit = max(unit, math.ceil(budget / MAX_SEARCH_UNITS))
    capacity = int(budget // unit)
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for index, (layer_costs, layer_penalties) in enumerate(
        zip(integer_costs, penalties, strict=True)
    ):
        updated = np.full(capacity + 1, np.inf)
        for n, (cost, penalty) in enumerate(zip(layer_costs, layer_penalties, strict=True)):
            units = -(-cost // unit)
            if units > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[units:] = best[: capacity + 1 - units] + penalty
            better = candidate < updated
            updated[better] = candidate[better]
            choices[index][better] = n
        best = updated
    reachable = np.flatnonzero(np.isfinite(best))
    if reachable.size == 0:  # only possible with rounded-up units: the cheapest fits exactly
        return cheapest
    total = int(reachable[-1])
    counts = []
    for index in range(len(costs) - 1, -1, -1):
        n = int(choices[index][total])
        counts.append(n)
        total -= -(-integer_costs[index][n] // unit)
    return counts[::-1]


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


def resource_constrained_loss(loss: Tensor, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """``loss * (cost / budget) ^ exponent`` while the DGConv cost exceeds the budget.

    One-call form of :class:`ResourceConstraint`, whose arguments follow ``model`` (``budget,
    budget_type="params", input_shape=None, exponent=0.02, two_sided=False``, see there). For
    ``"macs"`` it runs a forward to find the layers' output sizes on every call: build a
    :class:`ResourceConstraint` once in a training loop instead.
    """
    return ResourceConstraint(model, *args, **kwargs)(loss)
