"""Honest parameter and MAC counts: stored, deployed, dense and active.

Counting conventions (``convention="dense"``, the default):

* ``params``: parameters stored in the model (``numel`` of every ``nn.Parameter``; buffers
  such as masks, gates and indices are not parameters).
* ``params_deployed``: parameters of ``dynaconv.deploy(model)``: what inference keeps.
* ``macs``: dense multiply-accumulates of one forward at ``input_shape`` (the batch in
  ``input_shape`` included), counted per module call: convolutions (any ``nn.ConvNd``)
  ``B * Cout * Cin/groups * kh * kw * H' * W'`` (transposed: per input position), ``nn.Linear``
  ``in * out`` per row, and for each dynaconv layer the ``nn.Conv2d`` it stands for plus the
  layer's own small layers (CondConv's routing, DGC's saliency generators). Bias
  additions, normalisation, activations, pooling, element-wise ops and tensor operations
  written outside modules count nothing, as in ``FlopCounterMode`` (whose FLOPs are exactly
  2 x these MACs for a deployed network of convs and linears). DO-Conv's kernel composition is
  not counted: ``deploy`` folds it into the kernel once (the training and eval-mode layers
  recompute it each forward; it is weight-sized work, independent of the batch and image).
* ``macs_active``: what really has to be computed: DGC's kept channels, DGConv's learned
  groups, LGC's kept connections, plus CondConv's kernel mixing (``B * E * numel(W_e)``).
  Equal to ``macs`` for plain modules.
* A module of a type not listed above that holds parameters of its own (a layer from another
  library, e.g. timm's ``CondConv2d``) is counted by ``torch.utils.flop_counter``: its call is
  replayed under ``FlopCounterMode`` and its MACs (dense and active) are half the FLOPs of
  its own operations (those of its child modules are counted with them). Its row says
  ``counted by torch.utils.flop_counter`` and the table's last line names it, so nothing with
  parameters is silently counted as zero. Normalisation layers, ``PReLU`` and ``Embedding``
  count nothing by the rule above.
* A module with its own ``count_macs(input_shape, output_shape, convention="dense")`` method
  returning a :class:`~dynaconv.layers.MacCount` ``(dense, active)`` (every dynaconv layer,
  and deployed modules that need one) is counted as a whole, in both conventions; what it
  contains is not counted again. Its parameters are its ``count_params(convention)`` where it
  has one, else its stored ones. (A ``count_macs(input_shape, output_shape)`` without
  ``convention`` counts one way for both; a plain ``(dense, active)`` tuple is accepted.)

``convention="reference"`` reproduces the counter of the papers' repositories
(CondenseNet's ``measure_model``, used by DGC too). Use it to compare with published numbers.
What that counter counts (it hooks the leaf modules of one forward):

* ``Conv2d``: ``Cin * Cout * kh * kw * H' * W' / groups`` and its weights; ``Linear``:
  ``in * out + out`` per row; ``ReLU``: one op per input element; ``AvgPool2d``/``MaxPool2d``:
  ``k * k`` per output element; ``AdaptiveAvgPool2d``: one per input element; ``BatchNorm2d``:
  no ops, its weight and bias as parameters; dropout, concatenation, indexing, reshapes:
  nothing.
* A module's ``count_macs(..., convention="reference")`` and ``count_params("reference")``
  give its own count under this convention, for itself and what it contains (CondenseNet's
  learned group conv counts ``1 / C`` of its dense conv, ops and weights alike, whatever its
  condensation stage; deployed modules that fold a BN-ReLU into a conv report what the
  reference would have counted for them; DGC counts its heads at ``gate_factor``, a
  fraction). ``params`` is then the reference's parameter count: the stored parameters, with
  those modules counted their way; ``params_deployed`` stays the stored parameters of the
  deployed model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.flop_counter import FlopCounterMode

from .layers._base import Convention, DynaConv2d, MacCount
from .lifecycle import deploy, eval_mode
from .spec import is_int

__all__ = ["Convention", "LayerProfile", "MacCount", "Profile", "profile"]


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

    Every count is an ``int``. The reference convention's rules can give a layer a fraction of
    a MAC (DGC's heads at ``gate_factor``): a row shows it rounded, and the totals are the exact
    sums rounded once (so they can differ from the sum of the rows by less than one per row).

    ``layers`` (also the attribute ``.layers``) is the per-layer breakdown; ``str()`` of a
    profile is a table.
    """

    def __init__(self, layers: list[LayerProfile], **totals: int) -> None:
        super().__init__(totals, layers=layers)

    @property
    def layers(self) -> list[LayerProfile]:
        return self["layers"]

    def __str__(self) -> str:
        header = (
            f"{'layer':40s} {'type':22s} {'output':>18s} {'params':>10s} {'MACs':>14s} "
            f"{'active MACs':>14s}  structure"
        )
        lines = [header, "-" * len(header)]
        for row in self.layers:
            output = "x".join(map(str, row.output_shape[1:]))
            lines.append(
                f"{row.name[-40:]:40s} {row.kind[:22]:22s} {output:>18s} {row.params:>10,d} "
                f"{row.macs:>14,d} {row.macs_active:>14,d}  {row.structure}".rstrip()
            )
        lines.append("-" * len(header))
        lines.append(
            f"params {self['params']:,d} (deployed {self['params_deployed']:,d})  "
            f"MACs {self['macs']:,d} (active {self['macs_active']:,d})"
        )
        if self.flop_counted:
            lines.append(
                f"counted by torch.utils.flop_counter ({len(self.flop_counted)} layers of types "
                f"without a MAC rule): {', '.join(self.flop_counted)}"
            )
        return "\n".join(lines)

    @property
    def flop_counted(self) -> list[str]:
        """Names of the layers counted by ``torch.utils.flop_counter`` (no rule of their own)."""
        return [row.name for row in self.layers if row.structure == FLOP_COUNTED]


