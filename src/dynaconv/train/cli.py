"""The ``dynaconv`` command line (``python -m dynaconv``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynaconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="train a small CNN on digits with every method, deploy, verify, compare"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dynaconv.demo import main as demo_main

        return demo_main()
    return 2
