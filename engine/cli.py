"""The `packtune` command line: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import sys

from packtune.config import ConfigError


def _env(args: argparse.Namespace) -> int:
    from packtune.env import report

    print(report())
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    subject = args.subject.replace("-", "_")
    try:
        module = importlib.import_module(f"packtune.bench.{subject}")
    except ModuleNotFoundError as e:
        if e.name != f"packtune.bench.{subject}":
            raise
        print(f"packtune bench: unknown subject {args.subject!r}", file=sys.stderr)
        return 2
    module.main(args.bench_args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from packtune.demo.run import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="show versions, the C++ extension, and which backend each op uses")
    env.set_defaults(func=_env)
    bench = sub.add_parser("bench", help="side-by-side benchmarks (ce, linear-ce, pack, rope, ...)")
    bench.add_argument("subject")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the subject's own options (--help)")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="train a tiny Llama on generated tasks, report accuracy")
    demo.add_argument("--out", default="runs/demo", help="folder for the data, tokenizer, run and model")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test run (accuracy not a goal)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"packtune: config error: {e}", file=sys.stderr)
        return 2
