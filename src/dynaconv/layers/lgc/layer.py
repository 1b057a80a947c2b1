"""LGC: learned group convolution (CondenseNet).

Huang, Liu, van der Maaten and Weinberger, "CondenseNet: An Efficient DenseNet using Learned
Group Convolutions", CVPR 2018.

:class:`LearnedGroupConv2d` is a dense convolution ``(Cout, Cin, kh, kw)`` whose connections
are pruned during training into ``G = learned_groups`` groups:

* output channel ``o`` belongs to group ``o mod G`` (interleaved groups); a boolean buffer
  ``mask`` ``(Cout, Cin)`` holds the kept connections (equal rows within a group), and the
  effective kernel is ``weight = dense_weight * mask[:, :, None, None]``;
* condensation with factor ``C = condense_factor``: stage ``s = 1 .. C-1`` begins at progress
  ``p = s / (2 (C - 1))``. Entering a stage, every group drops ``Cin / C`` more input columns:
  those with the smallest importance ``sum over the group's rows and kernel taps of
  |weight|``. :meth:`set_progress` drops once per stage crossed (the reference drops only
  once when progress jumps over several stages). After ``C - 1`` stages every group reads
  ``Cin / C`` inputs; the buffer ``stage`` counts the stages applied;
* group lasso (:meth:`aux_loss`): ``sum_g sum_j sqrt(max(sum_{o mod G = g, taps}
  weight[o, j]^2, 1e-6))`` over the kept columns ``j`` of every group, zero once
  condensation is complete (the ``1e-6`` floor is the reference's, keeping the gradient
  finite; the reference also adds the constant ``sqrt(1e-6)`` for every dropped column,
  which is left out here: equal values before the first drop, equal gradients always).
  **compat**: with ``reference_lasso=True`` the layer computes the reference's term verbatim:
  the constant of the dropped columns included, and zero from stage ``G - 1`` on rather than
  ``C - 1`` (the reference compares the stage with the number of groups; the two agree when
  ``C == G``; when ``C > G`` it stops before condensation ends, when ``C < G`` never);
* ``dropout`` is applied to the layer's input in training, as in the reference, whose layer
  also holds the BN-ReLU before it (here BN-ReLU belong to the network).

:meth:`LearnedGroupConv2d.deploy` returns a :class:`CondensedGroupConv2d`
(:mod:`dynaconv.layers.lgc.deployed`), the exact "index layer": gather the ``G * K`` kept inputs (``K`` per group), a grouped convolution with ``G``
groups, then the outputs put back in interleaved order. It can also fold the BN-ReLU before
it (on the gathered channels) and the BN-ReLU after it (CondenseNet's next layer) into
per-channel scales and shifts, and runs on CUDA as one fused Triton kernel that reads the
input through the index and writes the output in its final channel order.

Shapes: input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` as ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...families import register_family
from ...spec import check_bool, check_divisible, check_input, check_int, check_number, is_int
from .._base import Convention, ConversionSkipped, DynaConv2d, MacCount, Shape, check_progress
from .deployed import (  # the deployed layer; re-exported here
    CondensedGroupConv2d,
    GatherWorkspace,
    check_gather_index,
    fold_batchnorm,
)

__all__ = [
    "CondensedGroupConv2d",
    "GatherWorkspace",
    "LearnedGroupConv2d",
    "check_condensation_state",
    "check_gather_index",
    "condensation_stage",
    "fold_batchnorm",
]

LASSO_FLOOR = 1e-6


def condensation_stage(progress: float, condense_factor: int) -> int:
    """The condensation stage at ``progress``: ``#{s in 1..C-1 : p >= s / (2 (C - 1))}``."""
    stages = condense_factor - 1
    for i in range(stages):
        if progress * 2 < (i + 1) / stages:  # the reference's comparison, bit for bit
            return i
    return stages


