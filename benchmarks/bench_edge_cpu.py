"""Edge deployment on one CPU thread: CondenseNet and CondConv in eager PyTorch, onnxruntime and
ExecuTorch (XNNPACK), against their dense twins and peers.

Sections (``--only`` picks some):

* ``condensenet``: CondenseNet-86 (CIFAR, 32px, random weights condensed to the end, BatchNorm
  statistics from a random batch, as ``bench_deploy_cpu.py``), deployed, against its twin with
  plain convs (``plain_counterpart``) and the paper's converted model (``paper_converted``),
  at each ``--batches``: eager (also the deployed network with its 3x3 convs unpadded and the
  previous deployed form, layer by layer, which the blocks still run when a layer carries a
  forward hook) and onnxruntime (dynamic-batch export), and in ExecuTorch at batch 1. Its
  tables give each variant's thread CPU time beside the wall time (steadier on a loaded
  machine). One command, a few minutes on a quiet machine:
  ``python benchmarks/bench_edge_cpu.py --only condensenet``;
* ``condconv``: EfficientNet-B0-CondConv8 (deployed: BatchNorm folded into the convs) against
  timm's EfficientNet-B0 at each ``--condconv-sizes`` (default 128 and 224px) and
  ``--batches``: in onnxruntime exported for that fixed batch (``dynaconv export --batch N``:
  each CondConv layer is the kernel mixing and one Conv), the same file rewritten for
  onnxruntime's blocked kernels (:mod:`dynaconv.onnxruntime_nchwc`) and the dynamic-batch
  export, against timm's EfficientNet-B0 exported (its graph does not depend on the batch:
  one dynamic-batch file); in eager PyTorch against timm's EfficientNet-B0 and timm's own
  CondConv model (``efficientnet_cc_b0_8e``). Batches above 1 take ``max(9, reps // 2)``
  samples. ``--only condconv`` runs this section alone (about 4 minutes);
* ``executorch``: ResNet-18 + LGC and G-ResNeXt-50 (``--image-size``, default 128px), deployed
  against their dense twins in ExecuTorch (XNNPACK, one thread), batch 1.

Every table times its variants interleaved (``harness.measure_interleaved``: median of
``--reps`` samples after warm-up) and times one model twice (``noise`` rows: the same model
under two names; its ratio is the run's noise). Ratios within one table only. The header prints
the machine line.

    python benchmarks/bench_edge_cpu.py
    python benchmarks/bench_edge_cpu.py --only condensenet --batches 1 16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dynaconv
from bench_deploy_cpu import CASES, calibrate_batchnorm, prepare
from evidence_common import machine_line, markdown_table, positive_int, write_json
from harness import measure_interleaved

CPU = torch.device("cpu")
SECTIONS = ("condensenet", "condconv", "executorch")

Timed = dict[str, Callable[[], object]]


def eager(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def layer_by_layer(deployed: nn.Module) -> nn.Module:
    """A copy of a deployed CondenseNet whose blocks run each layer's own forward (the form
    before the folded one): a forward hook on a dense layer turns the folded form off."""
    from dynaconv.models.condensenet import CondensedDenseLayer

    previous = copy.deepcopy(deployed)
    for module in previous.modules():
        if isinstance(module, CondensedDenseLayer):
            module.register_forward_hook(lambda *args: None)
    return previous


def relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = float(expected.abs().max().clamp_min(1e-12))
    return float((actual - expected).abs().max()) / scale


def onnx_runner(
    model: nn.Module, x: Tensor, folder: Path, name: str, *, dynamic: bool, check: Tensor
) -> Callable[[Tensor], Callable[[], object]]:
    """Export ``model`` (dynamic or fixed batch), check it in onnxruntime (1e-4 relative, on
    ``check``), and return a maker of timed calls."""
    path = folder / f"{name}.onnx"
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, external_data=False, verbose=False,
        dynamic_shapes=shapes,
    )  # fmt: skip
    return onnx_session(model, path, name, check)


def onnx_session(
    model: nn.Module, path: Path, name: str, check: Tensor
) -> Callable[[Tensor], Callable[[], object]]:
    """A one-thread onnxruntime session of ``path``, checked against ``model`` on ``check``
    (1e-4 relative); returns a maker of timed calls."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    (actual,) = session.run(None, {name_in: check.numpy()})
    with torch.inference_mode():
        error = relative_error(torch.from_numpy(actual), model(check))
    if not error <= 1e-4:
        raise RuntimeError(f"{name}: onnxruntime differs from eager (max rel. error {error:.2g})")

    def runner(batch: Tensor) -> Callable[[], object]:
        feed = {name_in: batch.numpy()}
        return lambda: session.run(None, feed)

    return runner


