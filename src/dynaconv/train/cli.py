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

Bad input (a configuration value, a file that is missing, foreign, truncated or does not fit,
a run folder that holds another run) is one line on stderr, ``dynaconv CMD: error: ...``, and
exit status 2; a non-finite loss or weights exit 3; a failed deploy/export check exits 4. No
file given to any command runs code (see :mod:`dynaconv.train.names` and
:mod:`dynaconv.train.commands`); ``eval --unsafe-load-pt2`` is the one explicit exception.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .config import FLAGS, SWITCHES, ConfigError, list_recipes

EXIT_ERROR = 2
EXIT_NONFINITE = 3
EXIT_VERIFY = 4
EXIT_INTERRUPTED = 130


def _add_set_argument(parser: argparse.ArgumentParser, text: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help=f"recipe name ({', '.join(list_recipes())}) or YAML path")
    _add_set_argument(
        parser, "override any field, e.g. --set optim.lr=0.05 (value parsed as YAML; repeatable)"
    )
    for flag, (dotted, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{text} ({dotted})")
    for flag, (dotted, text) in SWITCHES.items():
        parser.add_argument(flag, action="store_true", default=None, help=f"{text} ({dotted})")
    parser.add_argument(
        "--convert",
        metavar="METHOD",
        help="convert the model's nn.Conv2d layers to METHOD (model.convert.method)",
    )
    parser.add_argument(
        "--convert-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method, e.g. --convert-opt D_mul=12 (model.convert.options)",
    )


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag, (dotted, *_rest) in {**FLAGS, **SWITCHES}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
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
    from .config import resolve_config

    return resolve_config(args.recipe, _flag_values(args), _overrides(args), base=base)


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--data-dir`` and ``--set`` of the checkpoint commands, as ``{dotted key: value}``."""
    from .config import parse_assignment

    values: dict[str, Any] = {}
    if args.data_dir is not None:
        values["data.dir"] = args.data_dir
    for assignment in args.overrides:
        key, value = parse_assignment(assignment)
        values[key] = value
    return values


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    base = None
    if args.resume:
        from .checkpoint import load_checkpoint
        from .config import config_from_text

        stored = load_checkpoint(args.resume, {"config": str})["config"]
        base = config_from_text(stored, f"checkpoint {args.resume}")
    config = _resolve(args, base)
    if args.print_config:
        from .config import dump_config

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
    print(json.dumps(result, indent=2))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from .commands import deploy_checkpoint

    result = deploy_checkpoint(args.checkpoint, args.out, _data_overrides(args), args.weights)
    print(json.dumps(result, indent=2))
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
        fixed_batch=args.batch,
        format=args.format,
    )
    print(json.dumps(result, indent=2))
    return 0


def _checkpoint_parser(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text)
    parser.add_argument("checkpoint", help="last.pt / best.pt, or a *.safetensors from training")
    parser.add_argument("--data-dir", help="dataset folder on this machine (data.dir)")
    _add_set_argument(
        parser, "override a field of the stored configuration (e.g. data.eval_batch_size=64)"
    )
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="EMA weights when the checkpoint has them (default) or the raw model",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaconv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a small CNN on digits with every method, deploy, verify, compare"
    )
    demo.add_argument(
        "--out", help="keep each method's run folder as OUT/METHOD (default: temporary folders)"
    )

    train = sub.add_parser("train", help="train a model (recipe, flags, --set overrides)")
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
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument(
        "--unsafe-load-pt2",
        action="store_true",
        help="evaluate a .pt2 (or a deploy folder's deployed.pt2) through torch.export.load, "
        "which unpickles and CAN RUN CODE: only for files you trust",
    )

    deploy = _checkpoint_parser(sub, "deploy", "write the static (deployed) model and verify it")
    deploy.add_argument("--out", required=True, help="output folder")

    export = _checkpoint_parser(
        sub, "export", "torch.export (.pt2) and ONNX, checked in onnxruntime"
    )
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--no-deploy", action="store_true", help="export the training form")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument(
        "--batch",
        type=int,
        default=None,
        help="export for this batch size only (e.g. 1 for edge deployment: CondConv kxk layers "
        "become the kernel mixing and one convolution); default: a dynamic batch (pte: 1)",
    )
    export.add_argument(
        "--format",
        choices=("onnx", "pte"),
        default="onnx",
        help="onnx (default; checked in onnxruntime) or pte (ExecuTorch with XNNPACK, the "
        "mobile CPU runtime; needs the edge extra)",
    )

    profile = sub.add_parser("profile", help="parameters and MACs of a checkpoint or a config")
    profile.add_argument("checkpoint", nargs="?", help="checkpoint (omit to profile a config)")
    _add_config_arguments(profile)
    profile.add_argument(
        "--batch", type=_positive_int, default=1, help="batch size of the profiled input"
    )
    profile.add_argument("--convention", choices=("dense", "reference"), default="dense")
    profile.add_argument("--weights", choices=("ema", "model"), default="ema")
    profile.add_argument(
        "--progress",
        type=_progress_value,
        default=None,
        help="first bring the schedules to this progress in [0, 1] (1.0: as after training)",
    )
    return parser


def _one_line(error: BaseException) -> str:
    """The error as one line (a data-loader worker's error keeps only its last line)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1]
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dynaconv.demo import main as demo_main

        try:
            return demo_main(out_dir=args.out)
        except ValueError as error:
            print(f"dynaconv demo: error: {_one_line(error)}", file=sys.stderr)
            return EXIT_ERROR
    from dynaconv.lifecycle import DeployVerificationError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .engine import NonFiniteLossError
    from .runfolder import RunFolderError

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
