"""The deployed DGC layer: only the kept channels of each example and head are computed.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020. :meth:`dynaconv.layers.dgc.DynamicGroupConv2d.deploy` returns a
:class:`SparseDynamicGroupConv2d` with the layer's weights, saliency generators and current
kept count (the math: :mod:`dynaconv.functional.dgc`; its execution forms: :data:`FORMS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from ..dispatch import tracing, triton_preferred
from ..functional.dgc import (
    gathered_conv,
    grouped_gathered_conv,
    saliency,
    select_kept,
    transposed_head_kernels,
    triton_kernel_layout,
)
from ..kernels.dgc import sparse_conv_triton
from ._base import (
    ChoosesForm,
    Convention,
    ConvSpec,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
    check_input,
    check_output_size,
)

if TYPE_CHECKING:
    from .dgc import DynamicGroupConv2d

__all__ = ["SparseDynamicGroupConv2d"]

SaliencyMode = Literal["reference", "neutral"]
_SALIENCY_MODES = ("reference", "neutral")


def _inactive(module: SparseDynamicGroupConv2d) -> int:
    return module.spec.in_channels - module.kept


def _run_bmm(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    index, scale = select_kept(g, _inactive(module))
    return gathered_conv(x, module.weight, index, scale, module.spec, module.heads)


def _run_batch_grouped(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    index, scale = select_kept(g, _inactive(module))
    transposed = module.layouts()[1]
    return grouped_gathered_conv(
        x, module.weight, index, scale, module.spec, module.heads, transposed
    )


def _run_triton(module: SparseDynamicGroupConv2d, x: Tensor, g: Tensor) -> Tensor:
    kernel_weight = module.layouts()[0]
    return sparse_conv_triton(x, kernel_weight, g, _inactive(module), module.spec, module.heads)


def _rule(module: SparseDynamicGroupConv2d, call: FormCall) -> list[str]:
    """Without measuring: the Triton kernel on CUDA; on CPU ``"bmm"`` for 1x1 stride-1
    kernels and the batch-grouped conv otherwise; ``"bmm"`` elsewhere."""
    if triton_preferred(call.x):
        return ["triton", "bmm"]
    if call.x.device.type == "cpu":
        pointwise = module.spec.kernel_numel == 1 and module.spec.stride == (1, 1)
        return ["bmm"] if pointwise else ["batch_grouped", "bmm"]
    return ["bmm"]


#: The deployed DGC layer's execution forms (the declaration
#: :class:`~dynaconv.layers.ChoosesForm` reads). ``kept`` is fixed structure, so the gathered
#: ``"bmm"`` form traces and exports.
FORMS = Forms(
    forms={
        "bmm": Form(_run_bmm),
        "batch_grouped": Form(_run_batch_grouped, batch_dependent=True, traceable=False),
        "triton": Form(_run_triton, triton=True, batch_dependent=True, traceable=False),
    },
    rule=_rule,
    export=lambda module, x: "bmm",
    key=lambda module, x, *args: (module.spec, module.heads, module.kept, module.fc1_weight.shape),
)


class SparseDynamicGroupConv2d(ChoosesForm, nn.Module):
    """The deployed DGC layer: computes only the kept channels of each example and head.

    Same numbers as :class:`DynamicGroupConv2d` in eval mode, at ``K/Cin`` of the conv MACs
    (``K = Cin - k_off``). ``impl``: ``"auto"``, ``"torch"``, ``"bmm"``, ``"batch_grouped"`` or
    ``"triton"`` (or an older spelling), chosen as in :class:`DynamicGroupConv2d`'s inference
    (module docstring); ``"auto"`` measures the forms that can run once per input shape
    (:class:`~dynaconv.layers.ChoosesForm`; :data:`FORMS`).

    ``kept`` (``K``) is fixed structure, like ``nn.Conv2d``'s ``groups``: a plain int, not
    state (not in the state dict), read by every path, traced ones included (their shapes
    depend on it). It is the layer's count when :meth:`DynamicGroupConv2d.deploy` ran.
    """

    forms = FORMS

    def __init__(
        self,
        spec: ConvSpec,
        heads: int,
        kept: int,
        weight: Tensor,
        bias: Tensor | None,
        fc1_weight: Tensor,
        fc2_weight: Tensor,
        fc2_bias: Tensor,
        impl: str = "auto",
        saliency_mode: SaliencyMode = "reference",
    ) -> None:
        super().__init__()
        if saliency_mode not in _SALIENCY_MODES:
            raise ValueError(
                f"saliency_mode must be one of {_SALIENCY_MODES}, got {saliency_mode!r}"
            )
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= spec.in_channels:
            raise ValueError(
                f"kept must be an int in [1, in_channels={spec.in_channels}], got {kept!r}"
            )
        self.spec = spec
        self.heads = heads
        self.kept = kept
        self.impl = impl
        self.saliency_mode = saliency_mode
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.fc1_weight = nn.Parameter(fc1_weight.detach().clone(), requires_grad=False)
        self.fc2_weight = nn.Parameter(fc2_weight.detach().clone(), requires_grad=False)
        self.fc2_bias = nn.Parameter(fc2_bias.detach().clone(), requires_grad=False)
        self._layouts: tuple[tuple[Any, ...], Tensor, Tensor] | None = None

    def layouts(self) -> tuple[Tensor, Tensor]:
        """``weight`` in the layouts the Triton and grouped forms read: ``(kernel_weight,
        transposed_weight)``. Derived from ``weight`` and cached (not state) while ``weight`` is
        the same tensor, unchanged in place; so loading, ``functional_call`` and in-place writes
        are followed. Traced graphs derive them in the graph."""
        weight = self.weight.detach()
        if tracing():
            return triton_kernel_layout(weight, self.heads), transposed_head_kernels(
                weight, self.heads
            )
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if self._layouts is None or self._layouts[0] != key:
            kernel = triton_kernel_layout(weight, self.heads)
            transposed = transposed_head_kernels(weight, self.heads).contiguous()
            self._layouts = (key, kernel, transposed)
        return self._layouts[1], self._layouts[2]

    @classmethod
    def from_layer(cls, layer: DynamicGroupConv2d) -> SparseDynamicGroupConv2d:
        impl = layer.impl if layer.impl in FORMS.impls else "auto"
        return cls(
            layer.spec,
            layer.heads,
            layer.kept_channels,
            layer.weight,
            layer.bias,
            layer.fc1_weight,
            layer.fc2_weight,
            layer.fc2_bias,
            impl,
            layer.saliency_mode,
        )

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.spec.out_channels

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        if not tracing():
            check_output_size(x, self.spec, type(self).__name__)
        g = saliency(
            x, self.fc1_weight, self.fc2_weight, self.fc2_bias, self.saliency_mode == "neutral"
        )
        out = self.run_form(x, g)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def count_macs(
        self, input_shape: Shape, output_shape: Shape, convention: Convention = "dense"
    ) -> MacCount:
        conv = self.spec.dense_macs(output_shape) // self.spec.in_channels * self.kept
        fcs = (
            int(output_shape[0]) * self.heads * 2 * self.spec.in_channels * self.fc1_weight.shape[1]
        )
        return MacCount(conv + fcs, conv + fcs)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, stride={s.stride}, "
            f"heads={self.heads}, kept={self.kept}, impl={self.impl!r}"
        )
