"""The deployed DGC layer's compiled CPU kernel (``cpu_kernel.cpp``): its weight layout and call.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV
2020. The kernel computes the gathered convolution of every example and head (the numbers of
:func:`~dynaconv.layers.dgc.functional.gathered_conv`, plus the bias) reading each head's kept
kernel rows where they lie, so no kernel is copied, per example or per call:

* ``x`` ``(B, Cin, H, W)``; ``index``/``scale`` ``(B, h, W)`` from
  :func:`~dynaconv.layers.dgc.functional.select_kept`;
* ``rows`` :func:`kernel_layout` ``(h*Cin, kh*kw, Opad)``: row ``i*Cin + c`` holds
  ``weight[o*h + i, c, t]`` at ``[t, o]``, zero for ``o >= Cout/h`` (``Opad``: ``Cout/h``
  rounded up to a whole vector, :data:`LANES`);
* output ``(B, Cout, Hout, Wout)``, channel ``o*h + i`` for output ``o`` of head ``i``.

Built by :mod:`dynaconv.native` at first use (a C++ compiler is needed); float32 and float64,
inference only (no gradient), the calling thread only.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from ... import native
from ...spec import ConvSpec
from .functional import conv_output_sizes, zero_padding

__all__ = ["LANES", "SOURCE", "gathered_conv_cpu", "kernel_layout", "unusable_reason"]

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")

#: Values per 64-byte vector: the output channels of a head are padded to a multiple.
LANES = {torch.float32: 16, torch.float64: 8}

_ENTRY = {torch.float32: "dgc_gathered_conv_f32", torch.float64: "dgc_gathered_conv_f64"}


def kernel_layout(weight: Tensor, heads: int) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` as the kernel's rows ``(h*Cin, kh*kw, Opad)``
    (module docstring), contiguous."""
    cout, cin, kh, kw = weight.shape
    per_head = cout // heads
    lanes = LANES.get(weight.dtype, 16)
    padded = -(-per_head // lanes) * lanes
    rows = weight.new_zeros(heads * cin, kh * kw, padded)
    view = weight.reshape(per_head, heads, cin, kh * kw).permute(1, 2, 3, 0)
    rows[:, :, :per_head] = view.reshape(heads * cin, kh * kw, per_head)
    return rows


@functools.cache
def _entries() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    library = native.load(SOURCE)
    if library is None:
        return None
    entries = {}
    for dtype, name in _ENTRY.items():
        entry = getattr(library, name)
        entry.argtypes = [ctypes.c_void_p] * 7
        entry.restype = ctypes.c_int
        entries[dtype] = entry
    return entries


def unusable_reason(x: Tensor, *tensors: Tensor) -> str | None:
    """Why the kernel cannot run on ``x`` (and ``tensors``: the weights), or None."""
    if x.device.type != "cpu":
        return f"it runs on the CPU only (input on {x.device})"
    if x.dtype not in _ENTRY:
        return f"it computes in float32 or float64 only (input {x.dtype})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return "it computes no gradient (use it under torch.no_grad or inference_mode)"
    if _entries() is None:
        return native.unavailable_reason(SOURCE) or "the kernel is not available"
    return None


def gathered_conv_cpu(
    x: Tensor,
    rows: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    bias: Tensor | None = None,
) -> Tensor:
    """The gated convolution of ``x`` by the kept rows (module docstring), ``bias`` added.

    ``ValueError`` where the kernel cannot run (:func:`unusable_reason`)."""
    why = unusable_reason(x, rows)
    if why is not None:
        raise ValueError(f"the compiled DGC kernel cannot run: {why}")
    padding = zero_padding(spec)
    if padding is None:
        x, padding = spec.pad_input(x), (0, 0)
    x = x.contiguous()
    batch, cin, height, width = x.shape
    out_h, out_w = conv_output_sizes(spec, height, width, padding)
    cout = spec.out_channels
    dtype = x.dtype
    rows = rows.to(dtype).contiguous()
    index = index.to(torch.int64).contiguous()
    scale = scale.to(dtype).contiguous()
    if bias is not None:
        bias = bias.to(dtype).contiguous()
    out = x.new_empty(batch, cout, out_h, out_w)
    if out.numel() == 0:
        return out
    kh, kw = spec.kernel_size
    shape = (ctypes.c_int64 * 18)(
        batch,
        cin,
        height,
        width,
        heads,
        index.shape[-1],
        cout // heads,
        rows.shape[-1],
        kh,
        kw,
        *spec.stride,
        *padding,
        *spec.dilation,
        out_h,
        out_w,
    )
    status = _entries()[dtype](  # type: ignore[index]
        x.data_ptr(),
        index.data_ptr(),
        scale.data_ptr(),
        rows.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        shape,
    )
    if status != 0:
        raise ValueError(
            f"the compiled DGC kernel refused its arguments (status {status}): rows of "
            f"{rows.shape[-1]} values per tap for {cout // heads} output channels per head"
        )
    return out
