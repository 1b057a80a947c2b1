"""The ground floor: ``nn.Conv2d``'s arguments (:class:`ConvSpec`) and the shared validators.

Every layer, deployed module, functional form and kernel of :mod:`dynaconv` describes its
convolution by a :class:`ConvSpec`, declared here once (the signature of
:meth:`ConvSpec.create`, :data:`CONV_ARGUMENTS`) and imported from here; this module imports
nothing of dynaconv but the padding geometry (:mod:`dynaconv.padding`), so everything can
depend on it. The validators (:func:`check_int`, :func:`check_number`, :func:`check_pair`,
:func:`check_bool`, :func:`check_choice`, :func:`check_divisible`) raise the one
``ValueError`` wording of the project: ``"<name> must be <rule>, got <value>"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .padding import ClassSignature, SameConv2d, same_padding

__all__ = [
    "CONV_ARGUMENTS",
    "LAYER_ARGUMENTS",
    "PADDING_MODES",
    "ClassSignature",
    "ConvSpec",
    "check_bool",
    "check_choice",
    "check_divisible",
    "check_input",
    "check_int",
    "check_number",
    "check_output_size",
    "check_pair",
    "conv_output_size",
    "is_int",
    "is_number",
]

#: ``nn.Conv2d``'s padding modes.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int (``True``/``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (``True``/``False`` are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(
    value: Any,
    name: str,
    minimum: int = 1,
    rule: str | None = None,
    *,
    maximum: int | None = None,
) -> int:
    """``value`` if it is an int in ``[minimum, maximum]`` (no upper bound when ``maximum`` is
    None); else ``ValueError`` naming ``name`` and the rule (``rule``, by default "a positive
    int", "a non-negative int", "an int >= m" or "an int in [m, M]")."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if rule is None:
            names = {1: "a positive int", 0: "a non-negative int"}
            rule = names.get(minimum, f"an int >= {minimum}")
            if maximum is not None:
                rule = f"an int in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {rule}, got {value!r:.60}")
    return value


def check_divisible(value: int, name: str, divisor: int, divisor_name: str) -> None:
    """``ValueError`` "``name`` (value) must be divisible by ``divisor_name`` (divisor)" unless
    ``divisor`` divides ``value`` (both already checked ints)."""
    if value % divisor:
        raise ValueError(f"{name} ({value}) must be divisible by {divisor_name} ({divisor})")


def check_number(value: Any, name: str, accept: Callable[[float], bool], rule: str) -> float:
    """``value`` as a float if it is a number (not a bool) that ``accept`` accepts; else
    ``ValueError`` "``name`` must be ``rule``"."""
    if not is_number(value) or not accept(value):
        raise ValueError(f"{name} must be {rule}, got {value!r:.60}")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool; else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r:.60}")
    return value


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``; else ``ValueError`` listing them."""
    if not isinstance(value, str | int | float | type(None)) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r:.60}")
    return value


def check_pair(value: Any, name: str) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair; else ``ValueError``."""
    if is_int(value):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value):
        return (value[0], value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r:.60}")


