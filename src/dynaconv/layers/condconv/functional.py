"""CondConv's exact forms as functions (Yang et al., NeurIPS 2019; see
:mod:`dynaconv.layers.condconv`).

Each form maps ``x`` ``(B, Cin, H, W)``, the expert bank ``weight`` ``(E, Cout, Cin/g, kh,
kw)``, the expert biases ``bias`` ``(E, Cout)`` or None and the routing weights ``r``
``(B, E)`` to ``y[b] = conv(x[b], sum_e r[b, e] weight[e]) + sum_e r[b, e] bias[e]`` with the
geometry of ``spec`` (a :class:`~dynaconv.layers.ConvSpec`). The fused Triton form is in
:mod:`dynaconv.layers.condconv.kernels`; the layer declares the forms (:mod:`dynaconv.layers.condconv`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...dispatch import tracing

if TYPE_CHECKING:
    from ...spec import ConvSpec

__all__ = [
    "BATCH_DEPENDENT",
    "TORCH_FORMS",
    "add_bias",
    "batch_grouped",
    "batch_independent_form",
    "bmm",
    "check_routing_weights",
    "condconv2d_torch",
    "expert_sum",
    "fixed_batch_graph",
    "loop",
    "mix",
    "mixed_bias",
    "taps",
]


def check_routing_weights(routing_weights: Any, batch: int, num_experts: int) -> None:
    """ValueError, naming the argument and the rule, unless ``routing_weights`` fits the call.

    The rule: a floating-point tensor of shape ``(B, E)`` with ``B`` the input's batch size
    and ``E`` the number of experts. (Values are not inspected: a check for non-finite values
    would synchronise the device on every call; non-finite routing weights give non-finite
    outputs, as a non-finite input of ``nn.Conv2d`` does.)
    """
    if not isinstance(routing_weights, Tensor):
        raise ValueError(
            f"routing_weights must be a tensor of shape (B, num_experts), got "
            f"{type(routing_weights).__name__}"
        )
    if not routing_weights.is_floating_point():
        raise ValueError(
            f"routing_weights must be a floating-point tensor, got dtype {routing_weights.dtype}"
        )
    if routing_weights.dim() != 2 or routing_weights.shape[1] != num_experts:
        raise ValueError(
            f"routing_weights must have shape (B, num_experts) = (B, {num_experts}), got "
            f"{tuple(routing_weights.shape)}"
        )
    if routing_weights.shape[0] != batch:
        raise ValueError(
            f"routing_weights must have one row per example: the input has batch size {batch}, "
            f"routing_weights has shape {tuple(routing_weights.shape)}"
        )


def mix(r: Tensor, bank: Tensor) -> Tensor:
    """``sum_e r[b, e] bank[e]`` for every example: ``(B, *bank.shape[1:])``."""
    return (r @ bank.reshape(bank.shape[0], -1)).reshape(r.shape[0], *bank.shape[1:])


def mixed_bias(r: Tensor, bias: Tensor | None) -> Tensor | None:
    """``sum_e r[b, e] bias[e]``: ``(B, Cout)``, or None without a bias."""
    return None if bias is None else r @ bias


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """``y + bias[:, :, None, None]`` for a per-example bias ``(B, Cout)`` (or ``(1, Cout)``)."""
    return y if bias is None else y + bias[:, :, None, None]


def loop(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    """``"loop"``: one convolution per example (the paper's code)."""
    outputs = []
    for b in range(x.shape[0]):
        kernel = torch.einsum("e,e...->...", r[b], weight)
        mixed = None if bias is None else r[b] @ bias
        outputs.append(spec.conv2d(x[b : b + 1], kernel, mixed))
    return torch.cat(outputs)


def batch_grouped(
    spec: ConvSpec,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    r: Tensor,
    shared_bias: Tensor | None = None,
) -> Tensor:
    """``"batch_grouped"``: the batch folded into conv groups, ``groups = B * groups``.

    ``shared_bias`` ``(Cout,)``: an unmixed bias added to every example, passed to the conv
    as its own bias (no separate pass over the output)."""
    batch = x.shape[0]
    kernels = mix(r, weight).reshape(-1, *weight.shape[2:])
    mixed = mixed_bias(r, bias)
    if shared_bias is not None:
        mixed = shared_bias.expand(batch, -1) if mixed is None else mixed + shared_bias
    folded = x.reshape(1, -1, *x.shape[2:])
    y = spec.conv2d(
        folded, kernels, None if mixed is None else mixed.reshape(-1), batch * spec.groups
    )
    return y.reshape(batch, spec.out_channels, *y.shape[2:])


def expert_sum(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    """``"expert_sum"``: one conv to ``E * Cout`` channels, then the ``r``-weighted sum."""
    experts, cout = weight.shape[:2]
    g = spec.groups
    # Output channels ordered (group, expert, channel in group) so that a grouped conv applies.
    stacked = weight.reshape(experts, g, cout // g, *weight.shape[2:]).transpose(0, 1)
    y = spec.conv2d(x, stacked.reshape(experts * cout, *weight.shape[2:]), None)
    batch, _, height, width = y.shape  # explicit sizes: no -1 for export to solve for
    y = y.reshape(batch, g, experts, (cout // g) * height * width)
    y = (r[:, None, None, :] @ y).squeeze(2).reshape(batch, cout, height, width)
    return add_bias(y, mixed_bias(r, bias))


def bmm(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    """``"bmm"``: per-example matrix products of the mixed kernels with the (unfolded) input."""
    g, cout = spec.groups, spec.out_channels
    kernels = mix(r, weight).reshape(-1, g, cout // g, weight[0, 0].numel())
    x = spec.pad_input(x)
    if spec.kernel_size == (1, 1):
        columns = x[:, :, :: spec.stride[0], :: spec.stride[1]]
        height, width = columns.shape[2:]
    else:
        height, width = (
            (size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(x.shape[2:], spec.kernel_size, spec.stride, spec.dilation)
        )
        columns = F.unfold(x, spec.kernel_size, spec.dilation, 0, spec.stride)
    columns = columns.reshape(-1, g, kernels.shape[-1], height * width)
    y = (kernels @ columns).reshape(-1, cout, height, width)
    return add_bias(y, mixed_bias(r, bias))


def taps(spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor) -> Tensor:
    """``"taps"``: the mixed kernels applied one tap at a time (batched matmuls, no unfold)."""
    batch, g, cout = x.shape[0], spec.groups, spec.out_channels
    cin_g, (kh, kw) = weight.shape[2], spec.kernel_size
    # (kh * kw, B * g, Cout/g, Cin/g): one contiguous kernel matrix per tap, example and group
    kernels = mix(r, weight).reshape(batch * g, cout // g, cin_g, kh * kw).permute(3, 0, 1, 2)
    x = spec.pad_input(x)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    height = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            window = x[
                :,
                :,
                i * dh : i * dh + sh * (height - 1) + 1 : sh,
                j * dw : j * dw + sw * (width - 1) + 1 : sw,
            ].reshape(batch * g, cin_g, height * width)
            tap = kernels[i * kw + j]
            y = torch.bmm(tap, window) if y is None else torch.baddbmm(y, tap, window)
    y = y.reshape(batch, cout, height, width)  # type: ignore[union-attr]
    return add_bias(y, mixed_bias(r, bias))


Form = Callable[[Any, Tensor, Tensor, "Tensor | None", Tensor], Tensor]

#: The PyTorch forms by canonical ``impl`` name.
TORCH_FORMS: dict[str, Form] = {
    "loop": loop,
    "batch_grouped": batch_grouped,
    "expert_sum": expert_sum,
    "bmm": bmm,
    "taps": taps,
}


#: The forms that cannot run on an empty batch (a Python loop, ``B * groups`` conv groups, a
#: kernel grid over ``B``) or in a traced graph with a dynamic batch.
BATCH_DEPENDENT = ("loop", "batch_grouped", "triton")


def batch_independent_form(spec: ConvSpec) -> str:
    """The form an empty batch runs: ``"bmm"`` for 1x1 kernels, ``"expert_sum"`` for kxk."""
    return "bmm" if spec.kernel_size == (1, 1) else "expert_sum"


def fixed_batch_graph(x: Tensor) -> bool:
    """Whether ``x`` is traced by ``torch.export`` or ``torch.compile`` with a constant batch
    size (no dynamic batch dimension): the graph then serves that batch only, and
    :func:`batch_grouped` exports as the kernel mixing (one matrix product) and one
    convolution (at batch 1, the layer's own conv with the mixed kernel; the edge case).
    TorchScript tracing records sizes as constants even for a batch meant to be dynamic, so it
    never counts as fixed."""
    graph = torch.compiler.is_exporting() or torch.compiler.is_compiling()
    return graph and isinstance(x.shape[0], int)


def empty_batch(x: Tensor) -> bool:
    """An eager call on an empty batch (traced graphs keep the batch symbolic)."""
    return not tracing() and x.shape[0] == 0


def condconv2d_torch(
    spec: ConvSpec, x: Tensor, weight: Tensor, bias: Tensor | None, r: Tensor, form: str
) -> Tensor:
    """The PyTorch form ``form`` (a key of :data:`TORCH_FORMS`), or on an empty batch, where
    the batch-dependent forms have nothing to launch, :func:`batch_independent_form`."""
    if form in BATCH_DEPENDENT and empty_batch(x):
        form = batch_independent_form(spec)
    return TORCH_FORMS[form](spec, x, weight, bias, r)