def _stage_value(stage: Tensor | int, key: str, num_stages: int) -> int:
    """The stage as an int, or ValueError unless it is one integer in ``[0, num_stages]``."""
    if isinstance(stage, Tensor):
        if stage.numel() != 1:
            raise ValueError(f"{key} must hold one value, got shape {tuple(stage.shape)}")
        if stage.is_complex() or stage.dtype == torch.bool:
            raise ValueError(f"{key} must be an integer, got dtype {stage.dtype}")
        value = stage.detach().reshape(()).double().item()
    elif is_int(stage):
        value = float(stage)
    else:
        raise ValueError(f"{key} must be an integer, got {stage!r}")
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if not 0 <= value <= num_stages:
        raise ValueError(
            f"{key} must lie in [0, condense_factor - 1] = [0, {num_stages}], got {int(value)}"
        )
    return int(value)


def check_condensation_state(
    mask: Tensor,
    stage: Tensor | int,
    *,
    learned_groups: int,
    condense_factor: int,
    mask_key: str = "mask",
    stage_key: str = "stage",
) -> None:
    """ValueError, naming the key and the rule, unless ``(mask, stage)`` is a reachable state.

    The rules :meth:`LearnedGroupConv2d.set_progress` keeps: ``mask`` ``(Cout, Cin)`` holds only
    0/1 (or booleans); the rows of one group (output channels ``o`` with equal ``o mod G``)
    are equal; ``stage`` is one integer in ``[0, C - 1]``; and after ``stage`` stages every
    group reads ``Cin - stage * (Cin / C)`` inputs. A mask that breaks them would make the
    deployed layer (which reads each group's first row) differ from the layer.
    """
    if mask.dim() != 2:
        raise ValueError(f"{mask_key} must be (out_channels, in_channels), got {tuple(mask.shape)}")
    cout, cin = mask.shape
    groups = learned_groups
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{mask_key} must hold only 0 and 1 (or booleans)")
        mask = mask == 1
    num_stages = condense_factor - 1
    value = _stage_value(stage, stage_key, num_stages)
    rows = mask.reshape(cout // groups, groups, cin)
    if not bool((rows == rows[:1]).all()):
        raise ValueError(
            f"{mask_key}: the rows of a group (output channels o with equal o mod "
            f"learned_groups={groups}) must be equal; a learned group reads one set of inputs"
        )
    kept = rows[0].sum(dim=1)
    expected = cin - value * (cin // condense_factor)
    if not bool((kept == expected).all()):
        raise ValueError(
            f"{mask_key} and {stage_key} disagree: at stage {value} every group reads "
            f"in_channels - stage * in_channels / condense_factor = {expected} inputs, but the "
            f"groups read {kept.tolist()}"
        )


@register_family("lgc")
class LearnedGroupConv2d(DynaConv2d):
    """Learned group convolution (drop-in for ``nn.Conv2d`` with ``groups=1``).

    Args: those of ``nn.Conv2d`` (``groups`` must be 1: the groups are learned), plus

    * ``learned_groups`` (G, default 4): groups after condensation; ``out_channels`` must be
      divisible by it.
    * ``condense_factor`` (C, default ``learned_groups``): each group keeps ``Cin / C`` inputs
      in the end; ``in_channels`` must be divisible by it.
    * ``dropout`` (default 0): dropout probability on the layer input in training.
    * ``reference_lasso`` (default False): the reference's group lasso verbatim (module
      docstring), for networks that must train as the reference does.

    Loading a state dict checks that ``mask`` and ``stage`` are a state condensation can reach
    (:func:`check_condensation_state`) and raises ``ValueError`` naming the key otherwise.
    """

    title = "LGC"
    conv_groups = "one"
    static_kernel = True
    example_options = MappingProxyType({"learned_groups": 4, "condense_factor": 4})
    # CondenseNet's group lasso is off in its CIFAR recipe (docs/methods.md).
    example_aux_loss_weight = 0.0

    def _init_family(
        self,
        device: Any,
        dtype: Any,
        *,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        dropout: float = 0.0,
        reference_lasso: bool = False,
    ) -> None:
        s = self.spec
        in_channels, out_channels, groups, bias = s.in_channels, s.out_channels, s.groups, s.bias
        self.reference_lasso = check_bool(reference_lasso, "reference_lasso")
        if groups != 1:
            raise ValueError(
                f"groups must be 1 for LearnedGroupConv2d (the groups are learned: set "
                f"learned_groups), got {groups}"
            )
        self.learned_groups = check_int(learned_groups, "learned_groups")
        factor = learned_groups if condense_factor is None else condense_factor
        self.condense_factor = check_int(factor, "condense_factor")
        check_divisible(out_channels, "out_channels", self.learned_groups, "learned_groups")
        check_divisible(in_channels, "in_channels", self.condense_factor, "condense_factor")
        self.dropout = check_number(dropout, "dropout", lambda d: 0 <= d < 1, "a number in [0, 1)")
        factory = {"device": device, "dtype": dtype}
        self.dense_weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.spec.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.register_buffer(
            "mask", torch.ones(out_channels, in_channels, dtype=torch.bool, device=device)
        )
        self.register_buffer("stage", torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CondenseNet's init: normal(0, sqrt(2 / (kh * kw * Cout))), bias 0; mask all ones."""
        fan_out = self.spec.kernel_numel * self.spec.out_channels
        with torch.no_grad():
            self.dense_weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if self.bias is not None:
                self.bias.zero_()
            self.mask.fill_(True)
            self.stage.zero_()

    # ---------------------------------------------------------------------------------------
    # structure

    @property
    def num_stages(self) -> int:
        """Condensation stages: ``C - 1``."""
        return self.condense_factor - 1

    @property
    def drop_per_stage(self) -> int:
        """Input columns every group drops per stage: ``Cin / C``."""
        return self.spec.in_channels // self.condense_factor

    @property
    def weight(self) -> Tensor:
        """The effective (masked) kernel ``(Cout, Cin, kh, kw)``."""
        return self.dense_weight * self.mask[:, :, None, None].to(self.dense_weight.dtype)

    def group_mask(self) -> Tensor:
        """``(G, Cin)`` boolean: the input columns each group reads."""
        return self.mask[: self.learned_groups]

    def kept_per_group(self) -> int:
        counts = self.group_mask().sum(1)
        if not bool((counts == counts[0]).all()):
            raise RuntimeError(f"groups keep unequal numbers of inputs: {counts.tolist()}")
        return int(counts[0])

    def column_importance(self) -> Tensor:
        """``(G, Cin)``: sum over each group's rows and kernel taps of ``|weight|``."""
        per_connection = self.weight.detach().abs().sum(dim=(2, 3))  # (Cout, Cin)
        d_out = self.spec.out_channels // self.learned_groups
        return per_connection.view(d_out, self.learned_groups, -1).sum(0)

    # ---------------------------------------------------------------------------------------
    # schedule

    def set_progress(self, progress: float) -> None:
        """Condense up to the stage of ``progress``, dropping once per stage crossed.

        Masks never grow back: a progress earlier than the current stage changes nothing.
        """
        target = condensation_stage(check_progress(progress), self.condense_factor)
        while int(self.stage) < target:
            self._drop(self.drop_per_stage)
            self.stage += 1

    @torch.no_grad()
    def _drop(self, delta: int) -> None:
        importance = self.column_importance()
        groups = self.learned_groups
        for g in range(groups):
            live = self.mask[g].nonzero().flatten()
            order = torch.sort(importance[g, live], stable=True).indices
            dropped = live[order[:delta]]
            self.mask[g::groups, dropped] = False

    # ---------------------------------------------------------------------------------------
    # forward, regulariser

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        if self.dropout > 0.0 and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return self.spec.conv2d(x, self.weight, self.bias)

    def aux_loss(self) -> Tensor:
        """Group lasso of the kept columns; zero once condensation is complete.

        With ``reference_lasso``: the reference's sum over every column (a dropped one adds
        ``sqrt(1e-6)``), zero from stage ``G - 1`` on.
        """
        weight = self.dense_weight
        last = self.learned_groups - 1 if self.reference_lasso else self.num_stages
        if int(self.stage) >= last:
            return weight.new_zeros(())
        d_out = self.spec.out_channels // self.learned_groups
        squares = self.weight.pow(2).sum(dim=(2, 3))
        per_column = squares.view(d_out, self.learned_groups, -1).sum(0)  # (G, Cin)
        norms = per_column.clamp(min=LASSO_FLOOR).sqrt()
        if self.reference_lasso:
            return norms.sum()
        return (norms * self.group_mask().to(norms.dtype)).sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        mask_key, stage_key = f"{prefix}mask", f"{prefix}stage"
        if mask_key in state_dict or stage_key in state_dict:
            mask = state_dict.get(mask_key, self.mask)
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.mask.shape):
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(
                    f"{mask_key} must have shape (out_channels, in_channels) = "
                    f"{tuple(self.mask.shape)}, got {shape}"
                )
            check_condensation_state(
                mask,
                state_dict.get(stage_key, self.stage),
                learned_groups=self.learned_groups,
                condense_factor=self.condense_factor,
                mask_key=mask_key,
                stage_key=stage_key,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    # deploy, conversion, counts

    def deploy(self) -> CondensedGroupConv2d:
        """The exact index layer (gather, grouped conv, outputs back in interleaved order)."""
        return CondensedGroupConv2d.from_learned(self)

    @classmethod
    def _conversion(
        cls,
        conv: nn.Conv2d,
        *,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        dropout: float = 0.0,
    ) -> dict[str, Any]:
        """An LGC starting equal to ``conv`` (mask all ones, its weights kept)."""
        check_int(learned_groups, "learned_groups")  # before any arithmetic
        factor = learned_groups if condense_factor is None else condense_factor
        check_int(factor, "condense_factor")
        if conv.out_channels % learned_groups or conv.in_channels % factor:
            raise ConversionSkipped(
                f"{conv.in_channels}->{conv.out_channels} channels do not divide into "
                f"learned_groups={learned_groups} / condense_factor={factor}"
            )
        if conv.in_channels // factor == 0 or conv.in_channels == 1:
            raise ConversionSkipped("too few input channels to condense")
        return {
            "learned_groups": learned_groups,
            "condense_factor": condense_factor,
            "dropout": dropout,
        }

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        self.dense_weight.copy_(conv.weight)
        if conv.bias is not None:
            self.bias.copy_(conv.bias)

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        """Dense: the conv; active: its kept connections. ``convention="reference"``:
        CondenseNet's counter, the conv's MACs at ``1 / C``, whatever the stage."""
        dense = self.spec.dense_macs(output_shape)
        if convention == "reference":
            return MacCount(dense // self.condense_factor, dense // self.condense_factor)
        kept = int(self.mask.sum())
        return MacCount(dense, dense * kept // self.mask.numel())

    def count_params(self, convention: Convention = "dense") -> int:
        """The stored parameters; ``convention="reference"``: CondenseNet's counter, the
        weights at ``1 / C`` whatever the stage (and the bias)."""
        if convention != "reference":
            return super().count_params(convention)
        params = self.dense_weight.numel() // self.condense_factor
        return params + (0 if self.bias is None else self.bias.numel())

    def structure(self) -> str:
        kept = int(self.group_mask().sum(1)[0])
        return (
            f"G={self.learned_groups} C={self.condense_factor} stage {int(self.stage)}/"
            f"{self.num_stages}, {kept}/{self.spec.in_channels} inputs per group"
        )

    def extra_repr(self) -> str:
        extra = f"learned_groups={self.learned_groups}, condense_factor={self.condense_factor}"
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.reference_lasso:
            extra += ", reference_lasso=True"
        return f"{super().extra_repr()}, {extra}"
