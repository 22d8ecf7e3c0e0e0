"""``fastinfer`` / ``python -m fastinfer``: the command line (not a primitive: it composes them).

fastinfer demo [--quick] [--serve]   plain FastAPI endpoint vs the fastinfer stack
fastinfer warm MODULE:FACTORY ...    compile a model into a cache bundle or an AOT package

Layout: ``warm`` (the warm subcommand), ``demo/`` (the demo: plain endpoint vs the fastinfer
stack), ``loadgen`` (the HTTP load generator the demo and benchmarks use).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastinfer", description="fastinfer: the command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="plain FastAPI endpoint vs the fastinfer stack, side by side"
    )
    demo.add_argument("--quick", action="store_true", help="a shorter load ramp")
    demo.add_argument("--serve", action="store_true", help="then keep the service running")
    demo.add_argument(
        "--compile", action="store_true", help="also compile the model (slower start)"
    )
    demo.add_argument("--out", default="fastinfer-demo", help="folder for report.json/.png")
    demo.add_argument("--port", type=int, default=8000, help="port for --serve (on 127.0.0.1)")
    from fastinfer._cli.warm import add_parser as add_warm

    add_warm(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastinfer._cli.demo import run_demo

        return run_demo(
            quick=args.quick, serve=args.serve, out=args.out, compile=args.compile, port=args.port
        )
    if args.command == "warm":
        from fastinfer._cli.warm import run_warm
        from fastinfer.errors import FastInferError

        try:
            return run_warm(args)
        except FastInferError as exc:
            print(f"fastinfer warm: error: {exc}", file=sys.stderr)
            return 1
    return 2  # pragma: no cover - argparse already rejected anything else
