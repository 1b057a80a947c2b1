"""CPU inference speed of every deployed network against its dense counterpart.

For each network (random weights, schedules brought to progress 1 first so that the learned
structure is the final one; BatchNorm statistics set from a random batch so that eval mode
normalises as after training), three models are timed, fp32, in eval mode:

* ``dense``: the dense counterpart. For a network built of dynaconv layers, the same network
  with every dynaconv layer replaced by a plain ``nn.Conv2d`` of the same shape (CondenseNet's
  learned group convs become dense 1x1 convs, DyDenseNet's and DyResNet's DGC layers dense
  convs, G-ResNeXt's DGConv layers dense 3x3 convs: what each computes before it is
  deployed, without the masking). EfficientNet-B0-CondConv: EfficientNet-B0 with plain convs
  (the same builder with ``num_experts=None``). torchvision's ResNet-18 converted to a family:
  the ResNet-18 it was converted from.
* ``undeployed``: the network as trained (masks, gates, routing), eager only;
* ``deployed``: ``dynaconv.deploy(network)`` (verified against the network on a random batch).

Each model runs in eager PyTorch and, for ``dense`` and ``deployed``, in onnxruntime: the
model is exported with ``torch.onnx.export(dynamo=True)`` with a dynamic batch and its
onnxruntime output is checked against eager PyTorch on a batch of another size before it is
timed (a model that fails the check is not timed). Timing: ``harness.measure_interleaved``
(the variants' samples taken in turn, so a shared machine's drift hits them alike), median
after warm-up, at batch 1 and 64. The header prints the torch and onnxruntime versions, the
CPU model (read from ``/proc/cpuinfo``) and the thread counts.

Learned structure used: LGC (CondenseNet, ResNet-18 + LGC) ``G = C = 4``, fully condensed;
DGC as each network's paper (DyDenseNet 25% kept, DyResNet 45%; ResNet-18 + DGC 4 heads,
50% kept); DGConv gates set so that every layer has ``--gresnext-groups`` groups in
G-ResNeXt-50 (default 32, the cardinality of ResNeXt-50 32x4d) and ``--dgconv-groups`` in
ResNet-18 + DGConv (default 2: the 50% connection budget of the accuracy study); CondConv 8
experts. CIFAR networks run at 32x32; ImageNet networks at ``--image-size`` (default 128, to
keep the run bounded on a small CPU; the ratios at 224 may differ), except ImageNet
CondenseNet-74, whose head pools 7x7 and so needs 224x224.

CondenseNet's paper claims its learned group convolution gives real speed-ups on mobile CPUs
(batch 1). The report ends with that comparison on this CPU: deployed CondenseNet against its
dense counterpart at batch 1, eager and onnxruntime.

    python benchmarks/bench_deploy_cpu.py                  # every network (tens of minutes)
    python benchmarks/bench_deploy_cpu.py --quick          # small sizes, few repetitions
    python benchmarks/bench_deploy_cpu.py --only condensenet86 resnet18-dgc
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

import dynaconv
from evidence_common import (
    DEFAULT_PLOT_DIR,
    machine_line,
    machine_summary,
    markdown_table,
    positive_int,
    wrap_title,
    write_json,
)
from harness import measure_interleaved

CPU = torch.device("cpu")
#: Random images whose statistics set the BatchNorms (:func:`calibrate_batchnorm`); every
#: input of the benchmark is drawn from them (:class:`Models`).
CALIBRATION_BATCH = 16

# --------------------------------------------------------------------------------------------
# dense counterparts and learned structure


def plain_counterpart(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dynaconv layer replaced by an ``nn.Conv2d`` of its shape.

    The new convs have their default initialisation (only the cost matters here). Layers that
    take extra forward arguments (CondConv with ``shared_routing``) cannot be swapped; build
    such networks' counterparts explicitly.
    """
    dense = copy.deepcopy(model)
    for name, layer in list(dynaconv.dynaconv_layers(dense)):
        conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias=getattr(layer, "bias", None) is not None,
            padding_mode=layer.padding_mode,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent_name) if parent_name else dense, child, conv)
    return dense.eval()


