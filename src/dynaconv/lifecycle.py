"""Model-level lifecycle: convert, schedule, regularise, deploy.

* :func:`convert` replaces the ``nn.Conv2d`` modules of any model by a dynaconv family.
* :func:`set_progress` brings every layer's schedule to training progress ``p``.
* :func:`aux_loss` sums the layers' regularisers.
* :func:`deploy` converts a model to its static inference form and verifies it.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .families import FamilyView, get_family
from .layers._base import ConversionSkipped, Deployable, DynaConv2d, check_progress
from .spec import is_int

__all__ = [
    "METHODS",
    "ConversionReport",
    "DeployVerificationError",
    "aux_loss",
    "convert",
    "deploy",
    "dynaconv_layers",
    "layer_class",
    "set_progress",
]

log = logging.getLogger("dynaconv")

#: Method name -> its layer class (read-only, live view of :data:`dynaconv.families.FAMILIES`).
METHODS: Mapping[str, type[DynaConv2d]] = FamilyView(lambda family: family.layer)


def layer_class(method: str) -> type[DynaConv2d]:
    """The layer class of ``method`` (one of :data:`METHODS`)."""
    return get_family(method).layer


def dynaconv_layers(model: nn.Module) -> Iterator[tuple[str, DynaConv2d]]:
    """``(name, layer)`` for every dynaconv layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DynaConv2d):
            yield name, module


def set_progress(model: nn.Module, progress: float) -> None:
    """Bring every layer's schedule state to training progress ``progress`` in ``[0, 1]``.

    Progress is iterations done / total iterations. Calling it with the same value on every
    DDP rank keeps the schedule state (held in buffers) identical across ranks.
    """
    progress = check_progress(progress)
    for _, layer in dynaconv_layers(model):
        layer.set_progress(progress)


def aux_loss(model: nn.Module) -> Tensor:
    """The sum of every layer's ``aux_loss()`` (a zero tensor when no layer has one)."""
    terms = [layer.aux_loss() for _, layer in dynaconv_layers(model)]
    if terms:
        return torch.stack([t.reshape(()) for t in terms]).sum()
    ref = next(model.parameters(), None)
    return torch.zeros((), device=None if ref is None else ref.device)


# --------------------------------------------------------------------------------------------
# convert


