"""Run every ``benchmarks/bench_*.py`` and collect their markdown reports into one file.

Each script runs in its own process with the same arguments (``--device``, ``--quick``,
``--json DIR/<script>.json``); its output is shown as it comes and its report kept. A script
that fails gets a section saying so (with the end of its error output) and makes the exit
status non-zero; the others still run.

    python benchmarks/run_all.py --device cuda --out benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick --only doconv dgc
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: each script's)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps")
    parser.add_argument("--json", type=Path, default=None, help="folder for per-script JSON")
    parser.add_argument("--out", type=Path, default=None, help="write the collected markdown")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only bench_<NAME>.py for these names"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    return parser.parse_args(argv)


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only is None:
        return scripts
    wanted = {name.removeprefix("bench_").removesuffix(".py") for name in only}
    missing = wanted - {s.stem.removeprefix("bench_") for s in scripts}
    if missing:
        raise SystemExit(f"no benchmark script for: {', '.join(sorted(missing))}")
    return [s for s in scripts if s.stem.removeprefix("bench_") in wanted]


def command(script: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(script)]
    if args.device:
        cmd += ["--device", args.device]
    if args.quick:
        cmd.append("--quick")
    if args.json is not None:
        cmd += ["--json", str(args.json / f"{script.stem}.json")]
    return cmd


def run_script(script: Path, args: argparse.Namespace) -> tuple[int, str, str, float]:
    """Run one script, echoing its output; ``(exit status, stdout, stderr tail, seconds)``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    print(f"\n>>> {' '.join(command(script, args))}", flush=True)
    try:
        done = subprocess.run(
            command(script, args),
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        return 124, out or "", f"timed out after {args.timeout:.0f} s", args.timeout
    print(done.stdout, end="", flush=True)
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr, flush=True)
    return done.returncode, done.stdout, done.stderr[-2000:], time.perf_counter() - started


def report_section(script: Path, status: int, stdout: str, stderr: str, seconds: float) -> str:
    """The script's markdown (from its first heading), or a section saying it failed."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## ")), None)
    body = "\n".join(lines[start:]) if start is not None else ""
    if status == 0 and body:
        return f"{body}\n\n_{script.name}: {seconds:.0f} s_"
    tail = stderr.strip().splitlines()[-15:]
    parts = [f"## {script.name}: FAILED (exit status {status})"]
    if body:
        parts.append(body)
    parts.append("```\n" + "\n".join(tail) + "\n```")
    return "\n\n".join(parts)


def header(args: argparse.Namespace) -> str:
    try:
        import torch

        versions = f"torch {torch.__version__}"
        if torch.cuda.is_available():
            versions += f", {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a core dependency
        versions = "torch not importable"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = " ".join(a for a in ("--quick" if args.quick else "",) if a)
    return (
        f"# dynaconv benchmarks\n\n{now}; {versions}; Python {platform.python_version()}; "
        f"device {args.device or 'default'} {flags}".rstrip()
        + "\n\nRatios are against the plain PyTorch equivalent measured in the same run "
        "(see benchmarks/README.md)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json is not None:
        args.json.mkdir(parents=True, exist_ok=True)
    scripts = discover(args.only)
    sections, failed = [header(args)], []
    for script in scripts:
        status, stdout, stderr, seconds = run_script(script, args)
        sections.append(report_section(script, status, stdout, stderr, seconds))
        if status:
            failed.append(script.name)
    text = "\n\n".join(sections) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"\nwrote {args.out}")
    print(f"\n{len(scripts) - len(failed)}/{len(scripts)} benchmark scripts succeeded", end="")
    print(f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
