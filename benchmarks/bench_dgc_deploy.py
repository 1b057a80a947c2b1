"""DGC on the CPU: does the deployed layer and network run at the kept work?

Two tables, fp32, one torch thread, eval mode, every variant of a table row timed in one
interleaved measurement (samples taken in turn, medians), by default of the calling thread's
CPU time (:func:`measure_cpu_time`: on a shared machine the wall clock of a 1 ms layer mostly
measures the other processes; ``--clock wall`` uses ``harness.measure_interleaved``):

**Single layers** (3x3, stride 1, padding 1, ``Cin = Cout``, 4 heads, half of the input
channels kept; ResNet-18's stage shapes 64ch 32x32, 128ch 16x16, 256ch 8x8, 512ch 4x4) at
each batch:

* ``dense``: ``nn.Conv2d`` of the same shape, timed twice (``dense again``: the noise check);
* ``limit proxy``: ``nn.Conv2d(h*K, Cout, groups=h)`` on an input of ``h*K`` channels: the
  kept MACs with no selection, no gather and no interleave;
* ``auto``: the deployed module (``DynamicGroupConv2d.deploy()``) with ``impl="auto"``;
* each exact form of the deployed module (``head_grouped``, ``batch_grouped``, ``masked``,
  ``bmm``).

Columns: every variant ÷ dense, ``auto`` ÷ the fastest exact form (bar 1.05) and, at batch 1,
``auto`` ÷ the limit proxy (bar 1.3).

**DyResNet-18** (progress 1: 45% of the input channels kept; random weights, BatchNorm
statistics set from a random batch as in ``bench_deploy_cpu.py``) at ``--image-size`` (128),
each batch:

* ``torchvision ResNet-18`` (timed twice: ``... again`` is the noise check);
* ``deployed``: ``dynaconv.deploy(model)`` (its default ``auto``), verified against the
  network on a random batch;
* ``masked``: the undeployed network with every layer's ``impl="masked"`` (the paper's code:
  every channel computed, the gates multiplied in);
* ``dense twin``: the same network with every DGC layer a plain ``nn.Conv2d`` (the
  pre-activation BN-ReLUs stay);
* ``limit proxy``: the dense twin with every DGC layer an ``h``-group conv over ``h`` copies
  of its first ``K`` input channels (the kept MACs and an input copy of the gather's size,
  no saliency, no selection);

in eager PyTorch and in onnxruntime (one intra-op thread; at ``--onnx-batches``, batch 1 by
default: the issue's bar): each model exported with ``torch.onnx.export(dynamo=True)`` at a
static batch (the batch it is timed at), its onnxruntime output checked against eager before
it is timed. Bars (DGC issue): deployed ÷ torchvision ResNet-18 eager <= 0.80 at batch 1 and
<= 1.00 at batch 16; onnxruntime at batch 1, deployed ÷ dense <= 1.0. With
``--onnxruntime-nchwc`` a ``deployed (nchwc)`` row adds the batch-1 file that ``dynaconv export
--batch 1 --onnxruntime-nchwc`` writes (its gathered grouped convs on onnxruntime's blocked
kernels: x86 only, this machine's block size).

    python benchmarks/bench_dgc_deploy.py                    # every table (3-4 minutes, 2 cores)
    python benchmarks/bench_dgc_deploy.py --tables layers    # single layers only
    python benchmarks/bench_dgc_deploy.py --quick            # smoke run, numbers mean nothing
    python benchmarks/bench_dgc_deploy.py --tables network --runtimes onnx --onnxruntime-nchwc
"""

from __future__ import annotations

import os

# Tensors of 2 MiB and more on huge-page boundaries (read by PyTorch at its first allocation,
# so before torch is imported; unless the environment says otherwise): with 4 KiB pages one
# form's per-call time was bimodal from its buffers' placement, and two copies of the same
# form read up to 1.4x apart (benchmarks/NOTES.md).
if __name__ == "__main__":  # a script, not a module imported by tests
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

import dynaconv
from bench_deploy_cpu import calibrate_batchnorm, plain_counterpart
from dynaconv.layers.dgc.layer import DynamicGroupConv2d
from evidence_common import machine_line, markdown_table, positive_int, write_json
from harness import measure_interleaved

CPU = torch.device("cpu")
HEADS = 4
LAYER_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))
FORMS = ("head_grouped", "batch_grouped", "masked", "bmm", "cpu_kernel")