@dataclass
class ConversionReport:
    """What :func:`convert` did: the layers it converted and those it skipped, with why."""

    method: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"convert to {self.method!r}: {len(self.converted)} converted, {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector or [])
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _conv_candidates(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` of ``model`` (itself included) not inside a dynaconv layer."""
    inside = {id(m) for _, layer in dynaconv_layers(model) for m in layer.modules()}
    return [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Conv2d) and id(module) not in inside
    ]


def _check_selector(selector: Selector, name: str) -> None:
    if selector is None or callable(selector) or isinstance(selector, str):
        return
    if isinstance(selector, list | tuple | set) and all(isinstance(p, str) for p in selector):
        return
    raise ValueError(
        f"{name} must be a glob pattern, a list of patterns or a predicate (name, module) -> "
        f"bool, got {selector!r}"
    )


def convert(
    model: nn.Module,
    method: str,
    *,
    include: Selector = None,
    exclude: Selector = None,
    inplace: bool = False,
    return_report: bool = False,
    **options: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the ``nn.Conv2d`` modules of ``model`` by layers of ``method``.

    Args:
        model: any model (torchvision, timm, your own).
        method: ``"doconv"``, ``"condconv"``, ``"dgc"``, ``"dgconv"`` or ``"lgc"``.
        include: module-name glob pattern(s) or a predicate ``(name, module) -> bool``; only
            matching convs are converted (default: all).
        exclude: pattern(s) or predicate; matching convs are left alone.
        inplace: modify ``model`` itself instead of a deep copy.
        return_report: also return the :class:`ConversionReport`.
        **options: the family's own options (e.g. ``D_mul``, ``num_experts``, ``heads``).

    Weights are kept where the method allows (a DO-Conv made from a conv starts exactly equal
    to it). Convs the family cannot represent are skipped and reported (also logged at INFO);
    convs inside existing dynaconv layers are left alone; a conv shared by several parents
    becomes one shared layer. Unknown or invalid ``options`` raise ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    cls = layer_class(method)
    _check_selector(include, "include")
    _check_selector(exclude, "exclude")
    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(method)
    converted: dict[int, nn.Module] = {}  # a conv shared by several parents stays shared
    for name, conv in _conv_candidates(target):
        if include is not None and not _matches(include, name, conv):
            report.skipped[name] = "not matched by include"
            continue
        if exclude is not None and _matches(exclude, name, conv):
            report.skipped[name] = "matched by exclude"
            continue
        layer = converted.get(id(conv))
        if layer is None:
            try:
                layer = cls.from_conv(conv, **options)
            except ConversionSkipped as why:
                report.skipped[name] = str(why)
                continue
            layer.train(conv.training)
            converted[id(conv)] = layer
        if name:
            target.set_submodule(name, layer)
        else:  # the model is itself a conv
            target = layer
        report.converted.append(name)
    if not report.converted:
        first = next(iter(report.skipped.items()), None)
        log.warning(
            "convert(%r) converted no layer (%d skipped%s)",
            method,
            len(report.skipped),
            f"; e.g. {first[0]}: {first[1]}" if first else "",
        )
    else:
        log.info("%s", report)
    return (target, report) if return_report else target


# --------------------------------------------------------------------------------------------
# deploy


class DeployVerificationError(RuntimeError):
    """The deployed model's output differs from the original's."""


def _deploy_tree(module: nn.Module) -> nn.Module:
    if isinstance(module, Deployable):
        return module.deploy()
    for name, child in list(module.named_children()):
        replacement = _deploy_tree(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def _infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    for module in model.modules():
        if isinstance(module, nn.Conv2d | DynaConv2d):
            return (2, module.in_channels, 32, 32)
        if isinstance(module, nn.Linear):
            return (2, module.in_features)
    raise ValueError(
        "cannot infer an input shape for verification: pass example_input or input_shape"
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def check_finite(output: Any, what: str) -> None:
    """:class:`DeployVerificationError` unless every floating tensor in ``output`` is finite."""
    leaves, _ = tree_flatten(output)
    for index, leaf in enumerate(leaves):
        if (
            isinstance(leaf, Tensor)
            and leaf.is_floating_point()
            and not bool(leaf.isfinite().all())
        ):
            where = what if len(leaves) == 1 else f"{what} (output {index})"
            bad = int((~leaf.isfinite()).sum())
            raise DeployVerificationError(
                f"{where} is not finite ({bad} of {leaf.numel()} values are NaN or infinite) on "
                "the verification input, so the deployed model cannot be compared with it. "
                "Check the model in eval mode (BatchNorm running statistics, weights) or pass "
                "another example_input"
            )


def verify_outputs(reference: Any, actual: Any, what: str = "deployed model") -> float:
    """Largest relative max error between two outputs (tensors, or tuples/lists/dicts of them).

    Raises :class:`DeployVerificationError` when the structures differ or an error is too large.
    """
    ref_leaves, ref_spec = tree_flatten(reference)
    act_leaves, act_spec = tree_flatten(actual)
    if ref_spec != act_spec:
        raise DeployVerificationError(f"{what}: output structure {act_spec} != {ref_spec}")
    errors = [0.0]
    for index, (ref, act) in enumerate(zip(ref_leaves, act_leaves)):
        name = what if len(ref_leaves) == 1 else f"{what} (output {index})"
        if isinstance(ref, Tensor) and isinstance(act, Tensor):
            errors.append(_tensor_error(ref, act, name))
        elif ref != act:
            raise DeployVerificationError(f"{name}: {act!r} != {ref!r}")
    return max(errors)


def _tensor_error(reference: Tensor, actual: Tensor, what: str) -> float:
    if reference.shape != actual.shape:
        raise DeployVerificationError(
            f"{what}: output shape {tuple(actual.shape)} != {tuple(reference.shape)}"
        )
    if reference.numel() == 0:
        return 0.0
    if not reference.is_floating_point():
        if not torch.equal(reference, actual):
            raise DeployVerificationError(f"{what} differs from the original")
        return 0.0
    reference, actual = reference.detach(), actual.detach().to(reference.dtype)
    scale = reference.abs().max().clamp_min(1e-12)
    error = float(((actual - reference).abs().max() / scale).item())
    tolerance = _tolerance(reference.dtype)
    if not error <= tolerance:  # catches NaN too
        raise DeployVerificationError(
            f"{what} differs from the original: max relative error {error:.3g} > {tolerance:g}"
        )
    return error


def deploy(
    model: nn.Module,
    *,
    verify: bool = True,
    example_input: Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The static inference form of ``model`` (a copy in eval mode; ``model`` is untouched).

    Every :class:`~dynaconv.layers.Deployable` module (each dynaconv layer, and networks that
    fold structure across layers) is replaced by its ``deploy()``. With ``verify`` (default), a
    random batch (``example_input``, or one of ``input_shape``, or an inferred shape) is run
    through both models in eval mode and :class:`DeployVerificationError` is raised if they
    differ: the largest absolute difference over the largest absolute reference output must be
    at most 1e-9 in float64, 1e-4 in float32 and 2e-2 in lower precisions. The original
    model's output must be finite (else nothing can be verified: the error says so, rather
    than reporting a NaN difference). ``model``'s own training flags (of every submodule) are
    restored afterwards.
    """
    if example_input is not None and input_shape is not None:
        raise ValueError("pass example_input or input_shape, not both")
    deployed = _deploy_tree(copy.deepcopy(model).eval())
    deployed.eval()
    if verify:
        if example_input is None:
            example_input = _random_input(model, input_shape or _infer_input_shape(model))
        with eval_mode(model), torch.no_grad():
            expected = model(example_input)
            check_finite(expected, "the original model's output")
            actual = deployed(example_input)
        verify_outputs(expected, actual)
    return deployed


def _random_input(model: nn.Module, shape: Sequence[int]) -> Tensor:
    shape = tuple(shape)
    if not shape or not all(is_int(s) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {shape!r}")
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)
