"""``padding="same"`` at any stride: TensorFlow's SAME padding.

``nn.Conv2d`` accepts ``padding="same"`` only at stride 1. dynaconv's layers (and
:class:`SameConv2d`) extend it to every stride with TensorFlow's definition, under which the
papers' EfficientNet checkpoints were trained. Per spatial dimension of size ``n``, with kernel
``k``, stride ``s`` and dilation ``d``, the output has ``ceil(n / s)`` positions and the input
is padded with

    ``total = max(d (k - 1) - (n - 1) mod s, 0)``

zeros (the same number as TensorFlow's ``max((ceil(n / s) - 1) s + d (k - 1) + 1 - n, 0)``),
``total // 2`` before and the rest after. At stride 1 this is ``d (k - 1)`` whatever ``n``:
exactly ``nn.Conv2d``'s ``"same"``. At stride > 1 it depends on ``n`` and is asymmetric when
odd (a 3x3 stride-2 conv pads a 224-wide input 0 before and 1 after, a 225-wide one 1 and 1),
so it is computed from the input on every call. Under ``torch.export`` with a dynamic height
or width the amount stays symbolic (no guard on the input size).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassSignature", "SameConv2d", "pad_same", "same_padding"]


def same_padding(size: Any, kernel: int, stride: int, dilation: int) -> tuple[Any, Any]:
    """``(before, after)`` zero padding of one dimension of ``size`` (an int or a SymInt)."""
    reach = dilation * (kernel - 1)
    if stride == 1:
        return reach // 2, reach - reach // 2
    # reach - (size - 1) mod stride, written so that symbolic shapes simplify: the padded
    # size is then reach + 1 + stride * ((size - 1) // stride), the output (size - 1) // stride + 1.
    total = reach + stride * ((size - 1) // stride) - (size - 1)
    if reach < stride - 1:  # can be negative: clamp (only then, so no guard when it cannot)
        total = torch.sym_max(total, 0)
    return total // 2, total - total // 2


def pad_same(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    mode: str = "constant",
) -> Tensor:
    """``x`` ``(B, C, H, W)`` padded for a conv whose output is ``ceil(H / sh) x ceil(W / sw)``."""
    top, bottom = same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (left, right, top, bottom), mode=mode)


class ClassSignature:
    """A class's ``__signature__`` (what ``inspect.signature(cls)`` shows), computed by
    ``build(cls)`` for the class and each subclass, and not inherited by instances (theirs
    stays their ``__call__``'s). ``build`` raises ``AttributeError`` where a class should show
    its own ``__init__``'s signature instead. The one such descriptor of dynaconv (the layers'
    is built from :data:`dynaconv.spec.LAYER_ARGUMENTS`)."""

    def __init__(self, build: Callable[[type], inspect.Signature]) -> None:
        self.build = build

    def __get__(self, instance: Any, owner: type) -> inspect.Signature:
        if instance is not None:
            raise AttributeError("__signature__")
        return self.build(owner)


def drop_parameter(signature: inspect.Signature, name: str) -> inspect.Signature:
    """``signature`` without the parameter ``name``."""
    return signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != name]
    )


#: ``nn.Conv2d``'s arguments without ``padding``: :class:`SameConv2d`'s.
_SAME_ARGUMENTS = drop_parameter(inspect.signature(nn.Conv2d), "padding")


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``padding="same"`` at any stride (TensorFlow's SAME when stride > 1).

    Arguments as ``nn.Conv2d`` without ``padding`` (it is ``"same"``); ``padding_mode`` says
    what is padded in (zeros, as TensorFlow, by default). The weights and state dict are an
    ``nn.Conv2d``'s; ``padding`` reads ``"same"``.
    """

    __signature__ = ClassSignature(lambda cls: _SAME_ARGUMENTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = _SAME_ARGUMENTS.bind(*args, **kwargs).arguments
        super().__init__(**arguments, padding=0)
        self.padding = "same"

    def forward(self, x: Tensor) -> Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        padded = pad_same(x, self.kernel_size, self.stride, self.dilation, mode)  # type: ignore[arg-type]
        return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
