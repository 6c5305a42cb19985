"""Command-line entry point ``saliencybench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .benchmark.cli import main as benchmark_main

    return benchmark_main(argv)


if __name__ == "__main__":
    sys.exit(main())
