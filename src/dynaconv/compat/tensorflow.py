"""The official TensorFlow CondConv layout (``tensorflow/tpu``'s ``condconv_layers.py``).

The paper's code stores, per CondConv layer (read the variables with e.g.
``tf.train.load_checkpoint(path).get_tensor(name)``; numpy arrays or tensors are accepted):

* ``condconv_kernel`` ``(E, kh * kw * Cin * Cout)``: each expert's Keras kernel ``(kh, kw, Cin,
  Cout)`` (HWIO) flattened in C order; for ``DepthwiseCondConv2D`` the variable is
  ``depthwise_condconv_kernel`` ``(E, kh * kw * Cin * m)`` of ``(kh, kw, Cin, m)`` kernels
  (``m``: depth multiplier; output channel ``c * m + j`` reads input channel ``c``);
* ``condconv_bias`` ``(E, Cout)`` when ``use_bias``: one bias per expert, mixed like the kernels;
* per example, kernel ``sum_e r[b, e] kernel_e`` and bias ``sum_e r[b, e] bias_e``, then the
  convolution with ``padding`` ``"same"`` (TensorFlow's SAME, asymmetric at stride > 1) or
  ``"valid"``;
* the routing function of EfficientNet-CondConv: a dense layer on the block input's global
  average pool with a sigmoid, ``r = sigmoid(pool(x) @ kernel + bias)``: ``kernel`` ``(Cin, E)``,
  ``bias`` ``(E,)``; one per block, shared by the block's CondConv layers.

:func:`condconv_from_tensorflow` builds the equal :class:`~dynaconv.layers.CondConv2d`
(dynaconv's weight is ``(E, Cout, Cin/groups, kh, kw)``); :func:`routing_from_tensorflow` the
:class:`~dynaconv.layers.CondConvRouting`. The layout of the kernels does not depend on the
data format the TensorFlow model ran in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..layers.condconv.layer import CondConv2d, CondConvRouting
from ..spec import check_pair as conv_pair

__all__ = ["condconv_from_tensorflow", "routing_from_tensorflow"]


def _tensor(value: Any, name: str) -> Tensor:
    try:
        return torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array, got {type(value).__name__}") from error


def _positive_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = conv_pair(value, name)
    if min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _padding(padding: str) -> tuple[int, int] | str:
    mode = padding.lower() if isinstance(padding, str) else padding
    if mode == "same":
        return "same"
    if mode == "valid":
        return (0, 0)
    raise ValueError(f"padding must be TensorFlow's 'same' or 'valid', got {padding!r}")


def routing_from_tensorflow(kernel: Any, bias: Any) -> CondConvRouting:
    """The routing function ``sigmoid(pool(x) @ kernel + bias)``: ``kernel`` ``(Cin, E)``."""
    kernel, bias = _tensor(kernel, "routing kernel"), _tensor(bias, "routing bias")
    if kernel.dim() != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(
            "the routing dense layer must have kernel (Cin, E) and bias (E,), got "
            f"{tuple(kernel.shape)} and {tuple(bias.shape)}"
        )
    routing = CondConvRouting(kernel.shape[0], kernel.shape[1], dtype=kernel.dtype)
    with torch.no_grad():
        routing.fc.weight.copy_(kernel.T)
        routing.fc.bias.copy_(bias)
    return routing


def condconv_from_tensorflow(
    condconv_kernel: Any,
    *,
    in_channels: int,
    kernel_size: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    padding: str = "valid",
    dilation_rate: int | tuple[int, int] = 1,
    depthwise: bool = False,
    condconv_bias: Any = None,
    routing_kernel: Any = None,
    routing_bias: Any = None,
) -> CondConv2d:
    """The :class:`~dynaconv.layers.CondConv2d` equal to a TensorFlow ``CondConv2D``.

    ``condconv_kernel``: the ``condconv_kernel`` variable, or with ``depthwise=True`` the
    ``depthwise_condconv_kernel`` of a ``DepthwiseCondConv2D``; ``in_channels`` is the layer's
    input channel count (needed to unflatten it); ``kernel_size``, ``strides``, ``padding``
    and ``dilation_rate`` are the Keras arguments. With ``routing_kernel``/``routing_bias``
    (the routing dense layer, on this layer's input) the layer routes itself; without, it has
    ``shared_routing=True`` and is called as ``layer(x, routing_weights=r)`` (r from
    :func:`routing_from_tensorflow` on the block input, as EfficientNet-CondConv does).
    """
    kernel = _tensor(condconv_kernel, "condconv_kernel")
    kh, kw = _positive_pair(kernel_size, "kernel_size")
    if kernel.dim() != 2 or kernel.shape[1] % (kh * kw * in_channels):
        raise ValueError(
            f"condconv_kernel must have shape (num_experts, kh * kw * Cin * Cout) with "
            f"kh * kw * Cin = {kh * kw * in_channels}, got {tuple(kernel.shape)}"
        )
    experts = kernel.shape[0]
    per_input = kernel.shape[1] // (kh * kw * in_channels)  # Cout, or the depth multiplier
    hwio = kernel.reshape(experts, kh, kw, in_channels, per_input)
    if depthwise:  # (kh, kw, Cin, m) -> output channel c * m + j, one input channel each
        out_channels, groups = in_channels * per_input, in_channels
        weight = hwio.permute(0, 3, 4, 1, 2).reshape(experts, out_channels, 1, kh, kw)
    else:
        out_channels, groups = per_input, 1
        weight = hwio.permute(0, 4, 3, 1, 2)
    bias = None if condconv_bias is None else _tensor(condconv_bias, "condconv_bias")
    if bias is not None and tuple(bias.shape) != (experts, out_channels):
        raise ValueError(
            f"condconv_bias must have shape (num_experts, Cout) = {(experts, out_channels)}, "
            f"got {tuple(bias.shape)}"
        )
    if (routing_kernel is None) != (routing_bias is None):
        raise ValueError("give both routing_kernel and routing_bias, or neither")
    routing = None
    if routing_kernel is not None:
        routing = routing_from_tensorflow(routing_kernel, routing_bias)
        if routing.fc.in_features != in_channels or routing.num_experts != experts:
            raise ValueError(
                f"routing_kernel must have shape (Cin, E) = {(in_channels, experts)}, got "
                f"{tuple(routing.fc.weight.T.shape)}"
            )
    layer = CondConv2d(
        in_channels,
        out_channels,
        (kh, kw),
        _positive_pair(strides, "strides"),
        _padding(padding),
        _positive_pair(dilation_rate, "dilation_rate"),
        groups,
        bias is not None,
        dtype=kernel.dtype,
        num_experts=experts,
        shared_routing=routing is None,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        if routing is not None:
            layer.routing.load_state_dict(routing.state_dict())
    return layer
