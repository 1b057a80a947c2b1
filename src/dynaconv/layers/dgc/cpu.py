"""The deployed DGC layer's compiled CPU kernel (``cpu_kernel.cpp``): its weight layout and call.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV
2020. The kernel computes the gathered convolution of every example and head (the numbers of
:func:`~dynaconv.layers.dgc.functional.gathered_conv`, plus the bias) reading each head's kept
kernel rows where they lie, so no kernel is copied, per example or per call:

* ``x`` ``(B, Cin, H, W)``; ``index``/``scale`` ``(B, h, K)`` from
  :func:`~dynaconv.layers.dgc.functional.select_kept` (:func:`gathered_conv_cpu`), or the
  saliencies ``g`` ``(B, h, Cin)``, the kernel then selecting the same channels itself
  (:func:`selected_conv_cpu`);
* ``rows`` :func:`kernel_layout` ``(h*Cin, kh*kw, Opad)``: row ``i*Cin + c`` holds
  ``weight[o*h + i, c, t]`` at ``[t, o]``, zero for ``o >= Cout/h`` (``Opad``: ``Cout/h``
  rounded up to whole vectors, :func:`padded_outputs`);
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
from ...spec import ConvSpec, check_divisible, check_int
from .functional import conv_output_sizes, select_kept, zero_padding

__all__ = [
    "LANES",
    "SOURCE",
    "gathered_conv_cpu",
    "kernel_layout",
    "padded_outputs",
    "selected_conv_cpu",
    "unusable_reason",
]

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")

#: Values per 64-byte vector: a head's output channels are padded to a multiple, or, for
#: heads of at most half as many outputs, to half a vector (the kernel then computes with
#: 32-byte vectors: :func:`padded_outputs`).
LANES = {torch.float32: 16, torch.float64: 8}


def padded_outputs(per_head: int, dtype: torch.dtype) -> int:
    """``Opad``: ``per_head`` output channels rounded up to whole vectors (:data:`LANES`)."""
    lanes = LANES.get(dtype, 16)
    if per_head <= lanes // 2:
        return lanes // 2
    return -(-per_head // lanes) * lanes


#: Per dtype: the preprocessor name its library is built with (one library per dtype, so a
#: float32 model never waits for the float64 build), and its two entry points.
_ENTRIES = {
    torch.float32: ("DGC_FLOAT32", "dgc_gathered_conv_f32", "dgc_select_conv_f32"),
    torch.float64: ("DGC_FLOAT64", "dgc_gathered_conv_f64", "dgc_select_conv_f64"),
}


def kernel_layout(weight: Tensor, heads: int) -> Tensor:
    """``weight`` ``(Cout, Cin, kh, kw)`` as the kernel's rows ``(h*Cin, kh*kw, Opad)``
    (module docstring), contiguous."""
    cout, cin, kh, kw = weight.shape
    per_head = cout // heads
    padded = padded_outputs(per_head, weight.dtype)
    rows = weight.new_zeros(heads * cin, kh * kw, padded)
    view = weight.reshape(per_head, heads, cin, kh * kw).permute(1, 2, 3, 0)
    rows[:, :, :per_head] = view.reshape(heads * cin, kh * kw, per_head)
    return rows


@functools.cache
def _entries(dtype: torch.dtype) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """The kernel given the kept channels and the kernel selecting them itself, for ``dtype``
    (float32 or float64), or None where the library cannot be built."""
    define, gathered_name, selecting_name = _ENTRIES[dtype]
    library = native.load(SOURCE, (define,))
    if library is None:
        return None
    gathered, selecting = getattr(library, gathered_name), getattr(library, selecting_name)
    gathered.argtypes = [ctypes.c_void_p] * 7
    selecting.argtypes = [ctypes.c_void_p] * 6
    gathered.restype = selecting.restype = ctypes.c_int
    return gathered, selecting


def unusable_reason(x: Tensor, *tensors: Tensor) -> str | None:
    """Why the kernel cannot run on ``x`` (and ``tensors``: the weights), or None."""
    if x.device.type != "cpu":
        return f"it runs on the CPU only (input on {x.device})"
    if x.dtype not in _ENTRIES:
        return f"it computes in float32 or float64 only (input {x.dtype})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return "it computes no gradient (use it under torch.no_grad or inference_mode)"
    if _entries(x.dtype) is None:
        define = _ENTRIES[x.dtype][0]
        return native.unavailable_reason(SOURCE, (define,)) or "the kernel is not available"
    return None


def _rows_of(values: Tensor) -> Tensor:
    """``values`` ``(B, h, W)`` as the kernel reads it: each ``(b, i)`` row contiguous (a view
    where it already is, e.g. a slice of ``topk``'s output)."""
    return values if values.stride(-1) == 1 else values.contiguous()


@functools.lru_cache(maxsize=1024)
def _geometry(
    spec: ConvSpec, heads: int, keep: int, shape: tuple[int, ...], row_width: int
) -> tuple[tuple[int, int] | None, tuple[int, ...], tuple[int, ...]]:
    """For an input of ``shape``: the zero padding the kernel applies (None: ``x`` is padded
    first, :meth:`ConvSpec.pad_input`), the output shape and the kernel's size arguments but
    the strides of the selection (a call repeats its layer's geometry: computed once)."""
    padding = zero_padding(spec)
    batch, cin, height, width = shape
    if padding is None:
        padded = spec.pad_input(torch.empty(0, cin, height, width, device="meta"))
        height, width = padded.shape[2:]
    out_h, out_w = conv_output_sizes(spec, height, width, padding or (0, 0))
    sizes = (batch, cin, height, width, heads, keep, spec.out_channels // heads, row_width)
    sizes += (*spec.kernel_size, *spec.stride, *(padding or (0, 0)), *spec.dilation)
    return padding, (batch, spec.out_channels, out_h, out_w), (*sizes, out_h, out_w)


def _call(
    entry: ctypes._CFuncPtr,
    x: Tensor,
    selection: tuple[Tensor, ...],
    rows: Tensor,
    spec: ConvSpec,
    heads: int,
    keep: int,
    bias: Tensor | None,
) -> Tensor:
    """One kernel call (no checks: the callers made them). ``selection``: ``(index, scale)``
    or ``(g,)``, each with contiguous last rows."""
    padding, out_shape, sizes = _geometry(spec, heads, keep, tuple(x.shape), rows.shape[-1])
    if padding is None:
        x = spec.pad_input(x)
    if not x.is_contiguous():
        x = x.contiguous()
    out = x.new_empty(out_shape)
    if out.numel() == 0:
        return out
    values = selection[-1]
    index = selection[0] if len(selection) == 2 else values
    strides = (index.stride(0), index.stride(1), values.stride(0), values.stride(1))
    status = entry(
        x.data_ptr(),
        *(tensor.data_ptr() for tensor in selection),
        rows.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        (ctypes.c_int64 * 22)(*sizes, *strides),
    )
    if status != 0:
        raise ValueError(
            f"the compiled DGC kernel refused its arguments (status {status}): rows of "
            f"{rows.shape[-1]} values per tap for {spec.out_channels // heads} output channels "
            "per head"
        )
    return out


def _checked(
    x: Tensor, rows: Tensor, spec: ConvSpec, heads: int, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``ValueError`` naming the argument for what the kernel cannot compute; ``rows`` and
    ``bias`` in ``x``'s dtype, contiguous."""
    why = unusable_reason(x, rows)
    if why is not None:
        raise ValueError(f"the compiled DGC kernel cannot run: {why}")
    if x.dim() != 4 or x.shape[1] != spec.in_channels:
        raise ValueError(
            f"x must be (B, {spec.in_channels}, H, W) for this spec, got {tuple(x.shape)}"
        )
    check_int(heads, "heads")
    check_divisible(spec.out_channels, "out_channels", heads, "heads")
    per_head = spec.out_channels // heads
    lanes = LANES[x.dtype] // 2
    expected = (heads * spec.in_channels, spec.kernel_numel)
    if (
        rows.dim() != 3
        or tuple(rows.shape[:2]) != expected
        or rows.shape[2] < per_head
        or rows.shape[2] % lanes
    ):
        raise ValueError(
            f"rows must be kernel_layout(weight, heads): ({expected[0]}, {expected[1]}, Opad) "
            f"with Opad >= {per_head} a multiple of {lanes}, got {tuple(rows.shape)}"
        )
    rows = rows.to(x.dtype).contiguous()
    if bias is not None:
        if tuple(bias.shape) != (spec.out_channels,):
            raise ValueError(f"bias must be ({spec.out_channels},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype).contiguous()
    return rows, bias


def _check_selection(name: str, values: Tensor, x: Tensor, heads: int, width: int | None) -> None:
    batch = x.shape[0]
    if values.dim() != 3 or tuple(values.shape[:2]) != (batch, heads):
        raise ValueError(f"{name} must be (B={batch}, h={heads}, K), got {tuple(values.shape)}")
    if width is not None and values.shape[2] != width:
        raise ValueError(f"{name} must have {width} entries per head, got {values.shape[2]}")


def gathered_conv_cpu(
    x: Tensor,
    rows: Tensor,
    index: Tensor,
    scale: Tensor,
    spec: ConvSpec,
    heads: int,
    bias: Tensor | None = None,
) -> Tensor:
    """The gated convolution of ``x`` by the kept rows (module docstring), ``bias`` added;
    ``index``/``scale`` ``(B, h, K)`` the kept channels and their scales.

    ``ValueError`` where the kernel cannot run (:func:`unusable_reason`)."""
    rows, bias = _checked(x, rows, spec, heads, bias)
    _check_selection("index", index, x, heads, None)
    _check_selection("scale", scale, x, heads, index.shape[2])
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must hold integers, got {index.dtype}")
    cin = spec.in_channels
    if index.numel() and not (int(index.min()) >= 0 and int(index.max()) < cin):
        raise ValueError(
            f"index must hold channels in [0, {cin}), got {index.min()}..{index.max()}"
        )
    index = _rows_of(index.to(torch.int64))
    scale = _rows_of(scale.to(x.dtype))
    gathered = _entries(x.dtype)[0]  # type: ignore[index]
    return _call(gathered, x, (index, scale), rows, spec, heads, index.shape[-1], bias)


def selected_conv_cpu(
    x: Tensor,
    g: Tensor,
    keep: int,
    rows: Tensor,
    spec: ConvSpec,
    heads: int,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`gathered_conv_cpu` of the channels :func:`~dynaconv.layers.dgc.functional.select_kept`
    keeps from the saliencies ``g`` ``(B, h, Cin)`` (``keep = Cin - inactive``), the selection
    made inside the kernel (the same kept sets and scales: of channels tied at the threshold,
    which are listed may differ, each has scale 0). Where ``g``'s dtype is not ``x``'s, the
    selection is ``select_kept``'s. ``ValueError`` where the kernel cannot run."""
    rows, bias = _checked(x, rows, spec, heads, bias)
    _check_selection("g", g, x, heads, spec.in_channels)
    check_int(keep, "keep", 1, maximum=spec.in_channels)
    return selected_conv_cpu_unchecked(x, g, keep, rows, spec, heads, bias)


def selected_conv_cpu_unchecked(
    x: Tensor,
    g: Tensor,
    keep: int,
    rows: Tensor,
    spec: ConvSpec,
    heads: int,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`selected_conv_cpu` for a caller that has checked :func:`unusable_reason` (the
    deployed layer's form does, on every call) and passes ``rows`` (contiguous) and ``bias``
    in ``x``'s dtype where they are in it; otherwise they are converted."""
    if rows.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        rows, bias = _checked(x, rows, spec, heads, bias)
    if g.dtype != x.dtype:
        index, scale = select_kept(g, spec.in_channels - keep)
        return gathered_conv_cpu(x, rows, index, scale, spec, heads, bias)
    selecting = _entries(x.dtype)[1]  # type: ignore[index]
    return _call(selecting, x, (_rows_of(g.detach()),), rows, spec, heads, keep, bias)
