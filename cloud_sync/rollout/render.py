"""The live view of `edge-cloud rollout status --watch`, as text from `Rollout.status_view()`.

Pure: the CLI redraws it on every poll. Per wave a progress bar of devices that are done (any
settled state), each gate's last value against its bound, and the count of devices per state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloud_sync.rollout.states import SETTLED_STATES

_SETTLED = frozenset(s.value for s in SETTLED_STATES)
BAR = 24  # characters: fits an 80-column terminal with the counts beside it


def bar(done: int, total: int, width: int = BAR) -> str:
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _counts(states: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no devices"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def render(view: Mapping[str, Any]) -> str:
    waves = view.get("waves") or []
    current = int(view.get("wave") or 0)
    lines = [
        f"rollout {view['id']}  {view['function']}@{view['version']}  {view['state']}"
        f"  wave {current + 1}/{len(waves)}"
    ]
    if view.get("reason"):
        lines.append(f"  reason: {view['reason']}")
    for w in waves:
        states: Mapping[str, int] = w.get("states") or {}
        total = int(w.get("devices") or 0)
        done = sum(n for s, n in states.items() if s in _SETTLED)
        mark = ">" if w["index"] == current else " "
        lines.append(
            f"{mark} wave {w['index'] + 1} {w['percent']:>5g}%  {bar(done, total)} "
            f"{done:>5}/{total:<5} {_counts(states)}"
        )
    gates = view.get("gates")
    if gates:
        lines.append(f"  gates (last check: {gates.get('outcome')})")
        for g in gates.get("gates") or []:
            lines.append(
                f"    {g['gate']:<32} {_num(g.get('value')):>8} vs {_num(g.get('bound')):<8} "
                f"{g['outcome']:<12} n={g.get('samples', 0)}"
            )
    lines.append(f"  devices: {_counts(view.get('counts') or {})}")
    return "\n".join(lines)
