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

:meth:`LearnedGroupConv2d.deploy` returns a :class:`CondensedGroupConv2d`, the exact "index
layer": gather the ``G * K`` kept inputs (``K`` per group), a grouped convolution with ``G``
groups, then the outputs put back in interleaved order. It can also fold the BN-ReLU before
it (on the gathered channels) and the BN-ReLU after it (CondenseNet's next layer) into
per-channel scales and shifts, and runs on CUDA as one fused Triton kernel that reads the
input through the index and writes the output in its final channel order.

Shapes: input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` as ``nn.Conv2d``.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import register_family
from ._base import (
    Convention,
    ConversionSkipped,
    ConvSpec,
    DynaConv2d,
    MacCount,
    Shape,
    check_input,
    check_progress,
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

Impl = Literal["auto", "torch", "triton"]
_IMPLS = ("auto", "torch", "triton")
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
    elif isinstance(stage, int) and not isinstance(stage, bool):
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


def check_gather_index(index: Tensor, in_channels: int, key: str = "index") -> None:
    """ValueError, naming ``key``, unless ``index`` holds integers in ``[0, in_channels)``."""
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{key} must hold integer channel indices, got dtype {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= in_channels):
        raise ValueError(
            f"{key} entries must lie in [0, in_channels) = [0, {in_channels}), got values in "
            f"[{int(index.min())}, {int(index.max())}]"
        )


def fold_batchnorm(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``norm(x) == x * scale + shift`` in eval mode."""
    if norm.running_var is None or norm.running_mean is None:
        raise ValueError("fold_batchnorm needs a BatchNorm2d with running statistics")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale.detach(), shift.detach()


def _tracing() -> bool:
    """Whether torch.compile or torch.export is tracing (no cached buffers then)."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or is_exporting()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@register_family(
    "lgc",
    demo_options={"learned_groups": 4, "condense_factor": 4},
    # CondenseNet's group lasso is off in its CIFAR recipe (docs/methods.md).
    aux_loss_weight=0.0,
    structure_plot="binary",
)
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
        if not isinstance(reference_lasso, bool):
            raise ValueError(f"reference_lasso must be a bool, got {reference_lasso!r}")
        self.reference_lasso = reference_lasso
        if groups != 1:
            raise ValueError(
                f"groups must be 1 for LearnedGroupConv2d (the groups are learned: set "
                f"learned_groups), got {groups}"
            )
        self.learned_groups = _positive_int(learned_groups, "learned_groups")
        factor = learned_groups if condense_factor is None else condense_factor
        self.condense_factor = _positive_int(factor, "condense_factor")
        if out_channels % self.learned_groups:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by learned_groups "
                f"({self.learned_groups})"
            )
        if in_channels % self.condense_factor:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by condense_factor "
                f"({self.condense_factor})"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
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

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        factor = learned_groups if condense_factor is None else condense_factor
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


class GatherWorkspace:
    """Reusable CPU buffers for gathered inputs, one per calling thread.

    A fresh CPU tensor of tens of MB costs more in page faults than the gather itself (the CPU
    allocator returns large blocks to the system), so on CPU the index layer gathers into a
    buffer kept here. A deployed network shares one workspace among its index layers (they
    run one after the other). Inference only: the buffer is overwritten by the next call.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}

    def get(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        key = threading.get_ident()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


class CondensedGroupConv2d(nn.Module):
    """The deployed LGC ("index layer"), optionally with the BN-ReLU around it folded in.

    ``y = post(order(conv_G(pre(x[:, index]))))`` where

    * ``index`` ``(G * K,)``: the kept input channels, group by group;
    * ``pre(v) = relu?(v * in_scale + in_shift)`` per gathered channel (a folded BN-ReLU, or
      nothing);
    * ``conv_G``: grouped convolution, ``weight`` ``(Cout, K, kh, kw)``, group-major outputs;
    * ``order``: with ``interleave`` the group-major output ``g * (Cout / G) + n`` goes to
      channel ``n * G + g`` (the LGC's interleaved order); without it the group-major order is
      kept (the next layer's input channels were permuted instead);
    * ``post(v) = relu?(v * out_scale + out_shift)`` per output channel (the next layer's
      folded BN-ReLU, in output order, or nothing).

    ``impl``: ``"torch"`` (index_select, grouped conv), ``"triton"`` (one fused kernel reading
    ``x`` through the index, 1x1 stride-1 unpadded kernels only) or ``"auto"`` (Triton on CUDA
    when it applies). Inference only: the folded BNs use their running statistics.
    """

    def __init__(
        self,
        in_channels: int,
        spec: ConvSpec,
        index: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        learned_groups: int,
        interleave: bool = True,
        in_scale: Tensor | None = None,
        in_shift: Tensor | None = None,
        in_relu: bool = False,
        out_scale: Tensor | None = None,
        out_shift: Tensor | None = None,
        out_relu: bool = False,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        groups = _positive_int(learned_groups, "learned_groups")
        cout, per_group = weight.shape[:2]
        if cout % groups or index.numel() != groups * per_group:
            raise ValueError(
                f"index ({index.numel()}) must hold learned_groups x weight.shape[1] "
                f"({groups} x {per_group}) channels and weight.shape[0] ({cout}) divide by "
                f"learned_groups"
            )
        if (in_scale is None) != (in_shift is None) or (out_scale is None) != (out_shift is None):
            raise ValueError("scales and shifts come in pairs")
        if (in_relu and in_scale is None) or (out_relu and out_scale is None):
            raise ValueError("in_relu/out_relu need the corresponding scale and shift")
        self.in_channels = _positive_int(in_channels, "in_channels")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= in_channels):
            raise ValueError(f"index entries must lie in [0, in_channels={in_channels})")
        self.spec = spec
        self.learned_groups = groups
        self.interleave = bool(interleave)
        self.in_relu = bool(in_relu)
        self.out_relu = bool(out_relu)
        self.impl = impl
        self.register_buffer("index", index.detach().to(torch.long).clone())
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

        def param(t: Tensor | None) -> nn.Parameter | None:
            return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False)

        self.in_scale, self.in_shift = param(in_scale), param(in_shift)
        self.out_scale, self.out_shift = param(out_scale), param(out_shift)
        self.workspace = GatherWorkspace()
        # CPU PyTorch path with a folded BN-ReLU after the layer: produce channels-last output
        # (set by CondenseNet's deploy: its grouped 3x3 convs are about 2x faster on it)
        self.channels_last_output = False
        self.refresh()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    def refresh(self) -> None:
        """Re-derive what ``index``, the folded BatchNorm and the kernel imply: the identity-gather
        and positive-scale flags and the 1x1 path's folded BN-ReLU. Eager forwards do it by
        themselves whenever one of those tensors was replaced (loading, ``functional_call``) or
        written in place; traced graphs use the module as traced. A deployed module is static:
        after an edit through ``.data`` (which changes no version counter) call ``refresh()``."""
        n = self.in_channels
        self._positive_scales = self.in_scale is not None and bool((self.in_scale > 0).all())
        self._identity_gather = bool(
            self.index.numel() == n and torch.equal(self.index.cpu(), torch.arange(n))
        )
        self._fold_pre_into_pointwise()
        self._flags_key = self._flags_source()

    def _fold_pre_into_pointwise(self) -> None:
        """Precompute the 1x1 path's folded BN-ReLU (once, not on every forward).

        For a kept channel with scale ``s`` and shift ``t``, ``relu(s v + t)`` is
        ``s max(v, -t/s) + t`` for ``s > 0`` (``min`` for ``s < 0``; ``max(t, 0)`` for
        ``s = 0``), so the conv runs on the clamped input with the kernel ``W s`` and the bias
        ``b + W t'`` (``t' = t``, or ``max(t, 0)`` where ``s = 0``). Buffers, not saved: they
        follow the module across devices and dtypes and are re-derived on loading.
        """
        folded = {"_pre_low": None, "_pre_high": None, "_pre_weight": None, "_pre_bias": None}
        if self._pointwise() and self.in_scale is not None and self.in_relu:
            with torch.no_grad():
                groups, cout = self.learned_groups, self.out_channels
                weight = self.weight.reshape(groups, cout // groups, -1)
                scale, shift = self.in_scale, self.in_shift
                threshold = torch.where(scale != 0, -shift / scale, torch.zeros_like(shift))
                inf = torch.full_like(shift, math.inf)
                folded["_pre_low"] = torch.where(scale > 0, threshold, -inf)[:, None, None]
                folded["_pre_high"] = torch.where(scale < 0, threshold, inf)[:, None, None]
                constant = torch.where(scale == 0, shift.clamp(min=0), shift)
                bias = torch.matmul(weight, constant.view(groups, -1, 1))
                if self.bias is not None:
                    bias = bias + self.bias.view(groups, -1, 1)
                folded["_pre_bias"] = bias
                folded["_pre_weight"] = weight * scale.view(groups, 1, -1)
        for name, value in folded.items():
            self.register_buffer(name, value, persistent=False)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = f"{prefix}index"
        index = state_dict.get(key)
        if isinstance(index, Tensor):
            check_gather_index(index, self.in_channels, key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _flags_source(self) -> tuple[Any, ...]:
        # Identity and in-place version of the tensors the derived state comes from.
        sources = (self.index, self.in_scale, self.in_shift, self.weight, self.bias)
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in sources)

    def _check_flags(self) -> None:
        if not _tracing() and self._flags_key != self._flags_source():
            self.refresh()

    @classmethod
    def from_learned(
        cls,
        layer: LearnedGroupConv2d,
        *,
        pre_norm: nn.BatchNorm2d | None = None,
        pre_relu: bool = False,
        impl: Impl = "auto",
    ) -> CondensedGroupConv2d:
        """The index layer of ``layer`` (with ``pre_norm``/``pre_relu`` folded in, if given)."""
        groups = layer.learned_groups
        kept = layer.kept_per_group()
        group_mask = layer.group_mask()
        index = torch.cat([group_mask[g].nonzero().flatten() for g in range(groups)])
        cout = layer.spec.out_channels
        d_out = cout // groups
        dense = layer.dense_weight.detach()
        # group-major output p = g * d_out + n  <-  interleaved channel o = n * G + g
        source = torch.arange(cout, device=dense.device).view(d_out, groups).t().reshape(-1)
        columns = index.view(groups, kept).repeat_interleave(d_out, dim=0)  # (Cout, K)
        weight = dense[source[:, None], columns]
        bias = None if layer.bias is None else layer.bias.detach()[source]
        in_scale = in_shift = None
        if pre_norm is not None:
            scale, shift = fold_batchnorm(pre_norm)
            in_scale, in_shift = scale[index], shift[index]
        elif pre_relu:
            raise ValueError("pre_relu needs pre_norm")
        return cls(
            layer.spec.in_channels,
            layer.spec.with_channels(groups * kept, cout, groups),
            index,
            weight,
            bias,
            learned_groups=groups,
            interleave=True,
            in_scale=in_scale,
            in_shift=in_shift,
            in_relu=pre_relu,
            impl=impl,
        )

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def output_source(self) -> Tensor:
        """For each output channel, the group-major position it comes from."""
        cout, groups = self.out_channels, self.learned_groups
        positions = torch.arange(cout, device=self.index.device)
        if not self.interleave:
            return positions
        d_out = cout // groups
        return (positions % groups) * d_out + positions // groups

    def set_output_post(
        self, scale: Tensor, shift: Tensor, relu: bool, *, interleave: bool | None = None
    ) -> None:
        """Fold a per-channel affine (and ReLU) after the layer, given in output order."""
        if interleave is not None:
            self.interleave = bool(interleave)
        self.out_scale = nn.Parameter(scale.detach().clone(), requires_grad=False)
        self.out_shift = nn.Parameter(shift.detach().clone(), requires_grad=False)
        self.out_relu = bool(relu)

    # ---------------------------------------------------------------------------------------

    def _use_triton(self, x: Tensor) -> bool:
        if self.impl == "torch":
            return False
        from ..kernels import lgc as kernels

        supported = kernels.supports(self, x)
        if self.impl == "triton":
            if not supported:
                raise RuntimeError(
                    "impl='triton' needs triton, a CUDA tensor (or TRITON_INTERPRET=1 on CPU) "
                    "and a 1x1, stride-1, unpadded kernel"
                )
            return True
        from ..kernels import interpreting

        return supported and x.is_cuda and not interpreting()

    def forward(self, x: Tensor, *, prefix: bool = False) -> Tensor:
        """The layer on ``x`` ``(B, in_channels, H, W)``.

        With ``prefix=True``, ``x`` may have more channels and the layer reads its first
        ``in_channels`` in place: a dense block keeps its features in one buffer, and gathering
        from the whole (contiguous) buffer is the same gather, much faster on CPU than from a
        strided channel slice.
        """
        self._check_flags()
        if prefix and x.dim() == 4 and x.shape[1] > self.in_channels:
            if self._identity_gather:
                x = x[:, : self.in_channels]
        else:
            check_input(x, self.in_channels, type(self).__name__)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        if x.shape[0] > 0 and self._use_triton(x):  # an empty batch has no work to launch
            from ..kernels import lgc as kernels

            return kernels.condensed_conv(self, x)
        return self.forward_torch(x)

    def forward_torch(self, x: Tensor) -> Tensor:
        """The plain PyTorch path: index_select, folded BN-ReLU, grouped conv, reorder.

        A 1x1 stride-1 unpadded conv runs as one batched matmul over ``(batch, group)`` (CPU
        grouped convs are much slower), a folded BN-ReLU before it as a single clamp (for
        ``s > 0``, ``relu(s v + t) = s max(v, -t/s) + t``, ``min`` for ``s < 0``, with ``s``
        folded into the weight and ``t`` into a bias), and the BN-ReLU after it writes its
        result straight into the interleaved channel order.
        """
        if self._pointwise():
            return self._pointwise_forward(x)
        return self._apply_post(self._conv_forward(x))

    def _apply_post(self, y: Tensor) -> Tensor:
        if self.out_scale is not None:
            y = torch.addcmul(self.out_shift[:, None, None], y, self.out_scale[:, None, None])
            if self.out_relu:
                y = y.relu_()
        return y

    def _gather(self, x: Tensor) -> Tensor:
        if self._identity_gather:
            return x
        reuse = (
            x.device.type == "cpu"
            and not _tracing()
            and not (torch.is_grad_enabled() and x.requires_grad)
        )
        if not reuse:
            return x.index_select(1, self.index)
        batch, _, height, width = x.shape
        buffer = self.workspace.get((batch, self.index.numel(), height, width), x)
        return torch.index_select(x, 1, self.index, out=buffer)

    def _conv_forward(self, x: Tensor) -> Tensor:
        gathered = self._gather(x)
        if self.in_scale is not None:
            gathered = torch.addcmul(
                self.in_shift[:, None, None], gathered, self.in_scale[:, None, None]
            )
            if self.in_relu:
                gathered = gathered.relu_()
        y = self.spec.conv2d(gathered, self.weight, self.bias, groups=self.learned_groups)
        if self.interleave and self.learned_groups > 1:
            batch, cout, height, width = y.shape
            d_out = cout // self.learned_groups
            y = y.view(batch, self.learned_groups, d_out, height, width).transpose(1, 2)
            y = y.reshape(batch, cout, height, width)
        return y

    def _pointwise_forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        groups, cout = self.learned_groups, self.out_channels
        d_out = cout // groups
        weight = self.weight.reshape(groups, d_out, -1)
        bias = None if self.bias is None else self.bias.view(groups, d_out, 1)
        gathered = self._gather(x)
        if self._pre_weight is not None:  # folded BN-ReLU (see _fold_pre_into_pointwise)
            if gathered is x:
                gathered = x.clone()
            if self._positive_scales:  # the usual case: a one-sided clamp is much faster
                gathered = gathered.clamp_min_(self._pre_low)
            else:
                gathered = gathered.clamp_(self._pre_low, self._pre_high)
            weight, bias = self._pre_weight, self._pre_bias
        elif self.in_scale is not None:
            gathered = torch.addcmul(
                self.in_shift[:, None, None], gathered, self.in_scale[:, None, None]
            )
        per_group = weight.shape[-1]  # explicit sizes: an empty batch has no -1 to infer
        columns = gathered.reshape(batch * groups, per_group, height * width)
        weight = weight.expand(batch, -1, -1, -1).reshape(batch * groups, d_out, per_group)
        if bias is None:
            y = torch.bmm(weight, columns)
        else:
            bias = bias.expand(batch, -1, -1, -1).reshape(batch * groups, d_out, 1)
            y = torch.baddbmm(bias, weight, columns)
        y = y.view(batch, groups, d_out, height * width)
        if self.out_scale is None or _tracing():
            if self.interleave:
                y = y.transpose(1, 2)  # (B, d_out, G, HW): channel n * G + g
            return self._apply_post(y.reshape(batch, cout, height, width))
        channels_last = self.channels_last_output and x.device.type == "cpu"
        result = torch.empty(
            batch,
            cout,
            height,
            width,
            dtype=y.dtype,
            device=y.device,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        )
        # (B, channel, HW) view of the result, whatever its memory format
        flat = result.permute(0, 2, 3, 1).view(batch, height * width, cout).transpose(1, 2)
        if self.interleave:  # write group-major results at channel n * G + g
            target = flat.reshape(batch, d_out, groups, height * width).transpose(1, 2)
            scale = self.out_scale.view(d_out, groups).t()
            shift = self.out_shift.view(d_out, groups).t()
        else:
            target = flat.reshape(batch, groups, d_out, height * width)
            scale = self.out_scale.view(groups, d_out)
            shift = self.out_shift.view(groups, d_out)
        torch.addcmul(shift[..., None], y, scale[..., None], out=target)
        return result.relu_() if self.out_relu else result

    def _pointwise(self) -> bool:
        s = self.spec
        return (
            s.kernel_size == (1, 1)
            and s.stride == (1, 1)
            and s.padding in ((0, 0), "same", "valid")
            and s.padding_mode == "zeros"
        )

    # ---------------------------------------------------------------------------------------
    # counts

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        """The grouped conv's MACs. ``convention="reference"``: what CondenseNet's counter
        reports for the modules folded here: the grouped conv's MACs, and for a folded BN-ReLU
        before it one op per gathered element (its ReLU), likewise for a folded BN-ReLU after
        it, per output element (:meth:`count_params` counts their parameters).
        """
        macs = self.spec.dense_macs(output_shape)
        if convention != "reference":
            return MacCount(macs, macs)
        batch, _, height, width = input_shape
        if self.in_scale is not None and self.in_relu:
            macs += batch * self.index.numel() * height * width
        if self.out_scale is not None and self.out_relu:
            macs += math.prod(output_shape)
        return MacCount(macs, macs)

    def count_params(self, convention: Convention = "dense") -> int:
        """The stored parameters; ``convention="reference"``: what CondenseNet's counter
        reports: the grouped conv's weights, and 2 per channel of a folded BN before it
        (per gathered channel) and after it (per output channel)."""
        if convention != "reference":
            return sum(p.numel() for p in self.parameters())
        params = self.weight.numel() + (0 if self.bias is None else self.bias.numel())
        if self.in_scale is not None:
            params += 2 * self.in_scale.numel()
        if self.out_scale is not None:
            params += 2 * self.out_scale.numel()
        return params

    def extra_repr(self) -> str:
        s = self.spec
        parts = [
            f"gather {self.index.numel()} of {self.in_channels}",
            f"-> {self.out_channels}",
            f"kernel_size={s.kernel_size}, groups={self.learned_groups}",
            f"interleave={self.interleave}",
        ]
        if self.in_scale is not None:
            parts.append("pre=BN" + ("-ReLU" if self.in_relu else ""))
        if self.out_scale is not None:
            parts.append("post=BN" + ("-ReLU" if self.out_relu else ""))
        parts.append(f"impl={self.impl!r}")
        return ", ".join(parts)
