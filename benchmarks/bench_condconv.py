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

Exported (CPU only; ``--onnx-only`` runs just this table): each kxk case, plus EfficientNet's
depthwise 5x5, exported to ONNX with a dynamic batch (``torch.onnx.export(dynamo=True)``) in the
layer's export form (``"taps"``, or ``"expert_sum"`` for depthwise) and, for comparison, forced
to ``"expert_sum"`` (the export form before ``"taps"``: E times the MACs); both run in
onnxruntime (CPU provider, as many intra-op threads as torch uses) at batch 1 and 64, their
samples interleaved with the eager layer's (``auto``). No bar; NOTES.md has the expectation.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from dynaconv import CondConv2d
from dynaconv.kernels import triton_usable
from dynaconv.layers.condconv.layer import export_form
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
TORCH_FORMS = ("grouped", "expert_sum", "bmm", "taps")

#: Exported cases: (name, Cin, Cout, kernel, size, groups).
ONNX_CASES = [
    ("3x3 256->256 14x14", 256, 256, 3, 14, 1),
    ("3x3 64->64 56x56", 64, 64, 3, 56, 1),
    ("dw 5x5 480 14x14", 480, 480, 5, 14, 480),
]


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


def _onnx_session(layer: CondConv2d, x: torch.Tensor, path: Path):
    import onnxruntime as ort

    torch.onnx.export(
        layer,
        (x,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def onnx_rows(args) -> list[Row]:
    """Exported layer in onnxruntime against the eager layer, and against the old export form."""
    import onnxruntime as ort

    device, rows = torch.device("cpu"), []
    batches = (1, 4) if args.quick else (1, 64)
    with tempfile.TemporaryDirectory() as folder:
        for case, cin, cout, k, size, groups in ONNX_CASES:
            torch.manual_seed(0)
            layer = CondConv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False).eval()
            form = export_form(layer.spec, layer.weight)
            example = torch.randn(2, cin, size, size)
            sessions = {form: _onnx_session(layer, example, Path(folder) / f"{form}.onnx")}
            if form != "expert_sum":
                old = copy.deepcopy(layer)
                old.impl = "expert_sum"
                sessions["expert_sum"] = _onnx_session(old, example, Path(folder) / "old.onnx")
            for batch in batches:
                x = torch.randn(batch, cin, size, size)
                feed = x.numpy()
                fns = {"eager": forward_fn(layer, x)}
                for name, (session, input_name) in sessions.items():
                    fns[name] = lambda s=session, n=input_name, f=feed: s.run(None, {n: f})
                times = measure_interleaved(fns, device, args.warmup, args.reps)
                label = f"{case}, batch {batch}"
                for name in sessions:
                    rows.append(
                        Row(
                            label,
                            f"onnxruntime {name}",
                            "forward",
                            times[name],
                            times["eager"],
                            notes="baseline = eager layer (auto)"
                            + (", export form" if name == form else ", old export form"),
                        )
                    )
                if form != "expert_sum":
                    rows.append(
                        Row(
                            label,
                            f"onnxruntime {form} vs expert_sum",
                            "forward",
                            times[form],
                            times["expert_sum"],
                            notes="baseline = old export form in onnxruntime",
                        )
                    )
    report(
        f"CondConv layer exported to ONNX, 8 experts, onnxruntime {ort.__version__} "
        "(baseline: eager layer)",
        rows,
        device,
        torch.float32,
        None if args.json is None else args.json.with_name(f"{args.json.stem}-onnx.json"),
    )
    return rows


def main() -> None:
    onnx_only = "--onnx-only" in sys.argv
    if onnx_only:
        sys.argv.remove("--onnx-only")
    args = common_args(__doc__.splitlines()[0])
    if onnx_only:
        onnx_rows(args)
        return
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
        picked = layer.inference_form(x)
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
    if device.type == "cpu":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: no exported rows", flush=True)
        else:
            onnx_rows(args)


if __name__ == "__main__":
    main()