def pte_runner(model: nn.Module, x: Tensor, folder: Path, name: str) -> Callable[[], object]:
    """``model`` as an ExecuTorch program (XNNPACK), checked against eager on ``x``."""
    from executorch.runtime import Runtime

    from dynaconv.cli.commands import write_pte

    path = write_pte(model, x, folder / f"{name}.pte")
    method = Runtime.get().load_program(str(path)).load_method("forward")
    with torch.inference_mode():
        error = relative_error(method.execute([x])[0], model(x))
    if not error <= 1e-4:
        raise RuntimeError(f"{name}: ExecuTorch differs from eager (max rel. error {error:.2g})")
    return lambda: method.execute([x])


def timed_rows(
    title: str, fns: Timed, base: str, args: argparse.Namespace, reps: int | None = None
) -> list[list[str]]:
    """Interleaved medians of ``fns`` (``reps`` samples, default ``--reps``); one row each: ms
    and ratio to ``base``."""
    ms = measure_interleaved(fns, CPU, args.warmup, args.reps if reps is None else reps)
    return [[title, name, f"{value:.2f}", f"{value / ms[base]:.2f}x"] for name, value in ms.items()]


# --------------------------------------------------------------------------------------------
# sections


def measure_wall_and_cpu(
    fns: Timed, warmup: int, reps: int, target_ms: float = 5.0
) -> dict[str, tuple[float, float]]:
    """Median wall and thread CPU milliseconds per call of each of ``fns``, samples taken in
    turn (round robin). On a loaded machine the thread's CPU time leaves out the time it
    waited for a core (not the cache and memory-bus contention); one torch thread and one
    onnxruntime thread both compute on the calling thread."""
    inners = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        started = time.perf_counter()
        fn()
        single_ms = (time.perf_counter() - started) * 1e3
        inners[name] = max(1, min(100, int(target_ms / max(single_ms, 1e-3))))
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            inner = inners[name]
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                fn()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            samples[name].append((wall * 1e3 / inner, cpu * 1e3 / inner))
    return {
        name: (
            statistics.median(wall for wall, _ in values),
            statistics.median(cpu for _, cpu in values),
        )
        for name, values in samples.items()
    }


def timed_rows_cpu(title: str, fns: Timed, base: str, args: argparse.Namespace) -> list[list[str]]:
    """Interleaved medians of ``fns``; one row each: wall ms, its ratio to ``base``, thread
    CPU ms and its ratio."""
    ms = measure_wall_and_cpu(fns, args.warmup, args.reps)
    wall_base, cpu_base = ms[base]
    return [
        [
            title,
            name,
            f"{wall:.2f}",
            f"{wall / wall_base:.2f}x",
            f"{cpu:.2f}",
            f"{cpu / cpu_base:.2f}x",
        ]
        for name, (wall, cpu) in ms.items()
    ]


CONDENSENET_HEADER = ("table", "variant", "wall ms", "wall ratio", "CPU ms", "CPU ratio")


def paper_converted(network: nn.Module) -> nn.Module:
    """CondenseNet as the paper's code converts it (``convert_model``): each learned group conv
    becomes gather, BatchNorm, ReLU, grouped conv and channel shuffle as separate ops, the 3x3
    conv keeps its BatchNorm and ReLU, the block concatenates. The classifier stays whole
    (the reference also prunes half its inputs; at 10 classes that is noise here)."""
    from bench_lgc import ReferenceConverted
    from dynaconv.models.condensenet import CondenseLayer

    converted = copy.deepcopy(network).eval()
    for module in converted.modules():
        if isinstance(module, CondenseLayer):
            module.conv_1 = ReferenceConverted(module.conv_1, module.norm_1).eval()
            module.norm_1, module.relu_1 = nn.Identity(), nn.Identity()
    return converted.requires_grad_(False)


def unpadded_3x3(deployed: nn.Module) -> nn.Module:
    """A copy of a deployed CondenseNet whose grouped 3x3 convs run unpadded
    (``condensenet.GROUP_ROWS_MIN``)."""
    from dynaconv.models.condensenet import CondensedDenseLayer

    plain = copy.deepcopy(deployed)
    for module in plain.modules():
        if isinstance(module, CondensedDenseLayer):
            module.refresh()  # a copy's tensors carry new versions: derive its state first
            module._buffers["_padded_conv_2"] = None
    return plain


