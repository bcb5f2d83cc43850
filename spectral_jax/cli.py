"""The ``spectral-jax`` command.

``spectral-jax demo`` runs the main job end to end on a small built-in default.
"""

from __future__ import annotations

import argparse
import sys

from spectral_jax import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spectral-jax",
        description="Spectral state space models in JAX: train, distill to LDS, generate.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo", help="train a small STU model on CPU and show the loss falling (minutes)"
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
