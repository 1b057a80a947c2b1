"""``impl="auto"`` against every exact form of each layer: the issue's bar, auto <= 1.10x fastest.

For every family with several execution forms (CondConv, DGC at progress 0 and 1, the deployed
DGC, DGConv and the deployed LGC), single layers made with ``dynaconv.convert`` from an
``nn.Conv2d`` (so, as a new user gets them), on the shapes where the rule-based choice was
worst (``3x3``, ``512->512`` at 4x4, ``256->256`` at 8x8, ``64->64`` at 8x8 batch 256) and on
the demo's layers (``DigitsCNN`` on 8x8 digits) at batch 1, 16, 64 and 256. Per layer, batch
and mode (a training step: forward, loss, backward; an eval forward under
``torch.inference_mode``), every form runs as its own variant, ``auto`` twice (the second copy
is the noise check: the same model timed as two variants), interleaved round robin, medians.
Columns: auto, each exact form, auto / fastest, the noise ratio, the form auto measured, and
the first auto calls (the rule's, then the one that measures the candidates, once per key;
amortised after).

Forms over 3x the fastest in a short interleaved screen (3 samples each) are not timed
further; their screen medians are shown with ``~``. The others, ``auto`` and its noise copy run
in the same rounds with the same number of samples (the order rotated every round; a sample
times about 10 ms of back-to-back calls); ``auto / fastest`` is the median over rounds of the
per-round ratio of auto to the form with the lowest median (load that drifts between rounds
cancels), and the noise column the same for the two copies of auto. The summary gives, per
family and in all, the rows within the bar, the median and the max of auto / fastest, and the
noise check's spread; the header the load averages before and after (a shared machine).
Expected before measuring: auto runs the fastest form up to timing noise, so auto / fastest
within the noise of the row (<= 1.10 on a quiet machine); the first call costs a few calls of
every candidate.

    PYTHONPATH=src python benchmarks/bench_auto.py            # CPU, one thread, every row
    PYTHONPATH=src python benchmarks/bench_auto.py --quick    # a subset: two demo layers, b1/16
    PYTHONPATH=src python benchmarks/bench_auto.py --only dgconv lgc --batches 16 256
    PYTHONPATH=src python benchmarks/bench_auto.py --demo-model  # the demo's network per family
    PYTHONPATH=src python benchmarks/bench_auto.py --overhead    # the choice's per-call cost

Tensors of 2 MiB and more are allocated on huge-page boundaries (PyTorch's
``THP_MEM_ALLOC_ENABLE=1``, set here unless the environment gives another value; the header
says which): with 4 KiB pages the same form's per-call time on a large batch was bimodal, 78
or 95 ms from call to call in every module copy (the relative placement of its buffers), so
two copies running one form read up to 1.24x apart in a 9-sample median; on huge pages all
read 87 ms (``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import os

# Read by PyTorch at its first allocation: before torch is imported (see the docstring).
if __name__ == "__main__":  # a script, not a module imported by tests
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import dynaconv
from dynaconv import dispatch
from dynaconv.layers import ChoosesForm
from harness import (
    _calibrate_inner,
    _sample,
    environment,
    forward_fn,
    measure_interleaved,
    synchronize,
    train_step_fn,
)

BAR = 1.10
#: Forms slower than this many times the fastest in the screen are not timed further.
FAR = 3.0
#: A sample times back-to-back calls for about this long (single sub-millisecond calls are
#: mostly scheduler noise on a shared machine).
TARGET_MS = 10.0


@dataclass(frozen=True)
class Case:
    family: str
    cin: int
    cout: int
    kernel: int
    size: int
    batch: int
    stride: int = 1
    progress: float | None = None  # DGC's schedule
    deployed: bool = False  # time the deployed module instead of the training layer

    @property
    def layer(self) -> str:
        what = f"{self.cin}->{self.cout} {self.kernel}x{self.kernel}"
        what += f"/s{self.stride}" if self.stride != 1 else ""
        what += f" {self.size}x{self.size} b{self.batch}"
        if self.progress is not None:
            what += f" p{self.progress:g}"
        return what

    @property
    def title(self) -> str:
        return f"{self.family} (deployed)" if self.deployed else self.family


@dataclass
class Row:
    family: str
    layer: str
    mode: str
    ms: dict[str, float]
    chosen: str
    first_call_ms: float
    noise: float
    paired_ratio: float
    extra: dict = field(default_factory=dict)

    @property
    def forms(self) -> dict[str, float]:
        return {k: v for k, v in self.ms.items() if not k.startswith("auto")}

    @property
    def fastest(self) -> str:
        return min(self.forms, key=self.forms.__getitem__)

    @property
    def ratio(self) -> float:
        """auto / the fastest form: the median of the per-round ratios."""
        return self.paired_ratio


#: The demo's layers (DigitsCNN on 8x8): (cin, cout, kernel, size, stride).
DEMO_LAYERS = [
    (1, 16, 3, 8, 1),
    (16, 64, 1, 8, 1),
    (64, 64, 3, 8, 1),
    (64, 64, 3, 8, 2),
    (64, 64, 1, 4, 1),
]
DEMO_BATCHES = (1, 16, 64, 256)
#: The issue's shapes where the rules were worst (cin, cout, size, batch).
ISSUE_SHAPES = [(512, 512, 4, 16), (256, 256, 8, 16), (64, 64, 8, 256)]
OPTIONS = {
    "condconv": {"num_experts": 4},
    "dgc": {"heads": 4, "gate_factor": 0.25, "squeeze_rate": 4},
    "dgconv": {},
    "lgc": {"learned_groups": 4},
}


def cases(
    quick: bool,
    issue_shapes: bool = True,
    batches: tuple[int, ...] | None = None,
    demo_shapes: bool = True,
) -> Iterator[Case]:
    batches = batches or ((1, 16) if quick else DEMO_BATCHES)
    layers = (DEMO_LAYERS[1:3] if quick else DEMO_LAYERS) if demo_shapes else []
    issue = ISSUE_SHAPES if issue_shapes and not quick else []
    for cin, cout, size, batch in issue:
        yield Case("condconv", cin, cout, 3, size, batch)
    for cin, cout, kernel, size, stride in layers:
        for batch in batches:
            yield Case("condconv", cin, cout, kernel, size, batch, stride)
    for progress in (0.0, 1.0):
        for cin, cout, size, batch in issue:
            yield Case("dgc", cin, cout, 3, size, batch, progress=progress)
        for cin, cout, kernel, size, stride in layers:
            if cin >= 4:
                for batch in batches:
                    yield Case("dgc", cin, cout, kernel, size, batch, stride, progress)
    for cin, cout, kernel, size, stride in layers:
        for batch in batches:
            if cin >= 4:
                yield Case("dgc", cin, cout, kernel, size, batch, stride, 1.0, deployed=True)
            if cin == cout:
                yield Case("dgconv", cin, cout, kernel, size, batch, stride)
                yield Case("lgc", cin, cout, kernel, size, batch, stride, deployed=True)


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(case.cin, case.cout, case.kernel, case.stride, case.kernel // 2, bias=False)
    model = dynaconv.convert(nn.Sequential(conv), case.family, **OPTIONS[case.family])
    layer = model[0]
    if case.family == "dgc":
        with torch.no_grad():  # saliencies that differ between channels and examples
            layer.fc2_weight.normal_(0, 0.5)
    if case.progress is not None:
        layer.set_progress(case.progress)
    if case.family == "lgc":
        layer.set_progress(1.0)
    if case.deployed:
        layer = layer.eval().deploy()
    return layer


def variants(layer: nn.Module) -> dict[str, nn.Module]:
    """``auto``, a second ``auto`` (the noise check) and one copy per exact form."""
    names = ["auto", "auto (again)", *layer.forms]
    out = {}
    for name in names:
        module = copy.deepcopy(layer)
        module.impl = "auto" if name.startswith("auto") else name
        out[name] = module
    return out


def runnable(module: ChoosesForm, x: torch.Tensor, train: bool) -> bool:
    """Whether the module's form runs here (a Triton form off CUDA does not)."""
    try:
        (train_step_fn(module, x) if train else forward_fn(module, x))()
    except ValueError:
        return False
    return True


