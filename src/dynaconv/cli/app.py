"""The ``dynaconv`` command line (``python -m dynaconv``).

    dynaconv train --recipe condensenet86-cifar10 --data-dir DIR [--set optim.lr=0.05 ...]
    dynaconv train --model resnet18 --convert doconv --dataset cifar10 --data-dir DIR
    torchrun --nproc-per-node 4 -m dynaconv train --recipe dyresnet18-imagenet --data-dir DIR
    dynaconv train --resume runs/NAME/last.pt
    dynaconv train --recipe digits-small --overwrite   (replace the previous run in runs/NAME)
    dynaconv eval runs/NAME/best.pt                  (or a deploy folder)
    dynaconv deploy runs/NAME/best.pt --out deployed/
    dynaconv profile runs/NAME/best.pt        (or: dynaconv profile --recipe NAME)
    dynaconv export runs/NAME/best.pt --out exported/
    dynaconv demo [--out DIR]                 (keep the demo's run folders in DIR)

Configuration: defaults < recipe < flat flags < ``--set SECTION.KEY=VALUE`` (see
:mod:`dynaconv.train.config`; ``dynaconv train --print-config`` shows the result).

The parser's description and epilog (:data:`DESCRIPTION`, :data:`EPILOG`) are what
``dynaconv --help`` prints: the commands, the configuration order and the exit statuses. Each
command first checks the optional dependencies it needs (:data:`COMMAND_EXTRAS`): a missing one
is one line naming the extra to install, exit status 2, before any file is read or written.
No file given to any command runs code (see :mod:`dynaconv.train.names` and
:mod:`dynaconv.cli.commands`); ``eval --unsafe-load-pt2`` is the one explicit exception.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dynaconv.families import list_families
from dynaconv.train.config import FLAGS, SWITCHES, ConfigError, list_recipes
from dynaconv.train.extras import MissingExtraError, require_extras

EXIT_ERROR = 2
EXIT_NONFINITE = 3
EXIT_VERIFY = 4
EXIT_INTERRUPTED = 130


def _add_set_argument(parser: argparse.ArgumentParser | Any, text: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text
    )


#: The argument groups of ``train --help``: a flag goes to the first group whose key prefix
#: its configuration key has.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("model.",)),
    ("data", ("data.",)),
    ("optimisation", ("optim.", "loss.", "train.epochs", "train.max_iters")),
    ("run", ("train.", "name")),
)

#: The flat flags ``profile`` takes to describe a configuration (everything else is training's).
PROFILE_FLAGS = ("--model", "--dataset", "--data-dir")


def _group_of(dotted: str) -> str:
    return next(title for title, prefixes in GROUPS if dotted.startswith(prefixes))


def _add_convert_arguments(group: Any) -> None:
    group.add_argument(
        "--convert",
        metavar="METHOD",
        help="convert the model's nn.Conv2d layers to METHOD: "
        f"{', '.join(list_families())} (model.convert.method)",
    )
    group.add_argument(
        "--convert-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the family, e.g. --convert-opt D_mul=12 (model.convert.options)",
    )


def _add_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] = ()) -> None:
    """``--recipe``, ``--set`` and the flat flags (all, or those in ``only``), grouped."""
    config = parser.add_argument_group("configuration")
    config.add_argument("--recipe", help=f"recipe name ({', '.join(list_recipes())}) or YAML path")
    _add_set_argument(
        config, "override any field, e.g. --set optim.lr=0.05 (value parsed as YAML; repeatable)"
    )
    groups = {title: parser.add_argument_group(title) for title, _ in GROUPS}
    for flag, (dotted, kind, text) in FLAGS.items():
        if not only or flag in only:
            groups[_group_of(dotted)].add_argument(
                flag, type=kind, default=None, help=f"{text} ({dotted})"
            )
    for flag, (dotted, text) in SWITCHES.items():
        if not only or flag in only:
            groups[_group_of(dotted)].add_argument(
                flag, action="store_true", default=None, help=f"{text} ({dotted})"
            )
    _add_convert_arguments(groups["model"])


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag, (dotted, *_rest) in {**FLAGS, **SWITCHES}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            values[dotted] = value
    return values


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.convert:
        overrides.insert(0, f"model.convert.method={args.convert}")
    overrides[1 if args.convert else 0 : 0] = [
        f"model.convert.options.{item}" for item in args.convert_opt
    ]
    return overrides


def _resolve(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    from dynaconv.train.config import resolve_config

    return resolve_config(args.recipe, _flag_values(args), _overrides(args), base=base)


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--data-dir`` and ``--set`` of the checkpoint commands, as ``{dotted key: value}``."""
    from dynaconv.train.config import parse_assignment

    values: dict[str, Any] = {}
    if args.data_dir is not None:
        values["data.dir"] = args.data_dir
    for assignment in args.overrides:
        key, value = parse_assignment(assignment)
        values[key] = value
    return values


