"""DO-Conv: depthwise over-parameterized convolution.

Cao et al., "DO-Conv: Depthwise Over-parameterized Convolutional Layer", IEEE TIP 2022.

A training-time replacement for ``nn.Conv2d`` that folds into a plain ``nn.Conv2d`` for
inference. For an ``M x N`` kernel and ``D_mul >= M*N``:

* parameters ``W``: ``(Cout, Cin/groups, D_mul)`` and, when ``M*N > 1``, ``D``:
  ``(Cin, M*N, D_mul)`` initialised to zero, plus the constant ``D_diag`` (``eye(M*N)`` tiled
  along the last axis, zero-padded when ``D_mul`` is not a multiple of ``M*N``);
* effective kernel: with ``D' = D + D_diag`` and ``W'`` = ``W`` viewed as
  ``(Cout/groups, Cin, D_mul)``, ``K[o, i, m] = sum_s D'[i, m, s] W'[o, i, s]``, reshaped to
  ``(Cout, Cin/groups, M, N)``; the output is an ordinary convolution with ``K``.

For ``groups > 1`` the view of ``W`` pairs a ``D`` slice with channel
``(o mod groups) * (Cin/groups) + i`` rather than the true input channel. This is the reference
implementation's indexing; it is still an exact linear over-parameterisation, and weights
trained with the reference need it, so it is kept.

At initialisation (``D = 0``) the layer is exactly a convolution with kernel
``W[..., :M*N]`` (summed over the tiles of ``D_diag``).

Every forward computes the fused kernel from the current ``W`` and ``D`` (one small batched
matrix product, ``Cout * Cin/groups * M*N * D_mul`` multiply-accumulates, independent of the
batch), in eval mode too. There is deliberately no cache: an edit through ``.data`` leaves no
trace a cache could check, and a stale kernel would silently compute with old weights. For
inference, :meth:`DOConv2d.deploy` returns the plain convolution with the kernel stored.

Shapes: input ``(B, Cin, H, W)`` -> output ``(B, Cout, H', W')`` as ``nn.Conv2d``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...families import register_family
from ...spec import check_input, check_int
from .._base import DynaConv2d, kaiming_uniform_

__all__ = ["DOConv2d"]


def _diagonal_tiles(in_channels: int, kernel_numel: int, d_mul: int, **factory: Any) -> Tensor:
    """``D_diag``: ``eye(M*N)`` tiled along the last axis, zero-padded to ``D_mul`` columns."""
    eye = torch.eye(kernel_numel, **factory)
    tiles = eye.repeat(1, d_mul // kernel_numel)
    remainder = torch.zeros(kernel_numel, d_mul % kernel_numel, **factory)
    return torch.cat([tiles, remainder], dim=1).expand(in_channels, -1, -1).contiguous()


@register_family("doconv")
class DOConv2d(DynaConv2d):
    """Depthwise over-parameterized convolution (drop-in for ``nn.Conv2d``).

    Args: those of ``nn.Conv2d``, plus ``D_mul``: the depth multiplier of the
    over-parameterisation (default ``M*N``; must be at least ``M*N``). For 1x1 kernels there is
    no ``D`` and ``D_mul`` must be left unset (or 1).
    """

    title = "DO-Conv"
    static_kernel = True

    def _init_family(
        self,
        device: Any,
        dtype: Any,
        *,
        D_mul: int | None = None,
    ) -> None:
        s = self.spec
        in_channels, out_channels, groups, bias = s.in_channels, s.out_channels, s.groups, s.bias
        factory = {"device": device, "dtype": dtype}
        kernel_numel = self.spec.kernel_numel
        if kernel_numel == 1:
            if D_mul not in (None, 1):
                raise ValueError(
                    f"D_mul must be unset or 1 for a 1x1 kernel (there is no depthwise part), got {D_mul!r}"
                )
            d_mul = 1
        else:
            d_mul = kernel_numel if D_mul is None else D_mul
            rule = (
                f"an int >= kernel_size[0] * kernel_size[1] = {kernel_numel}"
                " (a smaller D_mul would make the kernel all zeros)"
            )
            check_int(d_mul, "D_mul", kernel_numel, rule)
        self.D_mul = d_mul
        cin_per_group = in_channels // groups
        self.W = nn.Parameter(torch.empty(out_channels, cin_per_group, d_mul, **factory))
        if kernel_numel > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, kernel_numel, d_mul, **factory))
            self.register_buffer(
                "D_diag",
                _diagonal_tiles(in_channels, kernel_numel, d_mul, **factory),
                persistent=False,
            )
        else:
            self.register_parameter("D", None)
            self.register_buffer("D_diag", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.W.shape[1] * self.D_mul
        kaiming_uniform_(self.W, fan_in)
        if self.D is not None:
            nn.init.zeros_(self.D)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def fused_kernel(self) -> Tensor:
        """The effective ``(Cout, Cin/groups, M, N)`` kernel, computed from ``W`` and ``D``."""
        s = self.spec
        shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
        if self.D is None:
            return self.W.reshape(shape)
        # One batched matrix product over input channels i: K_i = W'_i @ D'_i^T, with W' viewed
        # (no copy) as (Cin, Cout/groups, D_mul). Fewer launches than torch.einsum, which
        # matters because this runs at every training step.
        d_full = self.D + self.D_diag
        w_batched = self.W.reshape(s.out_channels // s.groups, s.in_channels, self.D_mul).transpose(
            0, 1
        )
        k_batched = torch.bmm(w_batched, d_full.transpose(1, 2))  # (Cin, Cout/groups, M*N)
        return k_batched.transpose(0, 1).reshape(shape)

    @property
    def weight(self) -> Tensor:
        """The effective kernel (differentiable), as ``nn.Conv2d.weight`` would hold it."""
        return self.fused_kernel()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.spec.in_channels, type(self).__name__)
        return self.spec.conv2d(x, self.fused_kernel(), self.bias)

    def deploy(self) -> nn.Conv2d:
        """The equal plain ``nn.Conv2d`` (same device and dtype)."""
        conv = self.spec.make_conv(device=self.W.device, dtype=self.W.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.fused_kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def _conversion(cls, conv: nn.Conv2d, *, D_mul: int | None = None) -> dict[str, Any]:
        """A DO-Conv equal to ``conv`` (its kernel placed in the first ``M*N`` columns of ``W``);
        ``D_mul`` is ignored for 1x1 kernels."""
        kernel_numel = conv.kernel_size[0] * conv.kernel_size[1]
        return {"D_mul": D_mul if kernel_numel > 1 else None}

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        kernel_numel = self.spec.kernel_numel
        self.W.zero_()
        self.W[..., :kernel_numel].copy_(conv.weight.reshape(conv.out_channels, -1, kernel_numel))
        if conv.bias is not None:
            self.bias.copy_(conv.bias)

    def structure(self) -> str:
        return f"D_mul={self.D_mul}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, D_mul={self.D_mul}"
