"""The ``pacs-triage`` command: the composition root that gathers every subcommand."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gateway.cli import build_parser, run

    parser = build_parser()
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