@dataclass(frozen=True)
class ConvSpec:
    """Validated ``nn.Conv2d`` arguments, shared by every family.

    ``padding`` is either a pair of ints or the string ``"same"``; ``"valid"`` is normalised
    to ``(0, 0)``. ``"same"`` at stride 1 is ``nn.Conv2d``'s; at stride > 1 it is TensorFlow's
    SAME (:mod:`dynaconv.padding`), whose amount depends on the input size
    (:attr:`dynamic_padding`): :meth:`explicit_padding` then needs that size.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        """Validate ``nn.Conv2d``'s arguments (without ``device`` and ``dtype``): this
        signature is their one declaration (:data:`CONV_ARGUMENTS`)."""
        check_int(in_channels, "in_channels")
        check_int(out_channels, "out_channels")
        check_int(groups, "groups")
        kernel = check_pair(kernel_size, "kernel_size")
        strides = check_pair(stride, "stride")
        dilations = check_pair(dilation, "dilation")
        for name, pair in (("kernel_size", kernel), ("stride", strides), ("dilation", dilations)):
            if min(pair) <= 0:
                raise ValueError(f"{name} must be positive, got {pair}")
        check_divisible(in_channels, "in_channels", groups, "groups")
        check_divisible(out_channels, "out_channels", groups, "groups")
        check_choice(padding_mode, "padding_mode", PADDING_MODES)
        if isinstance(padding, str):
            if padding == "valid":
                pad: tuple[int, int] | str = (0, 0)
            elif padding == "same":
                pad = "same"
            else:
                raise ValueError(
                    f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}"
                )
        else:
            pad = check_pair(padding, "padding")
            if min(pad) < 0:
                raise ValueError(f"padding must be non-negative, got {pad}")
        check_bool(bias, "bias")
        return cls(
            in_channels, out_channels, kernel, strides, pad, dilations, groups, bias, padding_mode
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvSpec:
        """The validated arguments of an existing ``nn.Conv2d``."""
        arguments = {name: getattr(conv, name) for name in CONV_ARGUMENTS.parameters}
        return cls.create(**{**arguments, "bias": conv.bias is not None})

    def conv_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that build the equivalent ``nn.Conv2d``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_channels(self, in_channels: int, out_channels: int, groups: int = 1) -> ConvSpec:
        """The same geometry with other channel counts (used for gathered or split convs)."""
        changed = {"in_channels": in_channels, "out_channels": out_channels, "groups": groups}
        return ConvSpec.create(**{**self.conv_kwargs(), **changed})

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def dynamic_padding(self) -> bool:
        """Whether the padding depends on the input size (``"same"`` at stride > 1)."""
        return self.padding == "same" and self.stride != (1, 1)

    @property
    def pads_explicitly(self) -> bool:
        """Whether the input is padded by :meth:`pad_input` before a conv with padding 0
        (other padding modes than zeros, and TensorFlow's SAME), not by the conv itself."""
        return self.padding_mode != "zeros" or self.dynamic_padding

    def explicit_padding(
        self, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding, resolving ``"same"`` (see the class).

        ``height`` and ``width`` (of the input) are needed when :attr:`dynamic_padding`.
        """
        if self.padding == "same":
            if self.dynamic_padding and (height is None or width is None):
                raise ValueError(
                    "padding='same' with stride > 1 depends on the input size: pass height "
                    "and width to explicit_padding"
                )
            top, bottom = same_padding(
                height, self.kernel_size[0], self.stride[0], self.dilation[0]
            )
            left, right = same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
            return (left, right, top, bottom)
        ph, pw = self.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    def pad_input(self, x: Tensor) -> Tensor:
        """Apply the padding explicitly (all modes); the conv then runs with padding 0."""
        pads = self.explicit_padding(x.shape[-2], x.shape[-1])
        if not self.dynamic_padding and not any(pads):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, pads, mode=mode)

    def conv2d(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int | None = None
    ) -> Tensor:
        """``nn.Conv2d``'s forward with this geometry and the given kernel."""
        groups = self.groups if groups is None else groups
        if self.pads_explicitly:
            return F.conv2d(self.pad_input(x), weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self.explicit_padding(height, width)
        return (
            conv_output_size(
                height, self.kernel_size[0], self.stride[0], top + bottom, self.dilation[0]
            ),
            conv_output_size(
                width, self.kernel_size[1], self.stride[1], left + right, self.dilation[1]
            ),
        )

    def dense_macs(self, output_shape: Sequence[int]) -> int:
        """Multiply-accumulates of the dense conv producing ``output_shape`` ``(B, Cout, H, W)``."""
        batch, _, height, width = output_shape
        return (
            batch
            * self.out_channels
            * (self.in_channels // self.groups)
            * self.kernel_numel
            * height
            * width
        )

    def make_conv(
        self, device: Any = None, dtype: Any = None, groups: int | None = None
    ) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (a :class:`SameConv2d` for TensorFlow's SAME)."""
        kwargs = self.conv_kwargs()
        if groups is not None:
            kwargs["groups"] = groups
        if self.dynamic_padding:
            del kwargs["padding"]
            return SameConv2d(**kwargs, device=device, dtype=dtype)
        return nn.Conv2d(**kwargs, device=device, dtype=dtype)


def conv_output_size(size: int, kernel: int, stride: int, total_padding: int, dilation: int) -> int:
    return (size + total_padding - dilation * (kernel - 1) - 1) // stride + 1


def check_input(x: Tensor, in_channels: int, layer: str) -> None:
    """The clear error for a wrong input, instead of a shape error from deep inside torch."""
    if x.dim() != 4:
        raise ValueError(f"{layer} expects input of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{layer} expects {in_channels} input channels, got input of shape {tuple(x.shape)}"
        )


def check_output_size(x: Tensor, spec: ConvSpec, layer: str) -> None:
    """``ValueError`` when ``x`` is too small for the kernel (the output would be empty),
    instead of an empty result or a backend's message."""
    height, width = spec.output_size(x.shape[-2], x.shape[-1])
    if height < 1 or width < 1:
        raise ValueError(
            f"{layer}: an input of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than the "
            f"kernel {spec.kernel_size} with padding {spec.padding}, dilation {spec.dilation}"
        )


#: ``nn.Conv2d``'s arguments without ``device`` and ``dtype``, as :meth:`ConvSpec.create`
#: declares them.
CONV_ARGUMENTS = inspect.signature(ConvSpec.create)

#: ``nn.Conv2d``'s whole signature: :data:`CONV_ARGUMENTS`, then ``device`` and ``dtype``.
LAYER_ARGUMENTS = CONV_ARGUMENTS.replace(
    parameters=[
        *CONV_ARGUMENTS.parameters.values(),
        *(
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
            for name in ("device", "dtype")
        ),
    ],
    return_annotation=inspect.Signature.empty,
)
