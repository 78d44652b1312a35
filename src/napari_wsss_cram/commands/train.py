"""Not implemented yet (placeholder owned by the issue that builds it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise SystemExit("wsss-cram: this subcommand is not implemented yet.")
