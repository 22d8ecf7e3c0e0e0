"""``fastinfer`` / ``python -m fastinfer``: the command line.

fastinfer demo [--quick]    the showcase: runs each primitive and prints what it did
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the showcase of every primitive")
    demo.add_argument("--quick", action="store_true", help="smaller workloads")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastinfer._demo import run_demo

        return run_demo(quick=args.quick)
    return 2  # pragma: no cover - argparse already rejected anything else


if __name__ == "__main__":
    sys.exit(main())
