"""The `packtune` command line: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import sys

from packtune.config import ConfigError


def _env(args: argparse.Namespace) -> int:
    from packtune.env import report

    print(report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="show versions, the C++ extension, and which backend each op uses")
    env.set_defaults(func=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"packtune: config error: {e}", file=sys.stderr)
        return 2
