"""The one way builders run a toolchain command (g++, go, npm): bounded, captured, explained.

Every builder needs the same four things from a compiler run: stdin closed (a tool that prompts
must not hang a build), a timeout (a wedged compiler ends in an error, not a hung script), a
missing program reported as `ToolchainError` (the author installs something) and a failure as
`BuildError` carrying the *end* of the output (where compilers say what finally went wrong).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtimes.errors import BuildError, ToolchainError

# Output kept in a BuildError: enough for the first errors, never a flood.
OUTPUT_TAIL_CHARS = 4000


def tail(output: str, limit: int = OUTPUT_TAIL_CHARS) -> str:
    """The last `limit` characters of `output`, marked as cut when they are."""
    output = output.strip()
    return "..." + output[-limit:] if len(output) > limit else output


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    missing_hint: str = "",
    private_dir: Path | None = None,
) -> str:
    """Run `argv` to completion and return its stdout; raise BuildError/ToolchainError.

    `what` names the step in errors ("go build of ./fn"). `private_dir`, when the build runs in
    a scratch copy, is replaced by "." in the output so messages point at the author's files.
    """
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        hint = f"; {missing_hint}" if missing_hint else ""
        raise ToolchainError(f"{argv[0]} is not installed: {exc}{hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        output = tail(proc.stderr + proc.stdout)
        if private_dir is not None:
            output = output.replace(str(private_dir), ".")
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{output}")
    return proc.stdout