def time_case(case: Case, device: torch.device, train: bool, reps: int, warmup: int) -> Row:
    layer = build(case).to(device)
    x = torch.randn(case.batch, case.cin, case.size, case.size, device=device)
    modules = variants(layer)
    for module in modules.values():
        module.train(train and not case.deployed)
    dispatch.clear_measured_choices()
    synchronize(device)
    started = time.perf_counter()
    first = train_step_fn(modules["auto"], x) if train else forward_fn(modules["auto"], x)
    for _ in range(dispatch.measure_after() + 1):  # the rule, then the call that measures
        first()
    synchronize(device)
    first_ms = (time.perf_counter() - started) * 1e3
    fns: dict[str, Callable[[], object]] = {}
    for name, module in modules.items():
        if runnable(module, x, train):
            fns[name] = train_step_fn(module, x) if train else forward_fn(module, x)
    # Forms far off (over FAR x the fastest in a short interleaved screen) keep the screen's
    # median; the others are timed fully, interleaved with auto.
    screen = {
        name: statistics.median(times)
        for name, times in rounds(fns, device, warmup=1, reps=3, target_ms=TARGET_MS).items()
    }
    close = min(screen.values()) * FAR
    timed = {n: f for n, f in fns.items() if n.startswith("auto") or screen[n] <= close}
    samples = rounds(timed, device, warmup=warmup, reps=reps, target_ms=TARGET_MS)
    ms = {**screen, **{name: statistics.median(times) for name, times in samples.items()}}
    far = sorted(set(fns) - set(timed))
    forms = [n for n in samples if not n.startswith("auto")]
    fastest = min(forms, key=ms.__getitem__)
    with torch.no_grad() if not train else torch.enable_grad():
        chosen = (
            modules["auto"].choose_form(x.requires_grad_(train))
            if case.family not in ("dgc",)
            else _dgc_choice(modules["auto"], x, train)
        )
    return Row(
        case.title,
        case.layer,
        "train" if train else "eval",
        ms,
        chosen,
        first_ms,
        paired(samples["auto (again)"], samples["auto"]),
        paired(samples["auto"], samples[fastest]),
        {"screened_only": far, "samples": len(samples["auto"])},
    )


