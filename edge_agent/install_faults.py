"""The installer's one fault-injection seam: stop at a named step so a test can kill it there.

`InstallOptions.faults` is called at the start of every step (`STEPS`). In production it does
nothing. A test that kills `edge-agent fn install` with SIGKILL at an exact step sets

    EDGEFN_INSTALL_PAUSE_AT=<step>          (one of STEPS)
    EDGEFN_INSTALL_PAUSE_MARKER=<path>      (optional; default DATA_DIR/staging/paused-at-<step>)

in the installer's environment: the variables are read once, when the options are built, and
the installer then writes the marker file (its pid) and sleeps at that step. In-process tests
pass their own `InstallFaults` (for example one that raises) instead of using the environment.
Documented in docs/registry.md; never set in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Step = Literal["download", "verify", "unpack", "warm", "switch", "prune"]
STEPS: tuple[Step, ...] = get_args(Step)

PAUSE_ENV = "EDGEFN_INSTALL_PAUSE_AT"
PAUSE_MARKER_ENV = "EDGEFN_INSTALL_PAUSE_MARKER"
# Long enough for any test to notice the marker and kill the process; short enough that a
# forgotten paused installer does not stay around for good.
PAUSE_S = 300.0


@dataclass(frozen=True, slots=True)
class InstallFaults:
    """Pause (marker file, then sleep) when the installer reaches `pause_at`; None: no faults."""

    pause_at: Step | None = None
    marker: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InstallFaults:
        env = os.environ if environ is None else environ
        step = env.get(PAUSE_ENV, "")
        if not step:
            return cls()
        if step not in STEPS:
            raise ValueError(f"{PAUSE_ENV}={step!r}: not one of {', '.join(STEPS)}")
        marker = env.get(PAUSE_MARKER_ENV)
        return cls(step, Path(marker) if marker else None)  # type: ignore[arg-type]

    def at(self, step: Step, data_dir: Path) -> None:
        """Called by the installer at the start of `step` (blocking: the installer is sync)."""
        if step != self.pause_at:
            return
        marker = self.marker or data_dir / "staging" / f"paused-at-{step}"
        marker.write_text(str(os.getpid()))
        time.sleep(PAUSE_S)


NO_FAULTS = InstallFaults()
