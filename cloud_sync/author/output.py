"""How the author commands talk: progress on stdout, one line on stderr when they fail.

Exit status (the same as the operator commands): 0 success; 1 refused or failed; 2 bad usage or
bad local input; 3 the platform was unreachable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

T = TypeVar("T")


def fail(message: str, code: int) -> int:
    """Print why on stderr (one line) and return the exit code."""
    print(f"edge-cloud: {' '.join(message.split())}", file=sys.stderr)
    return code


def say(line: str) -> None:
    """A progress line; flushed, so a caller piping stdout sees it as it happens."""
    print(line, flush=True)


def timed(what: str, fn: Callable[[], T]) -> T:
    """Run `fn` between "<what> ..." and "  done in N s"."""
    say(f"{what} ...")
    started = time.monotonic()
    result = fn()
    say(f"  done in {time.monotonic() - started:.1f} s")
    return result