def set_dgconv_groups(model: nn.Module, groups: int) -> None:
    """Give every DGConv layer ``min(groups, C)`` contiguous groups (its leading gates zero).

    ``groups`` must be a power of two. Gate ``k`` (most significant bit first) zero splits the
    channels by that bit, so zeroing the first ``log2(groups)`` gates gives contiguous groups.
    """
    if groups < 1 or groups & (groups - 1):
        raise ValueError(f"groups must be a power of two, got {groups}")
    zeros = groups.bit_length() - 1
    for _, layer in dynaconv.dynaconv_layers(model):
        if layer.method != "dgconv":
            continue
        gate = layer.gate
        signs = torch.ones_like(gate)
        signs[: min(zeros, gate.numel())] = -1.0
        with torch.no_grad():
            gate.copy_(signs * 1e-3)


def calibrate_batchnorm(model: nn.Module, batch: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of its input, in one eval forward.

    Each BatchNorm, as the eval-mode forward of ``batch`` reaches it, first takes the
    per-channel mean and (biased) variance of its own input as running statistics, so it
    normalises ``batch`` exactly, given the BatchNorms before it, already set. With random
    weights and the initial statistics (mean 0, variance 1), eval mode normalises nothing, and
    in DyResNet-18, whose DGC layers scale channels by saliencies that grow with their input,
    activations overflow to inf by the last stage (statistics from train-mode forwards of a
    few small batches do not prevent it either). This keeps every network finite, which the
    deploy check and the onnxruntime comparison need, without changing what a forward costs.
    A forward never changes a dynaconv layer's state, so the schedules do not move.
    """

    def set_statistics(norm: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        norm.running_mean.copy_(x.mean(dims))
        norm.running_var.copy_(x.var(dims, unbiased=False))

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [norm.register_forward_pre_hook(set_statistics) for norm in norms]
    try:
        model.eval()
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# the networks


@dataclass(frozen=True)
class Case:
    """One network: how to build it (random weights) and its dense counterpart."""

    name: str
    build: Callable[[argparse.Namespace], nn.Module]
    dense: Callable[[nn.Module], nn.Module]
    dense_text: str
    size: int | None = None  # fixed input size (CIFAR 32; a fixed pooling head); else --image-size

    def input_size(self, args: argparse.Namespace) -> int:
        return self.size or args.image_size


def _resnet18(method: str, options: dict[str, Any]) -> Callable[[argparse.Namespace], nn.Module]:
    def build(args: argparse.Namespace) -> nn.Module:
        model = torchvision.models.resnet18(num_classes=1000)
        converted = dynaconv.convert(model, method, exclude="conv1", **options)
        if method == "dgconv":
            set_dgconv_groups(converted, args.dgconv_groups)
        return converted

    return build


def _g_resnext50(args: argparse.Namespace) -> nn.Module:
    model = dynaconv.models.g_resnext50()
    set_dgconv_groups(model, args.gresnext_groups)
    return model


def _resnet18_dense(_: nn.Module) -> nn.Module:
    return torchvision.models.resnet18(num_classes=1000).eval()


def _efficientnet_dense(_: nn.Module) -> nn.Module:
    return dynaconv.models.efficientnet_condconv(num_experts=None).eval()


SAME_WITH_CONVS = "same network, plain convs"
RESNET18_OPTIONS: dict[str, dict[str, Any]] = {
    "doconv": {},
    "condconv": {"num_experts": 8},
    "dgc": {"heads": 4, "gate_factor": 0.5},
    "dgconv": {},
    "lgc": {"learned_groups": 4, "condense_factor": 4},
}

CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "condensenet86",
            lambda a: dynaconv.models.condensenet86(num_classes=10),
            plain_counterpart,
            SAME_WITH_CONVS,
            size=32,
        ),
        Case(
            "condensenet74-imagenet-g4",
            lambda a: dynaconv.models.condensenet74_imagenet_g4(),
            plain_counterpart,
            SAME_WITH_CONVS,
            size=224,  # its head pools 7x7: the input must be 224
        ),
        Case(
            "dydensenet86",
            lambda a: dynaconv.models.dydensenet86(num_classes=10),
            plain_counterpart,
            SAME_WITH_CONVS,
            size=32,
        ),
        Case(
            "dyresnet18",
            lambda a: dynaconv.models.dyresnet18(num_classes=1000),
            plain_counterpart,
            SAME_WITH_CONVS,
        ),
        Case("g-resnext50", _g_resnext50, plain_counterpart, SAME_WITH_CONVS),
        Case(
            "efficientnet-b0-condconv8",
            lambda a: dynaconv.models.efficientnet_b0_condconv8(),
            _efficientnet_dense,
            "EfficientNet-B0 (plain convs)",
        ),
        *(
            Case(f"resnet18-{m}", _resnet18(m, o), _resnet18_dense, "torchvision ResNet-18")
            for m, o in RESNET18_OPTIONS.items()
        ),
    )
}


# --------------------------------------------------------------------------------------------
# onnxruntime


@dataclass
class OnnxModel:
    """An exported model in an onnxruntime session, or why there is none."""

    session: Any = None
    error: str = ""
    max_rel_error: float | None = None

    def runner(self, x: Tensor) -> Callable[[], object]:
        feed = {self.session.get_inputs()[0].name: x.numpy()}
        return lambda: self.session.run(None, feed)


def export_onnx(
    model: nn.Module, example: Tensor, check: Tensor, folder: Path, name: str, threads: int
) -> OnnxModel:
    """Export with a dynamic batch, load in onnxruntime, compare with eager on ``check``."""
    import onnxruntime

    path = folder / f"{name}.onnx"
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        (actual,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    except Exception as error:  # report it in the table, time the rest
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return OnnxModel(error=f"export failed: {type(error).__name__}: {first[:160]}")
    with torch.inference_mode():
        expected = model(check)
    scale = float(expected.abs().max().clamp_min(1e-12))
    error = float((torch.from_numpy(actual) - expected).abs().max()) / scale
    if not error <= 1e-4:
        return OnnxModel(error=f"onnxruntime output differs (max rel. error {error:.2g})")
    return OnnxModel(session, max_rel_error=error)


# --------------------------------------------------------------------------------------------
# measuring one network


@dataclass
class Result:
    """Timings (median ms) of one network's variants at each batch, and its counts."""

    name: str
    dense_text: str
    input_size: int
    ms: dict[int, dict[str, float]] = field(default_factory=dict)
    params_dense: int | None = None
    params_deployed: int | None = None
    macs_dense: int | None = None
    macs_active: int | None = None
    onnx_errors: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def ratio(self, batch: int, runtime: str) -> float | None:
        row = self.ms.get(batch, {})
        dense, deployed = row.get(f"dense {runtime}"), row.get(f"deployed {runtime}")
        return None if dense is None or deployed is None else deployed / dense


def _forward(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


@dataclass
class Models:
    """The three models of one network and the images they run on."""

    network: nn.Module  # as trained (progress 1), eval mode
    dense: nn.Module
    deployed: nn.Module
    images: Tensor  # the BatchNorm calibration batch; every input is drawn from it

    def batch(self, size: int, offset: int = 0) -> Tensor:
        """``size`` images of :attr:`images` (repeated as needed), starting at ``offset``."""
        return self.images[(torch.arange(size) + offset) % len(self.images)]

    @property
    def example(self) -> Tensor:  # deploy verification and ONNX tracing
        return self.batch(2)

    @property
    def check(self) -> Tensor:  # onnxruntime against eager PyTorch, another batch size
        return self.batch(3, offset=2)


def prepare(case: Case, size: int, args: argparse.Namespace, generator: torch.Generator) -> Models:
    """Build the network at progress 1, its dense counterpart and its verified deployed form.

    Every input comes from the random batch that set the BatchNorm statistics: eval mode
    computes each image on its own, so those images stay as finite as in the calibration
    forward, while other random images can still overflow a random DyResNet-18 at the small
    feature maps of the last stage (statistics of a few positions). The cost of a forward
    does not depend on the pixel values.
    """
    torch.manual_seed(0)
    network = case.build(args)
    dynaconv.set_progress(network, 1.0)
    images = torch.randn(CALIBRATION_BATCH, 3, size, size, generator=generator)
    calibrate_batchnorm(network, images)
    dense = case.dense(network)
    calibrate_batchnorm(dense, images)
    deployed = dynaconv.deploy(network, example_input=images[:2])
    return Models(network, dense, deployed, images)


def count(result: Result, models: Models) -> None:
    """Parameters and MACs per image: the dense counterpart's, the deployed network's."""
    shape = (1, *models.example.shape[1:])
    dense = dynaconv.profile(models.dense, shape, deployed=False)
    network = dynaconv.profile(models.network, shape)
    result.params_dense, result.params_deployed = dense["params"], network["params_deployed"]
    result.macs_dense, result.macs_active = dense["macs"], network["macs_active"]


def export_both(result: Result, models: Models) -> dict[str, OnnxModel]:
    """The dense and deployed models in onnxruntime (failures noted in ``result``)."""
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:  # a session keeps its model in memory
        for label, model in (("dense", models.dense), ("deployed", models.deployed)):
            exported = export_onnx(
                model, models.example, models.check, Path(folder), label, torch.get_num_threads()
            )
            result.onnx_errors[label] = exported.max_rel_error
            if exported.error:
                result.notes.append(f"{label} ONNX: {exported.error}")
            sessions[label] = exported
    return sessions


def time_variants(
    models: Models, sessions: dict[str, OnnxModel], x: Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Median ms of every variant on ``x``, their samples interleaved."""
    fns: dict[str, Callable[[], object]] = {}
    if "eager" in args.runtimes:
        fns["dense eager"] = _forward(models.dense, x)
        fns["undeployed eager"] = _forward(models.network, x)
        fns["deployed eager"] = _forward(models.deployed, x)
    for label, exported in sessions.items():
        if exported.session is not None:
            fns[f"{label} onnx"] = exported.runner(x)
    return measure_interleaved(fns, CPU, args.warmup, args.reps)


def measure_case(case: Case, args: argparse.Namespace) -> Result:
    """Build, deploy (verified), export (checked) and time one network; errors are recorded."""
    size = case.input_size(args)
    result = Result(case.name, case.dense_text, size)
    started = time.perf_counter()
    try:
        generator = torch.Generator().manual_seed(0)
        models = prepare(case, size, args, generator)
        count(result, models)
        sessions = export_both(result, models) if "onnx" in args.runtimes else {}
        for batch in args.batches:
            result.ms[batch] = time_variants(models, sessions, models.batch(batch), args)
    except Exception as error:  # one failing network must not hide the others' rows
        traceback.print_exc(file=sys.stderr)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        result.error = f"{type(error).__name__}: {first[:200]}"
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# report

HEADERS = (
    "network",
    "input",
    "batch",
    "dense counterpart",
    "MACs dense / active (per image)",
    "params dense / deployed",
    "dense eager ms",
    "undeployed eager ms",
    "deployed eager ms",
    "deployed / dense eager",
    "dense ORT ms",
    "deployed ORT ms",
    "deployed / dense ORT",
)


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}M"


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.error:
            rows.append([r.name, f"{r.input_size}px", "-", f"FAILED: {r.error}", *["-"] * 9])
            continue
        for batch, ms in r.ms.items():
            rows.append(
                [
                    r.name,
                    f"{r.input_size}px",
                    str(batch),
                    r.dense_text,
                    f"{_millions(r.macs_dense)} / {_millions(r.macs_active)}",
                    f"{_millions(r.params_dense)} / {_millions(r.params_deployed)}",
                    _ms(ms.get("dense eager")),
                    _ms(ms.get("undeployed eager")),
                    _ms(ms.get("deployed eager")),
                    _ratio(r.ratio(batch, "eager")),
                    _ms(ms.get("dense onnx")),
                    _ms(ms.get("deployed onnx")),
                    _ratio(r.ratio(batch, "onnx")),
                ]
            )
    return rows


def condensenet_verdict(results: Sequence[Result]) -> list[str]:
    """Does deployed CondenseNet run faster than its dense counterpart at batch 1 here?"""
    lines = []
    for r in results:
        if not r.name.startswith("condensenet") or r.error or 1 not in r.ms:
            continue
        parts = []
        for runtime, label in (("eager", "eager PyTorch"), ("onnx", "onnxruntime")):
            ratio = r.ratio(1, runtime)
            if ratio is not None:
                verdict = "faster" if ratio < 1 else "NOT faster"
                parts.append(f"{label} {ratio:.2f}x ({verdict})")
        undeployed = r.ms[1].get("undeployed eager")
        deployed = r.ms[1].get("deployed eager")
        if undeployed and deployed:
            parts.append(f"deployed / masked (undeployed) eager {deployed / undeployed:.2f}x")
        lines.append(
            f"- {r.name} ({r.input_size}px), batch 1, deployed / dense: "
            + ("; ".join(parts) if parts else "not measured")
        )
    return lines


def plot_ratios(results: Sequence[Result], batches: Sequence[int], path: Path, title: str) -> None:
    """Bars of deployed / dense latency per network, per runtime and batch (1 = no change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if not r.error and r.ms]
    series = [(rt, b) for rt in ("eager", "onnx") for b in batches]
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(len(measured), 2) * len(series) / 2 + 1.5))
    height = 0.8 / len(series)
    for index, (runtime, batch) in enumerate(series):
        values = [r.ratio(batch, runtime) for r in measured]
        positions = [i + index * height for i in range(len(measured))]
        ax.barh(
            positions,
            [math.nan if v is None else v for v in values],
            height,
            label=f"{'ORT' if runtime == 'onnx' else runtime} batch {batch}",
        )
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(measured))])
    ax.set_yticklabels([r.name for r in measured])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("deployed latency / dense counterpart latency (< 1: faster)")
    ax.set_title(wrap_title(title), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="only cpu is measured (see the docstring)")
    parser.add_argument("--quick", action="store_true", help="64px, batches 1 and 8, 3 reps")
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=None, metavar="NAME")
    parser.add_argument("--image-size", type=positive_int, default=None)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None)
    parser.add_argument(
        "--runtimes", nargs="+", choices=("eager", "onnx"), default=["eager", "onnx"]
    )
    parser.add_argument("--reps", type=positive_int, default=None)
    parser.add_argument("--warmup", type=positive_int, default=None)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch and ORT threads")
    parser.add_argument("--dgconv-groups", type=positive_int, default=2)
    parser.add_argument("--gresnext-groups", type=positive_int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--plot-dir", type=Path, default=DEFAULT_PLOT_DIR)
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (64 if args.quick else 128)
    args.batches = args.batches or ([1, 8] if args.quick else [1, 64])
    args.reps = args.reps or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    for name in ("dgconv_groups", "gresnext_groups"):
        value = getattr(args, name)
        if value & (value - 1):
            parser.error(f"--{name.replace('_', '-')} must be a power of two, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every network; 0 unless a network failed (build, deploy or export check)."""
    args = parse_args(argv)
    title = "CPU deployment speed: deployed networks against their dense counterparts"
    if args.device != "cpu":
        print(f"## {title}\n\nskipped: this benchmark measures the CPU (--device {args.device})")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    cases = [CASES[name] for name in (args.only or CASES)]
    versions = {
        "onnxruntime": onnxruntime.__version__,
        "ORT intra-op threads": torch.get_num_threads(),
    }
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_deploy_cpu.py" + "".join(f" {w}" for w in words)
    setting = (
        f"fp32, batches {', '.join(map(str, args.batches))}, CIFAR networks 32px, ImageNet "
        f"networks {args.image_size}px (CondenseNet-74: 224px), median of {args.reps} interleaved samples after "
        f"{args.warmup} warm-up; DGConv groups: G-ResNeXt-50 {args.gresnext_groups}, ResNet-18 "
        f"{args.dgconv_groups}"
    )
    print(f"{title}\n{setting}\n{machine_line(versions)}", flush=True)
    started = time.perf_counter()
    results = []
    for case in cases:
        result = measure_case(case, args)
        results.append(result)
        status = f"FAILED: {result.error}" if result.error else "ok"
        print(f"  {case.name}: {status} ({result.seconds:.0f} s)", flush=True)
    verdict = condensenet_verdict(results)
    text = "\n".join(
        [
            f"## {title}",
            f"{setting}; {machine_line(versions)}; total {(time.perf_counter() - started) / 60:.1f} min",
            f"command: `{command}`",
            "",
            markdown_table(HEADERS, table_rows(results)),
            "",
            *(f"- {r.name}: {note}" for r in results for note in r.notes),
            "",
            "CondenseNet's mobile-CPU claim, on this CPU:" if verdict else "",
            *verdict,
        ]
    ).rstrip()
    print("\n" + text, flush=True)
    plot = args.plot_dir / "deploy_cpu_latency.png"
    plot_ratios(results, args.batches, plot, f"{machine_line(versions)}\n{setting}")
    print(f"\nwrote {plot}")
    if args.json is not None:
        write_json(
            args.json,
            {
                "title": title,
                "setting": setting,
                "command": command,
                "machine": machine_summary() | versions,
                "results": [
                    {k: v for k, v in vars(r).items()}
                    | {"ms": {str(b): ms for b, ms in r.ms.items()}}
                    for r in results
                ],
            },
        )
    failed = [r for r in results if r.error or r.notes]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