def measure_cpu_time(
    fns: dict[str, Callable[[], object]], warmup: int, reps: int, target_ms: float = 20.0
) -> dict[str, float]:
    """Median CPU time of this thread per call (ms) of each of ``fns``, samples interleaved.

    One torch thread and one onnxruntime thread run every op on the calling thread, so its
    CPU time (``time.thread_time``) is the work of the call; unlike the wall clock it does not
    count the time other processes hold the core (on a shared 2-core machine, most of a
    1 ms layer's wall-clock samples). Each sample times back-to-back calls for about
    ``target_ms`` of CPU time (the clock ticks in microseconds), their number set from the
    fastest of three calls after the warm-up.
    """
    inners = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        # the fastest of 3 calls: one of them may still be ``auto`` measuring its forms,
        # which would leave the variant at one cold call per sample
        single = float("inf")
        for _ in range(3):
            start = time.thread_time()
            fn()
            single = min(single, (time.thread_time() - start) * 1e3)
        inners[name] = max(1, min(200, int(target_ms / max(single, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.thread_time()
            for _ in range(inners[name]):
                fn()
            samples[name].append((time.thread_time() - start) * 1e3 / inners[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(args: argparse.Namespace, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """``--clock thread``: :func:`measure_cpu_time`; ``wall``: ``harness.measure_interleaved``."""
    if args.clock == "thread":
        return measure_cpu_time(fns, args.warmup, args.reps)
    return measure_interleaved(fns, CPU, args.warmup, args.reps)


def _forward(model: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


# --------------------------------------------------------------------------------------------
# single layers


def deployed_layer(channels: int, gate_factor: float = 0.5) -> nn.Module:
    """A deployed 3x3 DGC layer with half of its input channels kept (random weights)."""
    layer = DynamicGroupConv2d(
        channels, channels, 3, 1, 1, bias=False, heads=HEADS, gate_factor=gate_factor
    )
    layer.set_progress(1.0)
    return layer.eval().deploy().eval()


def layer_rows(args: argparse.Namespace) -> tuple[list[list[str]], list[dict]]:
    rows, records = [], []
    for channels, size in LAYER_SHAPES:
        torch.manual_seed(0)
        auto = deployed_layer(channels)
        kept = auto.kept
        forms = {}
        for form in FORMS:
            module = copy.deepcopy(auto)
            module.impl = form
            forms[form] = module
        dense = nn.Conv2d(channels, channels, 3, 1, 1, bias=False).eval()
        proxy = nn.Conv2d(HEADS * kept, channels, 3, 1, 1, bias=False, groups=HEADS).eval()
        for batch in args.batches:
            x = torch.randn(batch, channels, size, size)
            with torch.inference_mode():  # every form is exact: check before timing
                expected = forms["masked"](x)
                for module in forms.values():
                    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(auto(x), expected, rtol=1e-4, atol=1e-4)
            fns = {
                "dense": _forward(dense, x),
                "dense again": _forward(dense, x),
                "limit proxy": _forward(proxy, torch.randn(batch, HEADS * kept, size, size)),
                "auto": _forward(auto, x),
                **{form: _forward(module, x) for form, module in forms.items()},
            }
            ms = measure(args, fns)
            chosen = auto.form(x)
            fastest = min(FORMS, key=ms.__getitem__)
            base = ms["dense"]
            record = {
                "shape": f"{channels}ch {size}x{size}",
                "batch": batch,
                "ms": ms,
                "auto_form": chosen,
                "fastest_form": fastest,
                "auto_over_fastest": ms["auto"] / ms[fastest],
                "auto_over_proxy": ms["auto"] / ms["limit proxy"],
            }
            records.append(record)
            rows.append(
                [
                    record["shape"],
                    str(batch),
                    f"{base:.3f}",
                    f"{ms['dense again'] / base:.2f}",
                    f"{ms['limit proxy'] / base:.2f}",
                    f"{ms['auto'] / base:.2f} ({chosen})",
                    *(f"{ms[form] / base:.2f}" for form in FORMS),
                    f"{record['auto_over_fastest']:.2f} ({fastest})",
                    f"{record['auto_over_proxy']:.2f}" if batch == 1 else "-",
                ]
            )
            print(f"  layer {record['shape']} batch {batch}: done", flush=True)
    return rows, records


LAYER_HEADERS = (
    "layer",
    "batch",
    "dense ms",
    "dense again ÷ dense (noise)",
    "limit proxy ÷ dense",
    "auto ÷ dense (form run)",
    *(f"{form} ÷ dense" for form in FORMS),
    "auto ÷ fastest form (bar 1.05)",
    "auto ÷ limit proxy (b1, bar 1.3)",
)


# --------------------------------------------------------------------------------------------
# DyResNet-18


class LimitProxy(nn.Module):
    """The kept work of a DGC layer without the selection: an ``h``-group conv over ``h``
    copies of the first ``K`` input channels (``Cin -> h*K`` by one concatenation)."""

    def __init__(self, layer: DynamicGroupConv2d) -> None:
        super().__init__()
        spec = layer.spec
        self.kept, self.heads = layer.kept_channels, layer.heads
        self.conv = nn.Conv2d(
            self.heads * self.kept,
            spec.out_channels,
            spec.kernel_size,
            spec.stride,
            spec.padding,
            spec.dilation,
            groups=self.heads,
            bias=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        first = x[:, : self.kept]
        return self.conv(torch.cat([first] * self.heads, dim=1))


def limit_proxy_network(network: nn.Module) -> nn.Module:
    proxy = copy.deepcopy(network)
    for name, layer in list(dynaconv.dynaconv_layers(proxy)):
        parent, _, child = name.rpartition(".")
        setattr(proxy.get_submodule(parent) if parent else proxy, child, LimitProxy(layer))
    return proxy.eval()


def network_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], Tensor]:
    torch.manual_seed(0)
    network = dynaconv.models.dyresnet18(num_classes=1000)
    dynaconv.set_progress(network, 1.0)
    images = torch.randn(16, 3, args.image_size, args.image_size)
    calibrate_batchnorm(network, images)
    deployed = dynaconv.deploy(network, example_input=images[:2])
    masked = copy.deepcopy(network).eval()
    for _, layer in dynaconv.dynaconv_layers(masked):
        layer.impl = "masked"
    twin = plain_counterpart(network)
    calibrate_batchnorm(twin, images)
    proxy = limit_proxy_network(network)
    calibrate_batchnorm(proxy, images)
    torchvision_net = torchvision.models.resnet18(num_classes=1000).eval()
    calibrate_batchnorm(torchvision_net, images)
    models = {
        "torchvision ResNet-18": torchvision_net,
        "deployed": deployed,
        "masked": masked,
        "dense twin": twin,
        "limit proxy": proxy,
    }
    return models, images


def onnx_session(
    model: nn.Module, x: Tensor, folder: Path, name: str, nchwc: int = 0
) -> Callable[[], object]:
    """Export at ``x``'s static shape, load in onnxruntime (one thread), check against eager.
    ``nchwc``: a block size: export under :class:`~dynaconv.layers.dgc.deployed.nchwc_export`
    and run the file :func:`~dynaconv.onnxruntime_nchwc.write_nchwc` writes (what
    ``dynaconv export --batch 1 --onnxruntime-nchwc`` writes)."""
    import onnxruntime

    path = folder / f"{name.replace(' ', '_')}.onnx"
    if nchwc:
        from dynaconv.layers.dgc.deployed import nchwc_export
        from dynaconv.onnxruntime_nchwc import write_nchwc

        plain = folder / f"{name.replace(' ', '_')}.plain.onnx"
        with nchwc_export(nchwc):
            torch.onnx.export(
                model, (x,), str(plain), dynamo=True, external_data=False, verbose=False
            )
        write_nchwc(plain, path, nchwc)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    (actual,) = session.run(None, feed)
    with torch.inference_mode():
        expected = model(x)
    error = float((torch.from_numpy(actual) - expected).abs().max() / expected.abs().max())
    if not error <= 1e-4:
        raise RuntimeError(
            f"{name}: onnxruntime output differs from eager (rel. error {error:.2g})"
        )
    return lambda: session.run(None, feed)


def network_rows(args: argparse.Namespace) -> tuple[list[list[str]], list[dict]]:
    models, images = network_models(args)
    rows, records = [], []
    for batch in args.batches:
        x = images[torch.arange(batch) % len(images)]
        fns = {name: _forward(model, x) for name, model in models.items()}
        fns["torchvision ResNet-18 again"] = fns["torchvision ResNet-18"]
        onnx = "onnx" in args.runtimes and batch in args.onnx_batches
        with tempfile.TemporaryDirectory() as folder:
            if onnx:
                for name in ("torchvision ResNet-18", "deployed", "dense twin", "limit proxy"):
                    fns[f"{name} ORT"] = onnx_session(models[name], x, Path(folder), name)
                fns["torchvision ResNet-18 ORT again"] = fns["torchvision ResNet-18 ORT"]
                if args.nchwc and batch == 1:
                    fns["deployed (nchwc) ORT"] = onnx_session(
                        models["deployed"], x, Path(folder), "deployed nchwc", args.nchwc
                    )
            ms = measure(args, fns)
        records.append({"batch": batch, "ms": ms})
        base = ms["torchvision ResNet-18"]
        for name in (
            "torchvision ResNet-18",
            "torchvision ResNet-18 again",
            "deployed",
            "masked",
            "dense twin",
            "limit proxy",
        ):
            rows.append(_network_row(name, "eager", batch, ms[name], base, ms, ""))
        if onnx:
            base_ort = ms["torchvision ResNet-18 ORT"]
            for name in (
                "torchvision ResNet-18",
                "torchvision ResNet-18 ORT again",
                "deployed",
                *(["deployed (nchwc)"] if "deployed (nchwc) ORT" in ms else []),
                "dense twin",
                "limit proxy",
            ):
                key = name if name.endswith("again") else f"{name} ORT"
                label = name.removesuffix(" ORT again") + (" again" if "again" in name else "")
                rows.append(
                    _network_row(label, "onnxruntime", batch, ms[key], base_ort, ms, " ORT")
                )
        print(f"  DyResNet-18 batch {batch}: done", flush=True)
    return rows, records


def _network_row(
    name: str, runtime: str, batch: int, value: float, base: float, ms: dict, suffix: str
) -> list[str]:
    twin = ms[f"dense twin{suffix}"]
    return [
        name,
        runtime,
        str(batch),
        f"{value:.2f}",
        f"{value / base:.2f}",
        f"{value / twin:.2f}",
    ]


NETWORK_HEADERS = (
    "model",
    "runtime",
    "batch",
    "ms",
    "÷ torchvision ResNet-18 (same runtime)",
    "÷ dense twin (same runtime)",
)


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="only cpu is measured")
    parser.add_argument("--quick", action="store_true", help="64px, 3 reps: a smoke run")
    parser.add_argument("--tables", nargs="+", choices=("layers", "network"), default=None)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--image-size", type=positive_int, default=None)
    parser.add_argument(
        "--runtimes", nargs="+", choices=("eager", "onnx"), default=["eager", "onnx"]
    )
    parser.add_argument(
        "--onnx-batches",
        type=positive_int,
        nargs="+",
        default=[1],
        help="batches also timed in onnxruntime (1: the issue's bar)",
    )
    parser.add_argument(
        "--onnxruntime-nchwc",
        dest="nchwc",
        action="store_true",
        help="also time the deployed network at batch 1 as `dynaconv export --batch 1 "
        "--onnxruntime-nchwc` writes it (onnxruntime's blocked convs; x86 only)",
    )
    parser.add_argument("--reps", type=positive_int, default=None)
    parser.add_argument("--warmup", type=positive_int, default=None)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--clock",
        choices=("thread", "wall"),
        default="thread",
        help="thread: this thread's CPU time (default, needs --threads 1); wall: wall clock",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.tables = args.tables or ["layers", "network"]
    args.image_size = args.image_size or (64 if args.quick else 128)
    args.reps = args.reps or (3 if args.quick else 9)
    args.warmup = args.warmup or (1 if args.quick else 2)
    if args.nchwc:
        from dynaconv.onnxruntime_nchwc import nchwc_block_size

        args.nchwc = nchwc_block_size()
        if not args.nchwc:
            parser.error("--onnxruntime-nchwc: onnxruntime has no NCHWc kernels on this CPU")
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    title = "DGC deployed on the CPU: single layers and DyResNet-18"
    if args.device != "cpu":
        print(f"## {title}\n\nskipped: this benchmark measures the CPU (--device {args.device})")
        return 0
    torch.set_num_threads(args.threads)
    import onnxruntime

    versions = {
        "onnxruntime": onnxruntime.__version__,
        "ORT intra-op threads": 1,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_dgc_deploy.py" + "".join(f" {w}" for w in words)
    clock = "thread CPU time" if args.clock == "thread" else "wall clock"
    setting = (
        f"fp32, batches {', '.join(map(str, args.batches))}, median of {args.reps} interleaved "
        f"samples ({clock}) after {args.warmup} warm-up"
    )
    print(f"{title}\n{setting}\n{machine_line(versions)}", flush=True)
    started = time.perf_counter()
    sections, payload = [], {}
    if "layers" in args.tables:
        rows, payload["layers"] = layer_rows(args)
        sections += [
            f"### Single 3x3 DGC layers ({HEADS} heads, half of the input channels kept)",
            "",
            markdown_table(LAYER_HEADERS, rows),
            "",
        ]
    if "network" in args.tables:
        rows, payload["network"] = network_rows(args)
        sections += [
            f"### DyResNet-18 (45% kept), {args.image_size}px",
            "",
            markdown_table(NETWORK_HEADERS, rows),
            "",
        ]
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join(
        [
            f"## {title}",
            f"{setting}; {machine_line(versions)}; total {minutes:.1f} min",
            f"command: `{command}`",
            "",
            *sections,
        ]
    ).rstrip()
    print("\n" + text, flush=True)
    if args.json is not None:
        write_json(args.json, {"title": title, "command": command, **payload})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