def condensenet_section(args: argparse.Namespace, folder: Path) -> list[list[str]]:
    network = argparse.Namespace(image_size=32, dgconv_groups=2, gresnext_groups=32)
    models = prepare(CASES["condensenet86"], 32, network, torch.Generator().manual_seed(0))
    previous = layer_by_layer(models.deployed)
    paper = paper_converted(models.network)
    check = models.batch(3, offset=2)
    with torch.inference_mode():
        error = relative_error(paper(check), models.network(check))
    if not error <= 1e-4:
        raise RuntimeError(f"paper's converted model differs (max rel. error {error:.2g})")
    rows = []
    onnx = {
        label: onnx_runner(model, models.example, folder, label, dynamic=True, check=check)
        for label, model in (
            ("dense", models.dense),
            ("deployed", models.deployed),
            ("paper", paper),
        )
    }
    for batch in args.batches:
        x = models.batch(batch)
        fns: Timed = {
            "dense twin": eager(models.dense, x),
            "deployed": eager(models.deployed, x),
            "paper's converted model": eager(paper, x),
            "deployed, 3x3 convs unpadded": eager(unpadded_3x3(models.deployed), x),
            "deployed, layer by layer (previous form)": eager(previous, x),
            "noise: dense twin again": eager(models.dense, x),
        }
        rows += timed_rows_cpu(f"CondenseNet-86 eager, batch {batch}", fns, "dense twin", args)
        fns = {
            "dense twin": onnx["dense"](x),
            "deployed": onnx["deployed"](x),
            "paper's converted model": onnx["paper"](x),
            "noise: dense twin again": onnx["dense"](x),
        }
        title = f"CondenseNet-86 onnxruntime, batch {batch}"
        rows += timed_rows_cpu(title, fns, "dense twin", args)
    if args.executorch:
        x = models.batch(1)
        dense = pte_runner(models.dense, x, folder, "condensenet_dense")
        fns = {
            "dense twin": dense,
            "deployed": pte_runner(models.deployed, x, folder, "condensenet_deployed"),
            "noise: dense twin again": dense,
        }
        title = "CondenseNet-86 ExecuTorch (XNNPACK), batch 1"
        rows += timed_rows_cpu(title, fns, "dense twin", args)
    return rows


