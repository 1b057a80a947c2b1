"""The deployed LGC layer ("index layer"): gather the kept channels, a grouped conv.

Huang, Liu, van der Maaten and Weinberger, "CondenseNet: An Efficient DenseNet using Learned
Group Convolutions", CVPR 2018. :meth:`dynaconv.layers.lgc.LearnedGroupConv2d.deploy` returns
a :class:`CondensedGroupConv2d` (the training layer's condensed connectivity as an input
gather and a grouped convolution, optionally with the BN-ReLU around it folded in), which runs
in plain PyTorch or through the fused kernel of :mod:`dynaconv.layers.lgc.kernels` (the forms:
:data:`FORMS`; ``impl="auto"`` measures both on CUDA once per input shape, see
:class:`~dynaconv.layers.ChoosesForm`).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...dispatch import tracing, triton_preferred
from ...folding import fold_batchnorm
from ...spec import ConvSpec, check_input, check_int
from .._base import (
    ChoosesForm,
    Convention,
    Form,
    FormCall,
    Forms,
    MacCount,
    Shape,
    tensor_version,
)
from . import kernels as lgc_kernels

__all__ = [
    "CondensedGroupConv2d",
    "FoldedPointwise",
    "GatherWorkspace",
    "check_gather_index",
    "fold_batchnorm",
    "fold_pointwise",
    "folded_pointwise",
    "interleave_source",
]

Impl = Literal["auto", "torch", "triton"]


def _triton_refuses(module: CondensedGroupConv2d, call: FormCall) -> str | None:
    if lgc_kernels.supports(module.spec, module.weight, call.x):
        return None
    return "the fused kernel needs a 1x1, stride-1, unpadded kernel"


def _fused_conv(module: CondensedGroupConv2d, x: Tensor) -> Tensor:
    """The module's tensors through the fused kernel."""
    pre = post = None
    if module.in_scale is not None:
        pre = lgc_kernels.ChannelAffine(module.in_scale, module.in_shift, module.in_relu)
    if module.out_scale is not None:
        post = lgc_kernels.ChannelAffine(module.out_scale, module.out_shift, module.out_relu)
    return lgc_kernels.condensed_conv(
        module.spec,
        x,
        module.index,
        module.weight,
        module.bias,
        groups=module.learned_groups,
        interleave=module.interleave,
        pre=pre,
        post=post,
    )


def _fused(module: CondensedGroupConv2d, x: Tensor) -> bool:
    return triton_preferred(x) and _triton_refuses(module, FormCall(x, False, False)) is None


def _key(module: CondensedGroupConv2d, x: Tensor, *args: Any) -> tuple[Any, ...]:
    # Read from the module's dicts: ``module.weight`` goes through ``nn.Module.__getattr__``
    # (about half a microsecond each, on every call of a layer that may take 30 us).
    parameters, buffers = module._parameters, module._buffers
    return (
        module.spec,
        parameters["weight"].dtype,
        module.in_channels,
        buffers["index"].numel(),
        module.learned_groups,
        module.interleave,
        parameters.get("bias") is not None,
        parameters.get("in_scale") is not None,
        module.in_relu,
        parameters.get("out_scale") is not None,
        module.out_relu,
    )