def resume_base(stored: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The configuration a resume starts from: the checkpoint's, except what the command line
    decides: where to write (``train.out_dir``: the checkpoint's own folder unless ``--out``)
    and whether to download (``data.download``: only with ``--download``)."""
    from pathlib import Path

    stored["train"]["out_dir"] = str(Path(checkpoint).parent)
    stored["data"]["download"] = False
    return stored


def _cmd_train(args: argparse.Namespace) -> int:
    from dynaconv.train.engine import train

    base = None
    if args.resume:
        from dynaconv.train.checkpoint import load_checkpoint
        from dynaconv.train.config import config_from_text

        stored = load_checkpoint(args.resume, {"config": str})["config"]
        base = resume_base(config_from_text(stored, f"checkpoint {args.resume}"), args.resume)
    config = _resolve(args, base)
    if args.print_config:
        from dynaconv.train.config import dump_config

        print(dump_config(config), end="")
        return 0
    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .commands import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        _data_overrides(args),
        args.weights,
        args.device,
        unsafe_load_pt2=args.unsafe_load_pt2,
    )
    from dynaconv.train.checkpoint import json_text

    print(json_text(result))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from .commands import deploy_checkpoint

    result = deploy_checkpoint(
        args.checkpoint, args.out, _data_overrides(args), args.weights, overwrite=args.overwrite
    )
    from dynaconv.train.checkpoint import json_text

    print(json_text(result))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _progress_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"progress must be a number in [0, 1], got {text!r}")
    return value


def _cmd_profile(args: argparse.Namespace) -> int:
    from .commands import profile_checkpoint

    config, overrides = None, None
    if args.checkpoint:
        values = _flag_values(args)
        values.pop("data.dir", None)  # --data-dir applies to the checkpoint's data too
        if args.recipe or args.convert or args.convert_opt or values:
            raise ConfigError(
                "profile CHECKPOINT uses the checkpoint's configuration: --recipe, --convert and "
                "the flat flags describe a configuration to profile instead; change a field of "
                "the stored one with --set KEY=VALUE"
            )
        overrides = _data_overrides(args)
    else:
        config = _resolve(args)
    report = profile_checkpoint(
        args.checkpoint,
        config,
        args.batch,
        args.convention,
        args.weights,
        args.progress,
        overrides=overrides,
    )
    print(report)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .commands import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.out,
        _data_overrides(args),
        args.weights,
        deploy=not args.no_deploy,
        opset=args.opset,
        overwrite=args.overwrite,
        fixed_batch=args.batch,
        format=args.format,
        nchwc=args.onnxruntime_nchwc,
    )
    from dynaconv.train.checkpoint import json_text

    print(json_text(result))
    return 0


WEIGHTS_HELP = "ema: the EMA weights when the run kept an EMA (default), model: the raw weights"

DESCRIPTION = """\
Train, evaluate, deploy, profile and export dynaconv models.

examples:
  dynaconv train --recipe condensenet86-cifar10 --data-dir DIR [--set optim.lr=0.05 ...]
  dynaconv train --model resnet18 --convert doconv --dataset cifar10 --data-dir DIR
  torchrun --nproc-per-node 4 -m dynaconv train --recipe dyresnet18-imagenet --data-dir DIR
  dynaconv train --resume runs/NAME/last.pt
  dynaconv eval runs/NAME/best.pt                (or a deploy folder)
  dynaconv deploy runs/NAME/best.pt --out deployed/
  dynaconv profile runs/NAME/best.pt             (or: dynaconv profile --recipe NAME)
  dynaconv export runs/NAME/best.pt --out exported/
  dynaconv demo [--out DIR]

Configuration: defaults < recipe < flat flags < --set SECTION.KEY=VALUE
(dynaconv train --print-config shows the result). 'dynaconv COMMAND --help' lists a
command's options.
"""

EPILOG = """\
exit status: 0 success; 2 bad input (one line on stderr: a configuration value, a file that is
missing, foreign or does not fit, a run folder that holds another run, a missing optional
dependency, an exported file that onnxruntime cannot load or run); 3 a non-finite loss or
weights; 4 a deployed or exported model whose outputs differ from the original's; 130
interrupted. No file given to any command runs code; eval --unsafe-load-pt2 is the one explicit
exception.
"""


def _checkpoint_parser(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text)
    parser.add_argument("checkpoint", help="last.pt / best.pt, or a *.safetensors from training")
    parser.add_argument("--data-dir", help="dataset folder on this machine (data.dir)")
    _add_set_argument(
        parser, "override a field of the stored configuration (e.g. data.eval_batch_size=64)"
    )
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help=WEIGHTS_HELP)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaconv",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_text = (
        "train a small CNN on scikit-learn's digits with every family (a few hundred steps "
        "each, on the CPU), deploy, verify and compare them in one table"
    )
    demo = sub.add_parser("demo", help=demo_text, description=demo_text)
    demo.add_argument(
        "--out", help="keep each family's run folder as OUT/FAMILY (default: temporary folders)"
    )

    train_text = "train a model (recipe, flags, --set overrides) into a run folder"
    train = sub.add_parser("train", help=train_text, description=train_text)
    _add_config_arguments(train)
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="CHECKPOINT", help="continue from last.pt / best.pt")
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the run folder (its files are deleted first)",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved config")

    evaluate = _checkpoint_parser(
        sub, "eval", "validation loss and accuracy of a checkpoint or a deploy folder"
    )
    evaluate.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to evaluate (auto: cuda when available, else cpu)",
    )
    evaluate.add_argument(
        "--unsafe-load-pt2",
        action="store_true",
        help="evaluate a .pt2 (or a deploy folder's deployed.pt2) through torch.export.load, "
        "which unpickles and CAN RUN CODE: only for files you trust",
    )

    deploy = _checkpoint_parser(sub, "deploy", "write the static (deployed) model and verify it")
    deploy.add_argument("--out", required=True, help="output folder")
    deploy.add_argument("--overwrite", action="store_true", help="replace files already in --out")

    export = _checkpoint_parser(
        sub,
        "export",
        "torch.export (.pt2) and ONNX; both checked against PyTorch (ONNX in onnxruntime); "
        "prints a JSON summary on stdout",
    )
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    export.add_argument("--no-deploy", action="store_true", help="export the training form")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument(
        "--batch",
        type=int,
        default=None,
        help="export for this batch size only (e.g. 1 for edge deployment: CondConv layers "
        "become the kernel mixing and one convolution); default: a dynamic batch (pte: 1)",
    )
    export.add_argument(
        "--onnxruntime-nchwc",
        action="store_true",
        help="also write model.nchwc.onnx: convs with computed kernels (CondConv with --batch, "
        "deployed DGC with --batch 1) "
        "on onnxruntime's blocked kernels; for onnxruntime on x86 CPUs like this one only",
    )
    export.add_argument(
        "--format",
        choices=("onnx", "pte"),
        default="onnx",
        help="onnx (default; checked in onnxruntime) or pte (ExecuTorch with XNNPACK, the "
        "mobile CPU runtime; needs the edge extra)",
    )

    profile_text = "parameters and MACs of a checkpoint or of a configured (untrained) model"
    profile = sub.add_parser("profile", help=profile_text, description=profile_text)
    profile.add_argument("checkpoint", nargs="?", help="checkpoint (omit to profile a config)")
    _add_config_arguments(profile, only=PROFILE_FLAGS)
    profile.add_argument(
        "--batch", type=_positive_int, default=1, help="batch size of the profiled input"
    )
    profile.add_argument(
        "--convention",
        choices=("dense", "reference"),
        default="dense",
        help="dense: multiply-accumulates of convs and linears (FLOPs = 2 x MACs, as "
        "torch.utils.flop_counter); reference: the papers' own counter, to compare with "
        "published counts (see dynaconv.profile)",
    )
    profile.add_argument("--weights", choices=("ema", "model"), default="ema", help=WEIGHTS_HELP)
    profile.add_argument(
        "--progress",
        type=_progress_value,
        default=None,
        help="first bring the schedules to this progress in [0, 1] (1.0: as after training)",
    )
    return parser


#: The longest error line printed (a message quoting a huge value is cut).
MAX_ERROR_LINE = 1000


def _one_line(error: BaseException) -> str:
    """The error as one line (a data-loader worker's error keeps only its last line)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        line = lines[-1]
    else:
        line = " ".join(lines)
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 3] + "..."


#: The optional dependency groups each command needs (see :mod:`dynaconv.train.extras`).
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("train",),
    "train": ("train",),
    "eval": ("train",),
    "deploy": ("train",),
    "profile": ("train",),
    "export": ("train", "export"),
}


def _command_extras(args: argparse.Namespace) -> tuple[str, ...]:
    """The extras of ``args.command`` (:data:`COMMAND_EXTRAS`); ``export --format pte`` needs
    the ``edge`` extra (ExecuTorch) instead of the ``export`` extra (ONNX)."""
    if args.command == "export" and args.format == "pte":
        return ("train", "edge")
    return COMMAND_EXTRAS[args.command]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export":  # the options' own errors before a missing extra
        from dynaconv.cli.commands import check_export_options

        try:
            check_export_options(args.format, args.onnxruntime_nchwc)
        except ConfigError as error:
            print(f"dynaconv export: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    try:
        require_extras(*_command_extras(args), what=f"dynaconv {args.command}")
    except MissingExtraError as error:  # before any file is read or written
        print(f"dynaconv {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "demo":
        from dynaconv.demo import main as demo_main

        try:
            return demo_main(out_dir=args.out)
        except ValueError as error:
            print(f"dynaconv demo: error: {_one_line(error)}", file=sys.stderr)
            return EXIT_ERROR
    from dynaconv.lifecycle import DeployVerificationError
    from dynaconv.train.checkpoint import CheckpointError
    from dynaconv.train.data import DataError
    from dynaconv.train.engine import NonFiniteLossError
    from dynaconv.train.runfolder import RunFolderError

    from .commands import ExportError

    commands = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "deploy": _cmd_deploy,
        "profile": _cmd_profile,
        "export": _cmd_export,
    }
    try:
        return commands[args.command](args)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        RunFolderError,
        ExportError,
        NotImplementedError,
    ) as error:
        print(f"dynaconv {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except NonFiniteLossError as error:
        print(f"dynaconv {args.command}: stopped: {_one_line(error)}", file=sys.stderr)
        return EXIT_NONFINITE
    except DeployVerificationError as error:
        print(f"dynaconv {args.command}: verification failed: {_one_line(error)}", file=sys.stderr)
        return EXIT_VERIFY
    except KeyboardInterrupt:
        print(f"dynaconv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