#: The ``structure`` of a row counted by ``torch.utils.flop_counter``.
FLOP_COUNTED = "counted by torch.utils.flop_counter"

#: Modules with parameters that count no MACs (normalisation, per-channel slopes, lookups).
_NO_MACS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.PReLU,
    nn.Embedding,
)


def _direct_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _conv_macs(module: _ConvNd, input_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """Dense MACs of any ``nn.ConvNd`` (transposed too): every weight meets every position."""
    weight_per_position = _prod(module.weight.shape)  # Cout * Cin/groups * kernel (or transposed)
    if module.transposed:  # each input position is scattered through the whole kernel
        return input_shape[0] * weight_per_position * _prod(input_shape[2:])
    return output_shape[0] * weight_per_position * _prod(output_shape[2:])


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


def _has(module: nn.Module, method: str) -> bool:
    return callable(getattr(module, method, None))


def _counts_itself(module: nn.Module) -> bool:
    """Modules counted as a whole: dynaconv layers, and those with their own count."""
    return isinstance(module, DynaConv2d) or _has(module, "count_macs")


def own_count(
    module: nn.Module,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    convention: Convention = "dense",
) -> MacCount:
    """``module.count_macs`` in ``convention`` as a :class:`MacCount` (see the module docstring)."""
    count_macs = module.count_macs
    if "convention" in inspect.signature(count_macs).parameters:
        counted = count_macs(input_shape, output_shape, convention=convention)
    else:  # a module that counts one way for both conventions
        counted = count_macs(input_shape, output_shape)
    return MacCount(*counted)


def _whole(value: int | float) -> int | float:
    """Counts are whole numbers, except the fractions of the reference convention's rules
    (kept exact for the totals, which are rounded once: see :func:`profile`)."""
    return value if isinstance(value, float) and not value.is_integer() else int(value)


@dataclass
class _Measured:
    params: int
    macs: int
    macs_active: int
    structure: str = ""
    params_adjustment: int = 0  # reference parameters minus stored ones


def _needs_flop_counter(module: nn.Module) -> bool:
    """A module with parameters of its own and no MAC rule (module docstring)."""
    return (
        not isinstance(module, (_ConvNd, nn.Linear, *_NO_MACS))
        and not _counts_itself(module)
        and _direct_params(module) > 0
    )


def _own_macs_by_flop_counter(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> int:
    """Half the FLOPs ``FlopCounterMode`` counts for ``module(*args, **kwargs)``, without
    those of its direct children (each counted by its own rule)."""
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    counts = counter.get_flop_counts()
    root = type(module).__name__
    children = {f"{root}.{name}" for name, _ in module.named_children()}
    flops = sum(counts.get("Global", {}).values()) - sum(
        sum(ops.values()) for key, ops in counts.items() if key in children
    )
    return int(flops) // 2


def _measure(
    module: nn.Module,
    inp: torch.Tensor | None,
    output: torch.Tensor,
    convention: Convention,
) -> _Measured:
    """The counts of one call of ``module`` (not for those :func:`_needs_flop_counter`)."""
    in_shape = tuple(inp.shape) if inp is not None else ()
    out_shape = tuple(output.shape)
    structure = module.structure() if _has(module, "structure") else ""
    if _counts_itself(module):
        count = own_count(module, in_shape, out_shape, convention)
        stored = sum(p.numel() for p in module.parameters())
        params = int(module.count_params(convention)) if _has(module, "count_params") else stored
        dense, active = _whole(count.dense), _whole(count.active)
        return _Measured(params, dense, active, structure, params - stored)  # type: ignore[arg-type]
    if isinstance(module, _ConvNd):
        macs = _conv_macs(module, in_shape, out_shape)
    elif isinstance(module, nn.Linear):
        macs = output.numel() // module.out_features * module.in_features * module.out_features
    else:
        macs = 0
    if convention == "reference" and inp is not None:
        macs += _reference_extra(module, inp, output)
    return _Measured(_direct_params(module), macs, macs)


def _count(
    model: nn.Module, x: torch.Tensor, convention: Convention
) -> tuple[list[LayerProfile], int, tuple[int, int]]:
    """Per-module rows, the total reference-minus-stored parameter adjustment, and the MAC
    totals ``(macs, macs_active)``: the exact sums, rounded once to whole MACs."""
    rows: list[LayerProfile] = []
    adjustment = 0
    totals = [0, 0]  # exact: the reference convention's rules give fractions
    # Forward hooks of children fire before their parent's, so what a self-counting module
    # contains is excluded up front.
    counted_inside = {
        id(child)
        for module in model.modules()
        if _counts_itself(module)
        for child in module.modules()
        if child is not module
    }

    replaying = False  # hooks are silent while a module's call is replayed for its FLOPs

    def hook(name: str):
        def record(
            module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            nonlocal adjustment, replaying
            if replaying or id(module) in counted_inside or not isinstance(output, torch.Tensor):
                return
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if _needs_flop_counter(module):
                replaying = True
                try:
                    macs = _own_macs_by_flop_counter(module, inputs, kwargs)
                finally:
                    replaying = False
                counts = _Measured(_direct_params(module), macs, macs, FLOP_COUNTED)
            else:
                counts = _measure(module, inp, output, convention)
            adjustment += counts.params_adjustment
            totals[0] += counts.macs
            totals[1] += counts.macs_active
            if counts.macs or counts.params:
                rows.append(
                    LayerProfile(
                        name,
                        type(module).__name__,
                        tuple(inp.shape) if inp is not None else (),
                        tuple(output.shape),
                        counts.params,
                        round(counts.macs),
                        round(counts.macs_active),
                        counts.structure,
                    )
                )

        return record

    handles = [
        module.register_forward_hook(hook(name or type(model).__name__), with_kwargs=True)
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rows, adjustment, (round(totals[0]), round(totals[1]))


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
    if (
        isinstance(input_shape, str)
        or not isinstance(input_shape, Sequence)
        or len(input_shape) < 2
        or not all(is_int(s) and s > 0 for s in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a sequence of at least two positive ints (batch first), "
            f"got {input_shape!r}"
        )
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(
        device
    )
    with eval_mode(model):
        rows, adjustment, (macs, macs_active) = _count(model, x, convention)
    stored = sum(p.numel() for p in model.parameters())
    if deployed:
        params_deployed = sum(p.numel() for p in deploy(model, verify=False).parameters())
    else:
        params_deployed = stored
    return Profile(
        rows,
        params=stored + adjustment,
        params_deployed=params_deployed,
        macs=macs,
        macs_active=macs_active,
    )