#: The deployed LGC's execution forms (the declaration :class:`~dynaconv.layers.ChoosesForm`
#: reads): the PyTorch path and the fused kernel, a custom op that compiled and exported graphs
#: keep (on CUDA, where it applies, it is also the export form).
FORMS = Forms(
    forms={
        "torch": Form(lambda module, x: module.forward_torch(x)),
        "triton": Form(
            lambda module, x: _fused_conv(module, x),
            triton=True,
            batch_dependent=True,
            refuses=_triton_refuses,
        ),
    },
    rule=lambda module, call: ["triton", "torch"],
    export=lambda module, x: "triton" if _fused(module, x) else "torch",
    key=_key,
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


class CondensedGroupConv2d(ChoosesForm, nn.Module):
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
    when it applies, measured against PyTorch, :data:`FORMS`). Inference only: the folded BNs
    use their running statistics.
    """

    forms = FORMS

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
        impl = FORMS.resolve(impl)
        groups = check_int(learned_groups, "learned_groups")
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
        self.in_channels = check_int(in_channels, "in_channels")
        check_gather_index(index, in_channels)
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        key = f"{prefix}index"
        index = state_dict.get(key)
        if isinstance(index, Tensor):
            check_gather_index(index, self.in_channels, key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _flags_source(self) -> tuple[Any, ...]:
        # Identity and in-place version of the tensors the derived state comes from.
        sources = (self.index, self.in_scale, self.in_shift, self.weight, self.bias)
        return tuple(None if t is None else (t.data_ptr(), tensor_version(t)) for t in sources)

    def _check_flags(self) -> None:
        if not tracing() and self._flags_key != self._flags_source():
            self.refresh()

    @classmethod
    def from_learned(
        cls,
        layer: Any,  # a LearnedGroupConv2d, read for its tensors and spec only
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
        """Whether a forward on ``x`` runs the fused kernel."""
        return self.choose_form(x) == "triton"

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
        return self.run_form(x)

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
            and not tracing()
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
        if self.out_scale is None or tracing():
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
        return lgc_kernels.pointwise_geometry(self.spec) and self.spec.padding_mode == "zeros"

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


# ------------------------------------------------------------------------------------------
# the fully folded 1x1 index layer: one gather, one clamp, one matrix product, one ReLU


class FoldedPointwise(NamedTuple):
    """A 1x1 stride-1 index layer with every affine folded into its kernel and bias.

    ``y = order(relu?(W_g @ clamp(x[:, index_g], low_g, high_g) + b_g))`` per learned group
    ``g``, where

    * ``index`` ``(G * K,)``: the gathered input channels, group by group;
    * ``low``, ``high`` ``(G * K, 1, 1)`` or None: the folded BN-ReLU before the conv as a
      clamp (``relu(s v + t) = s max(v, -t/s) + t`` for ``s > 0``, ``min`` for ``s < 0``;
      ``high`` is None when every scale is positive, both None without a ReLU there);
    * ``weight`` ``(G * N, K, 1, 1)``, ``bias`` ``(G * N,)``: the grouped conv with the BN
      before it (its scale, and its shift as a bias) and the affine after it
      (``s' (W v + b) + t'``) folded in, rows in group-major order ``g * N + n``;
    * ``relu``: the ReLU after the layer; ``interleave``: the output channel of row
      ``g * N + n`` is ``n * G + g`` (else ``g * N + n``).
    """

    index: Tensor
    low: Tensor | None
    high: Tensor | None
    weight: Tensor
    bias: Tensor
    relu: bool
    interleave: bool

    @property
    def groups(self) -> int:
        return self.index.numel() // self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def fold_pointwise(layer: CondensedGroupConv2d) -> FoldedPointwise:
    """The :class:`FoldedPointwise` form of a 1x1, stride-1, unpadded index layer (exact up to
    rounding; ``ValueError`` for another kernel)."""
    if not layer._pointwise():
        raise ValueError("fold_pointwise needs a 1x1, stride-1, unpadded index layer")
    with torch.no_grad():
        groups, cout = layer.learned_groups, layer.out_channels
        weight = layer.weight.reshape(groups, cout // groups, -1)
        bias = torch.zeros(cout, dtype=weight.dtype, device=weight.device)
        if layer.bias is not None:
            bias = layer.bias.detach().clone()
        bias = bias.view(groups, -1, 1)
        low = high = None
        if layer.in_scale is not None:
            scale, shift = layer.in_scale, layer.in_shift
            if layer.in_relu:
                threshold = torch.where(scale != 0, -shift / scale, torch.zeros_like(shift))
                inf = torch.full_like(shift, math.inf)
                low = torch.where(scale > 0, threshold, -inf)[:, None, None]
                if scale.device.type == "meta" or not bool((scale > 0).all()):
                    high = torch.where(scale < 0, threshold, inf)[:, None, None]
                shift = torch.where(scale == 0, shift.clamp(min=0), shift)
            bias = bias + torch.matmul(weight, shift.view(groups, -1, 1))
            weight = weight * scale.view(groups, 1, -1)
        if layer.out_scale is not None:  # given per output channel: take it to row order
            row_of_channel = layer.output_source()
            scale = torch.empty_like(layer.out_scale)
            shift = torch.empty_like(layer.out_shift)
            scale[row_of_channel] = layer.out_scale
            shift[row_of_channel] = layer.out_shift
            weight = weight * scale.view(groups, -1, 1)
            bias = bias * scale.view(groups, -1, 1) + shift.view(groups, -1, 1)
        return FoldedPointwise(
            layer.index.clone(),
            low,
            high,
            weight.reshape(cout, -1, 1, 1).contiguous(),
            bias.reshape(cout).contiguous(),
            bool(layer.out_relu),
            bool(layer.interleave and groups > 1),
        )


#: Gathers of fewer elements allocate a fresh tensor: the allocator serves small blocks from
#: its cache faster than the workspace's bookkeeping (measured at batch 1, CondenseNet-86).
WORKSPACE_MIN_NUMEL = 1 << 18


def folded_pointwise(
    folded: FoldedPointwise,
    x: Tensor,
    workspace: GatherWorkspace | None = None,
    *,
    traced: bool | None = None,
    rows_only: bool = False,
) -> Tensor:
    """The layer on ``x`` ``(B, C, H, W)`` (``C`` at least every index + 1; only the indexed
    channels are read): ``(B, G * N, H, W)``.

    Eager on one example, the conv is one batched matrix product over the groups (CPU grouped
    convs are slower at these sizes) and the ReLU writes the interleaved order as it goes;
    otherwise (a batch, or traced: the exported graph's Gather, Max, Conv, Relu, Transpose)
    a grouped 1x1 convolution. ``workspace``: a buffer to gather into (eager, CPU, for gathers
    of at least :data:`WORKSPACE_MIN_NUMEL` elements). ``traced``: whether this runs inside a
    graph capture (:func:`dynaconv.dispatch.tracing`, asked when not given; a caller running
    many layers asks once). An input that needs a gradient takes the traced form's
    out-of-place ops. ``rows_only`` (traced only): the rows in group-major order, not
    interleaved (the caller folds :func:`interleave_source` into a gather of its own).
    """
    if traced is None:
        traced = tracing()
    if rows_only and not traced:
        raise ValueError("rows_only needs traced=True")
    if traced or (x.requires_grad and torch.is_grad_enabled()):  # out= records no gradient
        return _folded_pointwise_traced(folded, x, rows_only=rows_only)
    batch, _, height, width = x.shape
    index, weight = folded.index, folded.weight
    cout, per_group = weight.shape[:2]
    groups = index.numel() // per_group
    rows = cout // groups
    if workspace is not None and batch * index.numel() * height * width >= WORKSPACE_MIN_NUMEL:
        shape = (batch, index.numel(), height, width)
        gathered = torch.index_select(x, 1, index, out=workspace.get(shape, x))
    else:
        gathered = x.index_select(1, index)
    if folded.low is not None:
        if folded.high is None:
            gathered.clamp_min_(folded.low)
        else:
            gathered.clamp_(folded.low, folded.high)
    if batch == 1:
        y = torch.baddbmm(
            folded.bias.view(groups, rows, 1),
            weight.view(groups, rows, per_group),
            gathered.view(groups, per_group, -1),
        )
    else:
        y = F.conv2d(gathered, weight, folded.bias, groups=groups)
    if not folded.interleave:
        y = y.view(batch, cout, height, width)
        return y.relu_() if folded.relu else y
    y = y.view(batch, groups, rows, height, width).transpose(1, 2)
    out = torch.empty(batch, rows, groups, height, width, dtype=y.dtype, device=y.device)
    if folded.relu:  # one pass: the ReLU writes channel n * G + g
        torch.clamp_min(y, 0, out=out)
    else:
        out.copy_(y)
    return out.view(batch, cout, height, width)


def interleave_source(folded: FoldedPointwise) -> Tensor:
    """For each output channel ``n * G + g`` of the interleaved order, its row ``g * N + n``
    (``out[:, j] = rows[:, source[j]]``)."""
    cout, groups = folded.out_channels, folded.groups
    rows = torch.arange(cout, device=folded.weight.device).view(groups, cout // groups)
    return rows.t().reshape(-1)


def _folded_pointwise_traced(
    folded: FoldedPointwise, x: Tensor, *, rows_only: bool = False
) -> Tensor:
    """:func:`folded_pointwise` as graph nodes: Gather, Max (and Min), a grouped Conv reading
    the stored kernel itself (XNNPACK delegates only a conv with a static kernel), Relu, and
    for the interleaved order a channel Gather in an ONNX export (one node; onnxruntime runs
    it faster than Reshape, Transpose, Reshape: ``benchmarks/NOTES.md``), else a transpose
    (which XNNPACK delegates; a gather would run in ExecuTorch's portable kernels).
    ``rows_only``: stop before the interleaving (rows in group-major order; a caller that
    gathers channels next folds :func:`interleave_source` into its own index)."""
    _, _, height, width = x.shape
    cout, per_group = folded.weight.shape[:2]
    groups = folded.index.numel() // per_group
    gathered = x.index_select(1, folded.index)
    if folded.low is not None:
        gathered = torch.maximum(gathered, folded.low)
        if folded.high is not None:
            gathered = torch.minimum(gathered, folded.high)
    y = F.conv2d(gathered, folded.weight, folded.bias, groups=groups)
    y = y.relu() if folded.relu else y
    if rows_only or not folded.interleave:
        return y
    if torch.onnx.is_in_onnx_export():
        return y.index_select(1, interleave_source(folded))  # channel n * G + g <- row g * N + n
    y = y.view(-1, groups, cout // groups, height, width).transpose(1, 2)
    return y.reshape(-1, cout, height, width)
