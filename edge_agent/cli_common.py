"""What `edge-agent` subcommand modules share: exit codes, the one-line failure, --data-dir."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_STARTUP = 4


def fail(message: str, code: int) -> int:
    print(f"edge-agent: {message}", file=sys.stderr)
    return code


def add_data_dir(p: argparse.ArgumentParser) -> None:
    from edge_agent.settings import default_data_dir

    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("EDGEFN_DATA_DIR", default_data_dir())),
        help="agent data directory (default: $EDGEFN_DATA_DIR or ~/.local/share/edgefn)",
    )