def condconv_models() -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(deployed EfficientNet-B0-CondConv8, timm EfficientNet-B0, timm's CondConv model)``,
    random weights, BatchNorm statistics from a random batch."""
    import timm

    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    network = dynaconv.models.efficientnet_b0_condconv8().eval()
    calibrate_batchnorm(network, images)
    deployed = dynaconv.deploy(network, example_input=images[:2])
    plain = timm.create_model("efficientnet_b0").eval()
    peer = timm.create_model("efficientnet_cc_b0_8e").eval()
    for model in (plain, peer):
        calibrate_batchnorm(model, images)
    return deployed, plain, peer


def nchwc_runner(
    model: nn.Module, fixed: Path, folder: Path, name: str, check: Tensor, *, chain: bool = True
) -> Callable[[Tensor], Callable[[], object]]:
    """The fixed-batch export ``fixed`` rewritten for onnxruntime's blocked kernels
    (:mod:`dynaconv.onnxruntime_nchwc`; ``chain``: tensors kept blocked between the rewritten
    convs), checked against eager like :func:`onnx_runner`."""
    from dynaconv.onnxruntime_nchwc import write_nchwc

    path = folder / f"{name}.onnx"
    write_nchwc(fixed, path, chain=chain)
    return onnx_session(model, path, name, check)


def condconv_section(args: argparse.Namespace, folder: Path) -> list[list[str]]:
    deployed, plain, peer = condconv_models()
    rows = []
    for size in args.condconv_sizes:
        images = torch.randn(
            max(3, 2 * max(args.batches)),
            3,
            size,
            size,
            generator=torch.Generator().manual_seed(size),
        )
        pair, check = images[:2], images[2:3]
        timm_runner = onnx_runner(plain, pair, folder, f"timm{size}", dynamic=True, check=check)
        dynamic = onnx_runner(
            deployed, pair, folder, f"condconv{size}_dynamic", dynamic=True, check=check
        )
        for batch in args.batches:
            x, check = images[:batch], images[batch : 2 * batch]
            name = f"condconv{size}_b{batch}"
            fixed = onnx_runner(deployed, x, folder, name, dynamic=False, check=check)
            nchwc = nchwc_runner(deployed, folder / f"{name}.onnx", folder, f"{name}_nchwc", check)
            unchained = nchwc_runner(
                deployed, folder / f"{name}.onnx", folder, f"{name}_unchained", check, chain=False
            )
            base = "timm EfficientNet-B0"
            fns: Timed = {
                base: timm_runner(x),
                f"EfficientNet-B0-CondConv8, fixed batch {batch}": fixed(x),
                "same, onnxruntime's blocked kernels (onnxruntime_nchwc)": nchwc(x),
                "same, each rewritten conv between its own reorders (chain=False)": unchained(x),
                "EfficientNet-B0-CondConv8, dynamic batch": dynamic(x),
                "noise: timm EfficientNet-B0 again": timm_runner(x),
            }
            reps = args.reps if batch == 1 else max(9, args.reps // 2)
            title = f"EfficientNet-B0-CondConv8 onnxruntime, {size}px, batch {batch}"
            rows += timed_rows(title, fns, base, args, reps)
            fns = {
                base: eager(plain, x),
                "timm EfficientNet-B0-CondConv8 (efficientnet_cc_b0_8e)": eager(peer, x),
                "EfficientNet-B0-CondConv8, deployed": eager(deployed, x),
                "noise: timm EfficientNet-B0 again": eager(plain, x),
            }
            title = f"EfficientNet-B0-CondConv8 eager, {size}px, batch {batch}"
            rows += timed_rows(title, fns, base, args, reps)
    return rows


def executorch_section(args: argparse.Namespace, folder: Path) -> list[list[str]]:
    rows = []
    network = argparse.Namespace(image_size=args.image_size, dgconv_groups=2, gresnext_groups=32)
    for name in ("resnet18-lgc", "g-resnext50"):
        case = CASES[name]
        size = case.input_size(network)
        models = prepare(case, size, network, torch.Generator().manual_seed(0))
        x = models.batch(1)
        dense = pte_runner(models.dense, x, folder, f"{name}_dense")
        fns: Timed = {
            "dense twin": dense,
            "deployed": pte_runner(models.deployed, x, folder, f"{name}_deployed"),
            "noise: dense twin again": dense,
        }
        title = f"{name} ExecuTorch (XNNPACK), {size}px, batch 1"
        rows += timed_rows(title, fns, "dense twin", args)
    return rows


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="only cpu is measured (run_all.py)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 64px CondConv, batch 1, 3 samples"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--image-size", type=positive_int, default=128)
    parser.add_argument("--condconv-sizes", type=positive_int, nargs="+", default=[128, 224])
    parser.add_argument("--reps", type=positive_int, default=21)
    parser.add_argument("--warmup", type=positive_int, default=3)
    parser.add_argument(
        "--no-executorch", dest="executorch", action="store_false", help="skip ExecuTorch rows"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.condconv_sizes, args.batches, args.reps, args.warmup = [64], [1], 3, 1
        args.executorch, args.only = False, [name for name in args.only if name != "executorch"]
    if args.executorch:
        try:
            import executorch  # noqa: F401
        except ImportError:
            print("executorch is not installed: its rows are skipped")
            args.executorch = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu":
        print(f"## Edge deployment\n\nskipped: this benchmark measures the CPU ({args.device})")
        return 0
    torch.set_num_threads(1)
    import onnxruntime

    versions: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "ORT threads": 1}
    if args.executorch:
        import executorch.extension.pybindings.portable_lib as executorch_runtime

        executorch_runtime._unsafe_reset_threadpool(1)  # XNNPACK's threads: one
        versions["ExecuTorch threads"] = executorch_runtime._threadpool_get_thread_count()
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_edge_cpu.py" + "".join(f" {w}" for w in words)
    print(f"{machine_line(versions)}\ncommand: `{command}`", flush=True)
    sections = {
        "condensenet": condensenet_section,
        "condconv": condconv_section,
        "executorch": executorch_section,
    }
    headers = {name: ("table", "variant", "median ms", "ratio") for name in sections}
    headers["condensenet"] = CONDENSENET_HEADER
    results: dict[str, list[list[str]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only:
            if name == "executorch" and not args.executorch:
                continue
            started = time.perf_counter()
            results[name] = sections[name](args, Path(folder))
            print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
            print(markdown_table(headers[name], results[name]), flush=True)
    print(f"\n{machine_line(versions)}; median of {args.reps} interleaved samples")
    print(f"command: `{command}`")
    for name, section in results.items():
        print(f"\n{markdown_table(headers[name], section)}")
    if args.json is not None:
        keys = {name: [h.replace(" ", "_") for h in header] for name, header in headers.items()}
        rows = [dict(zip(keys[name], row)) for name, section in results.items() for row in section]
        write_json(args.json, {"machine": machine_line(versions), "command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
