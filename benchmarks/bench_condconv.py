"""CondConv (8 experts) against the static nn.Conv2d of the same shape.

Bars (issue: CondConv; batch 64, 8 experts, fp32): the auto form's inference forward at most
1.3x the static conv for 1x1 (112->672, 14x14) and at most 2x for 3x3 (256->256 14x14, 64->64
56x56), and at least 2x faster than the batch-folded grouped form measured in the same run
(row "auto vs grouped": ratio <= 0.5). Every form is listed (the per-example loop is the
reference); "triton mix" mixes the expert kernels in registers, "triton premix" reads kernels
mixed by one matrix product first. Layer times include the routing (pool, linear, sigmoid).
Training-step rows (forward + backward of the layer against the static conv's) have no bar.

Expectation on an H100: 1x1 is memory-bound, so the fused kernel (in-register mixing, one
position tile per example) should land near the static conv; 3x3 14x14 is compute-bound and
pays the vector-unit mixing (about E / position-tile of the tensor-core work) and a Triton
implicit GEMM against cuDNN; 3x3 56x56 premixes (the mixed kernels are small) and is an
implicit GEMM with per-example kernels.

CPU (no Triton): ``auto`` runs ``bmm`` for 1x1 (one matmul mixes the kernels, then a batched
GEMM: expect about the static conv's time) and the per-example ``loop`` for 3x3 inference
(oneDNN's batch-1 convs are nearly as efficient as a batched one on few cores: expect 1-2x).
Forward rows interleave their samples with the static conv's (``measure_interleaved``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynaconv import CondConv2d
from dynaconv.kernels import triton_usable
from harness import (
    Row,
    common_args,
    forward_fn,
    measure,
    measure_interleaved,
    report,
    train_step_fn,
)

CASES = [
    ("1x1 112->672 14x14", 112, 672, 1, 14, 1.3),
    ("3x3 256->256 14x14", 256, 256, 3, 14, 2.0),
    ("3x3 64->64 56x56", 64, 64, 3, 56, 2.0),
]
TORCH_FORMS = ("grouped", "expert_sum", "bmm")


def _triton_forward(layer: CondConv2d, x: torch.Tensor, premix: bool):
    """The layer's fused path (the routing inside the kernel when it mixes in registers)."""

    def run() -> object:
        with torch.inference_mode():
            return layer._run("triton", premix, x, None)

    return run


def graphed(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (replay callable): GPU time without Python launch cost.

    Called after ``fn`` has run eagerly (Triton's autotuning and the auto form's measured
    choice happen then, outside the capture).
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    args = common_args(__doc__.splitlines()[0])
    device, dtype = args.device, torch.float32
    batch = args.batch or (4 if args.quick else 64)
    experts = 8
    rows: list[Row] = []
    for case, cin, cout, k, size, bar_for_auto in CASES:
        torch.manual_seed(0)
        plain = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False).to(device)
        layer = CondConv2d(cin, cout, k, padding=k // 2, bias=False, num_experts=experts)
        layer = layer.to(device)
        x = torch.randn(batch, cin, size, size, device=device)
        on_gpu = device.type == "cuda"
        layer.eval()
        fns = {"static": forward_fn(plain.eval(), x)}
        layer.impl = "loop"
        fns["loop (reference)"] = forward_fn(copy.deepcopy(layer), x)
        for form in TORCH_FORMS:
            layer.impl = form
            fns[form] = forward_fn(copy.deepcopy(layer), x)
        layer.impl = "auto"
        if triton_usable(x):
            fns["triton mix"] = _triton_forward(layer, x, premix=False)
            fns["triton premix"] = _triton_forward(layer, x, premix=True)
        fns["auto"] = forward_fn(layer, x)
        # Interleaved with the static conv's samples, so that drift does not skew the ratios.
        fwd = measure_interleaved(fns, device, args.warmup, args.reps)
        with torch.no_grad():
            form, premix = layer._resolve(x, None)
        picked = form if premix is None else f"{form} {'premix' if premix else 'mix'}"
        for name in fns:
            if name != "static":
                auto = name == "auto"
                rows.append(
                    Row(
                        case,
                        name,
                        "forward",
                        fwd[name],
                        fwd["static"],
                        bar=bar_for_auto if auto else None,
                        notes=f"picked {picked}" if auto else "",
                    )
                )
        rows.append(
            Row(
                case,
                "auto vs grouped",
                "forward",
                fwd["auto"],
                fwd["grouped"],
                bar=0.5,
                notes="baseline = batch-folded grouped form",
            )
        )
        if on_gpu:
            graph = {
                name: measure(graphed(fn, device), device, args.warmup, args.reps).median_ms
                for name, fn in fns.items()
                if name in ("static", "grouped", "triton mix", "triton premix", "auto")
            }
            for name, ms in graph.items():
                if name != "static":
                    rows.append(
                        Row(
                            case,
                            f"{name} (CUDA graph)",
                            "forward",
                            ms,
                            graph["static"],
                            bar=bar_for_auto if name == "auto" else None,
                            notes="baseline = static conv in a CUDA graph",
                        )
                    )
            rows.append(
                Row(
                    case,
                    "auto vs grouped (CUDA graph)",
                    "forward",
                    graph["auto"],
                    graph["grouped"],
                    bar=0.5,
                )
            )
        base_train = measure(
            train_step_fn(plain.train(), x), device, args.warmup, args.reps, memory=True
        )
        layer.train()
        train_forms = ["auto", *TORCH_FORMS]
        if triton_usable(x):
            train_forms.append("triton")
        for form in train_forms:
            layer.impl = form
            timing = measure(train_step_fn(layer, x), device, args.warmup, args.reps, memory=True)
            rows.append(
                Row(
                    case,
                    form,
                    "train step",
                    timing.median_ms,
                    base_train.median_ms,
                    timing.peak_mib,
                    base_train.peak_mib,
                )
            )
        layer.impl = "auto"
    report(
        f"CondConv layer, {experts} experts, batch {batch} (baseline: static nn.Conv2d)",
        rows,
        device,
        dtype,
        args.json,
    )


if __name__ == "__main__":
    main()