def rounds(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    target_ms: float,
) -> dict[str, list[float]]:
    """``reps`` samples (ms per call) of each of ``fns``, one per round, the order rotated
    every round; a sample times about ``target_ms`` of back-to-back calls."""
    inners = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inners[name] = _calibrate_inner(fn, device, target_ms)
    synchronize(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(sample(fns[name], device, inners[name]))
    return times


#: ``--clock cpu``: samples read the thread's CPU time (one torch thread on the CPU only).
CLOCK = {"cpu": False}


def sample(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Milliseconds per call over ``inner`` back-to-back calls (wall clock or, with ``--clock
    cpu``, the thread's CPU time: what the computation took, without the time it waited
    for a core on a loaded machine)."""
    if CLOCK["cpu"]:
        return dispatch.thread_timer(fn, inner) / inner
    return _sample(fn, device, inner)


def paired(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def _dgc_choice(module: nn.Module, x: torch.Tensor, train: bool) -> str:
    if hasattr(module, "saliency"):
        g = module.saliency(x)
    else:
        from dynaconv.layers.dgc.functional import saliency

        g = saliency(x, module.fc1_weight, module.fc2_weight, module.fc2_bias, False)
    return module.choose_form(x, g)


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, ""]
    families = list(dict.fromkeys(r.family for r in rows))
    for family in families:
        group = [r for r in rows if r.family == family]
        forms = list(dict.fromkeys(f for r in group for f in r.forms))
        lines += [
            f"### {family}",
            "",
            "| layer | mode | auto ms | "
            + " | ".join(forms)
            + " | auto / fastest | noise | auto ran | first calls ms |",
            "|---|---|---|" + "---|" * len(forms) + "---|---|---|---|",
        ]
        for r in group:
            far = r.extra.get("screened_only", [])
            cells = [
                (f"~{r.forms[f]:.1f}" if f in far else f"{r.forms[f]:.3f}") if f in r.forms else ""
                for f in forms
            ]
            mark = "" if r.ratio <= BAR else " MISS"
            lines.append(
                f"| {r.layer} | {r.mode} | {r.ms['auto']:.3f} | "
                + " | ".join(cells)
                + f" | {r.ratio:.2f}{mark} | {r.noise:.2f} | {r.chosen} | {r.first_call_ms:.0f} |"
            )
        lines.append("")
    misses = [r for r in rows if r.ratio > BAR]
    lines.append(
        f"`~`: a form over {FAR:g}x the fastest in a 3-sample screen, not timed further (its "
        "screen median shown). auto / fastest and noise: medians of per-round ratios."
    )
    lines.append("")
    lines += summary(rows)
    for r in misses:
        lines.append(
            f"- over the bar: {r.family} {r.layer} {r.mode}: auto ran {r.chosen}, fastest "
            f"{r.fastest}, {r.ratio:.2f}x (noise {r.noise:.2f})"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> list[str]:
    """Per family and in all: rows within the bar, auto / fastest median and max, noise."""
    lines = [
        f"| family | rows within {BAR:.2f} | auto / fastest median | max | noise median "
        "abs(ratio - 1) | noise max abs(ratio - 1) |",
        "|---|---|---|---|---|---|",
    ]
    groups = {family: [r for r in rows if r.family == family] for family in _families(rows)}
    for family, group in [*groups.items(), ("**all**", rows)]:
        ratios = [r.ratio for r in group]
        noises = [abs(r.noise - 1) for r in group]
        within = sum(ratio <= BAR for ratio in ratios)
        lines.append(
            f"| {family} | {within} of {len(group)} | {statistics.median(ratios):.3f} | "
            f"{max(ratios):.2f} | {statistics.median(noises):.3f} | {max(noises):.2f} |"
        )
    return lines


def _families(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.family for r in rows))


def demo_model(device: torch.device, reps: int) -> str:
    """The demo's network (``DigitsCNN`` converted as the demo does), a training step at
    batch 64 and an eval forward at batch 256: the family's rule (measuring off: the old
    choice) against measured ``auto``, interleaved, with a noise variant (measured twice)."""
    from dynaconv.demo import DEMO_METHODS
    from dynaconv.models import DigitsCNN

    def switched(fn: Callable[[], object], on: bool) -> Callable[[], object]:
        def run() -> object:
            with dispatch.measuring(on):
                return fn()

        return run

    lines = [
        "| model | train b64 rule ms | measured ms | speed-up | eval b256 rule ms | measured ms "
        "| speed-up | noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in ["plain", "condconv", "dgc", "dgconv"]:
        torch.manual_seed(0)
        model = DigitsCNN()
        if method != "plain":
            model = dynaconv.convert(model, method, **DEMO_METHODS[method])
        if method == "dgc":
            dynaconv.set_progress(model, 0.5)
        model = model.to(device)
        x_train = torch.randn(64, 1, 8, 8, device=device)
        x_eval = torch.randn(256, 1, 8, 8, device=device)
        rule, measured = copy.deepcopy(model).train(), copy.deepcopy(model).train()
        train = measure_interleaved(
            {
                "rule": switched(train_step_fn(rule, x_train), False),
                "measured": switched(train_step_fn(measured, x_train), True),
            },
            device,
            warmup=4,
            reps=reps,
            target_ms=TARGET_MS,
        )
        rule.eval(), measured.eval()
        infer = measure_interleaved(
            {
                "rule": switched(forward_fn(rule, x_eval), False),
                "measured": switched(forward_fn(measured, x_eval), True),
                "again": switched(forward_fn(measured, x_eval), True),
            },
            device,
            warmup=4,
            reps=reps,
            target_ms=TARGET_MS,
        )
        lines.append(
            f"| {method} | {train['rule']:.2f} | {train['measured']:.2f} | "
            f"{train['rule'] / train['measured']:.2f}x | {infer['rule']:.2f} | "
            f"{infer['measured']:.2f} | {infer['rule'] / infer['measured']:.2f}x | "
            f"{infer['again'] / infer['measured']:.2f} |"
        )
    return "\n".join(lines)


def overhead(rounds_: int = 21, calls: int = 2000) -> str:
    """The per-call cost of ``auto``'s choice: tiny layers (16->64 1x1 on 8x8, batch 1, eval,
    where the choice's host work shows most), ``auto`` against a copy with ``impl=`` the form
    auto measured, interleaved rounds of ``calls`` calls, the thread's CPU time (so other
    processes' load does not count); also ``choose_form`` alone, auto against explicit."""
    lines = [
        "| layer | auto us | explicit us | auto - explicit us | choose_form auto us | explicit us |",
        "|---|---|---|---|---|---|",
    ]
    for family, cout in (("condconv", 64), ("dgc", 64), ("dgconv", 16)):
        layer = build(Case(family, 16, cout, 1, 8, 1)).eval()
        x = torch.randn(1, 16, 8, 8)
        with torch.inference_mode():
            for _ in range(dispatch.measure_after() + 2):
                layer(x)
            args = (layer.saliency(x),) if family == "dgc" else ()
            explicit = copy.deepcopy(layer)
            explicit.impl = layer.choose_form(x, *args)
            per_call: dict[str, list[float]] = {"auto": [], "explicit": []}
            for _ in range(rounds_):
                for name, module in (("auto", layer), ("explicit", explicit)):
                    per_call[name].append(dispatch.thread_timer(lambda m=module, x=x: m(x), calls))
            choose = {
                name: dispatch.thread_timer(
                    lambda m=module, x=x, a=args: m.choose_form(x, *a), calls
                )
                for name, module in (("auto", layer), ("explicit", explicit))
            }
        auto, fixed = (statistics.median(per_call[n]) / calls * 1e3 for n in per_call)
        lines.append(
            f"| {family} 16->{cout} 1x1 b1 eval ({explicit.impl}) | {auto:.1f} | {fixed:.1f} | "
            f"{auto - fixed:.1f} | {choose['auto'] / calls * 1e3:.1f} | "
            f"{choose['explicit'] / calls * 1e3:.1f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="samples per variant (9)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few small cases (smoke test)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=sorted(OPTIONS),
        help="families to run (dgc includes the deployed DGC, lgc is the deployed LGC)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what a sample reads: the wall clock (default) or, with one thread on the CPU, "
        "the thread's CPU time (robust to other processes' load)",
    )
    parser.add_argument(
        "--batches", nargs="+", type=int, default=None, help="batch sizes (1 16 64 256)"
    )
    parser.add_argument(
        "--demo-shapes-only", action="store_true", help="skip the large layers of the issue"
    )
    parser.add_argument(
        "--issue-shapes-only", action="store_true", help="only the large layers of the issue"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown")
    parser.add_argument(
        "--overhead", action="store_true", help="only the per-call cost of auto's choice"
    )
    parser.add_argument(
        "--heap",
        choices=("default", "retain"),
        default="default",
        help="glibc's default heap, or freed memory retained for reuse "
        "(dynaconv.heap.retain_freed_memory: no page faults of freed activations)",
    )
    parser.add_argument(
        "--demo-model",
        action="store_true",
        help="only the demo's network per family: the rule (old choice) against measured auto",
    )
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.reps = args.reps or (3 if args.quick else 9)
    if args.clock == "cpu" and (args.device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    CLOCK["cpu"] = args.clock == "cpu"
    if args.heap == "retain" and not dynaconv.heap.retain_freed_memory():
        raise SystemExit("--heap retain: glibc's mallopt is not available here")
    if args.overhead:
        print(f"## The per-call cost of auto's choice\n{environment(args.device)}\n")
        print(overhead(), flush=True)
        return
    if args.demo_model:
        print(f"## The demo's network: rule against measured auto\n{environment(args.device)}\n")
        print(demo_model(args.device, args.reps), flush=True)
        return
    rows = []
    load_before, started = os.getloadavg(), time.perf_counter()
    batches = tuple(args.batches) if args.batches else None
    selected = cases(
        args.quick,
        issue_shapes=not args.demo_shapes_only,
        batches=batches,
        demo_shapes=not args.issue_shapes_only,
    )
    for case in selected:
        if args.only and case.family not in args.only:
            continue
        for train in (True, False):
            if train and case.deployed:
                continue
            row = time_case(case, args.device, train, args.reps, args.warmup)
            rows.append(row)
            print(
                f"{row.family:20s} {row.layer:28s} {row.mode:5s} auto {row.ms['auto']:9.3f} ms "
                f"({row.chosen}), fastest {row.fastest} {row.forms[row.fastest]:9.3f} ms, "
                f"ratio {row.ratio:.2f}, noise {row.noise:.2f}",
                flush=True,
            )
    load = ", ".join(f"{a:.2f}" for a in load_before)
    load_after = ", ".join(f"{a:.2f}" for a in os.getloadavg())
    header = (
        f"## impl='auto' against every exact form (bench_auto.py)\n"
        f"{environment(args.device)}, dtype=float32, measuring "
        f"{'on' if dispatch.measuring_enabled() else 'off'}, clock {args.clock}, "
        f"heap {args.heap}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}; "
        f"load averages (1, 5, 15 min) "
        f"{load} before, {load_after} after; {time.perf_counter() - started:.0f} s"
    )
    text = markdown(rows, header)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"environment": header, "rows": [asdict(r) for r in rows]}, indent=2)
        )


if __name__ == "__main__":
    main()
