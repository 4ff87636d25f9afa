"""`edge-cloud`'s exit codes and its one-line failure, shared by its subcommand modules."""

from __future__ import annotations

import sys

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def fail(message: str, code: int) -> int:
    print(f"edge-cloud: {' '.join(message.split())}", file=sys.stderr)
    return code
