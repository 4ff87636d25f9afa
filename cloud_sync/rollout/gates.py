"""Health gates: a metric of the new version on a wave's devices, a bound, and a verdict.

Syntax: `METRIC OP BOUND`, e.g. `error_rate<=0.05`, `p95_ms<=200`, `install_success>=0.9`,
`crash_count<=0`, `error_rate<=max(1%,2*previous)`.

- METRIC: `error_rate` (errors / invocations), `p50_ms`, `p95_ms`, `p99_ms` (latency quantiles
  from the histogram), `install_success` (devices installed / devices that tried; rejected
  devices did not try), `crash_count` (crashes + restarts of the new version).
- OP: `<=`, `<`, `>=`, `>`.
- BOUND: numbers (`5%` = 0.05, only for the ratio metrics), `previous` (the same metric of the
  version those devices ran before), `+ - * x /`, parentheses, `max(...)` and `min(...)`.

Verdicts (Argo Rollouts' analysis model): `pass`, `fail`, or `inconclusive` when there is not
yet enough data -- fewer than `min_invocations` invocations (a rollout that ends its bake time
inconclusive pauses and says why). Two refinements keep a verdict honest:

- A result that more data cannot rescue is decided early: 30 errors in 40 invocations already
  fail `error_rate<=0.05` with min_invocations 100 (at least 30/100), and one crash fails
  `crash_count<=0` at once.
- `previous` is unknown when the old version has too little traffic (or there is none: a first
  install). Inside `max`/`min` such an argument is dropped, so `max(1%,2*previous)` falls back to
  1%; a bound that is nothing but `previous` is then inconclusive.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from cloud_sync.errors import FieldProblem
from cloud_sync.rollout.errors import GateError
from cloud_sync.rollout.metrics import VersionMetrics

Metric = Literal["error_rate", "p50_ms", "p95_ms", "p99_ms", "install_success", "crash_count"]
METRICS: tuple[str, ...] = (
    "error_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "install_success",
    "crash_count",
)
RATIO_METRICS = frozenset({"error_rate", "install_success"})
QUANTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}
Op = Literal["<=", "<", ">=", ">"]
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
Outcome = Literal["pass", "fail", "inconclusive"]
MAX_GATE_CHARS = 200  # typed by people; longer is a mistake (and bounds the parser's work)

# ---- bound expressions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Previous:
    pass


@dataclass(frozen=True, slots=True)
class Call:
    fn: Literal["max", "min"]
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Bin:
    op: Literal["+", "-", "*", "/"]
    left: Expr
    right: Expr


Expr = Num | Previous | Call | Bin

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)(%?)|(max|min|previous|x)\b|([-+*/(),]))")


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := factor (*|x|/ factor)*."""

    def __init__(self, text: str, allow_percent: bool) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"unexpected {text[pos:].strip()[:10]!r}")
            number, percent, word, sym = m.groups()
            if number is not None:
                if percent and not allow_percent:
                    raise ValueError("'%' is only for ratios (error_rate, install_success)")
                value = float(number) / (100 if percent else 1)
                self.tokens.append(("num", repr(value)))
            elif word is not None:
                self.tokens.append(("op", "*") if word == "x" else ("word", word))
            else:
                self.tokens.append(("op", sym))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or 'more'}, got {tok[1] if tok else 'the end'!r}")
        self.i += 1
        return tok

    def parse(self) -> Expr:
        expr = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return expr

    def expr(self) -> Expr:
        left = self.term()
        while (tok := self.peek()) is not None and tok[1] in ("+", "-"):
            self.take()
            left = Bin(tok[1], left, self.term())  # type: ignore[arg-type]
        return left

    def term(self) -> Expr:
        left = self.factor()
        while (tok := self.peek()) is not None and tok[1] in ("*", "/"):
            self.take()
            left = Bin(tok[1], left, self.factor())  # type: ignore[arg-type]
        return left

    def factor(self) -> Expr:
        kind, value = self.take()
        if kind == "num":
            return Num(float(value))
        if value == "previous":
            return Previous()
        if value in ("max", "min"):
            self.take("(")
            args = [self.expr()]
            while self.peek() == ("op", ","):
                self.take()
                args.append(self.expr())
            self.take(")")
            return Call(value, tuple(args))  # type: ignore[arg-type]
        if value == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if value == "-":
            return Bin("-", Num(0.0), self.factor())
        raise ValueError(f"unexpected {value!r}")


def evaluate_bound(expr: Expr, previous: float | None) -> float | None:
    """The bound's value; None when it needs a `previous` that is unknown."""
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Previous):
        return previous
    if isinstance(expr, Call):
        values = [v for v in (evaluate_bound(a, previous) for a in expr.args) if v is not None]
        if not values:
            return None
        return max(values) if expr.fn == "max" else min(values)
    left, right = evaluate_bound(expr.left, previous), evaluate_bound(expr.right, previous)
    if left is None or right is None:
        return None
    if expr.op == "+":
        return left + right
    if expr.op == "-":
        return left - right
    if expr.op == "*":
        return left * right
    return left / right if right else math.inf


def uses_previous(expr: Expr) -> bool:
    if isinstance(expr, Previous):
        return True
    if isinstance(expr, Call):
        return any(uses_previous(a) for a in expr.args)
    if isinstance(expr, Bin):
        return uses_previous(expr.left) or uses_previous(expr.right)
    return False


# ---- gates --------------------------------------------------------------------------------------

_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([^=<>\s].*?)\s*$")


@dataclass(frozen=True, slots=True)
class Gate:
    metric: Metric
    op: Op
    bound: Expr
    text: str  # canonical text (spaces removed), stored and shown

    def __str__(self) -> str:
        return self.text


def parse_gate(text: str, where: str = "gate") -> Gate:
    """Parse one gate; `GateError` says what is wrong and what is allowed."""

    def bad(problem: str) -> GateError:
        return GateError(f"gate {text!r} rejected", [FieldProblem(where, problem)])

    if not isinstance(text, str) or not text.strip():
        raise bad("empty gate")
    if len(text) > MAX_GATE_CHARS:
        raise bad(f"longer than {MAX_GATE_CHARS} characters")
    m = _GATE_RE.match(text)
    if m is None:
        raise bad("expected METRIC OP BOUND, e.g. error_rate<=0.05 (ops: <= < >= >)")
    metric, op, raw = m.groups()
    if metric not in METRICS:
        raise bad(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    try:
        bound = _Parser(raw, allow_percent=metric in RATIO_METRICS).parse()
    except ValueError as exc:
        raise bad(f"bad bound {raw!r}: {exc}") from exc
    canonical = f"{metric}{op}{''.join(raw.split())}"
    return Gate(metric, op, bound, canonical)  # type: ignore[arg-type]  # checked above


def parse_gates(texts: Sequence[str]) -> tuple[Gate, ...]:
    """Parse several gates; one `GateError` lists every bad one."""
    gates: list[Gate] = []
    problems: list[FieldProblem] = []
    for i, text in enumerate(texts):
        try:
            gates.append(parse_gate(text, f"gates[{i}]"))
        except GateError as exc:
            problems.extend(exc.fields)
    if problems:
        raise GateError("gates rejected", problems)
    return tuple(gates)


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    outcome: Outcome
    value: float | None  # the metric's value now (None: no data at all)
    bound: float | None  # the bound as evaluated now (None: needs an unknown previous)
    samples: int  # invocations (installs for install_success) it was judged on
    reason: str  # names the gate and its value

    def to_dict(self) -> dict[str, object]:
        return {
            "gate": self.gate,
            "outcome": self.outcome,
            "value": _json_number(self.value),
            "bound": _json_number(self.bound),
            "samples": self.samples,
            "reason": self.reason,
        }


def metric_value(metric: str, m: VersionMetrics) -> tuple[float | None, int]:
    """(value, samples) of one metric; value None when there is nothing to compute it from."""
    if metric == "error_rate":
        return (m.errors / m.invocations if m.invocations else None), m.invocations
    if metric in QUANTILES:
        if m.latency is None:
            return None, 0
        return m.latency.quantile(QUANTILES[metric]), m.latency.total
    if metric == "install_success":
        tried = m.installs_ok + m.installs_failed
        return (m.installs_ok / tried if tried else None), tried
    return float(m.crashes), m.invocations  # crash_count


def evaluate_gate(
    gate: Gate,
    current: VersionMetrics,
    previous: VersionMetrics | None,
    min_invocations: int,
) -> GateResult:
    value, samples = metric_value(gate.metric, current)
    prev_value = None
    if previous is not None and uses_previous(gate.bound):
        pv, prev_samples = metric_value(gate.metric, previous)
        enough = gate.metric == "install_success" or prev_samples >= min_invocations
        prev_value = pv if enough else None
    bound = evaluate_bound(gate.bound, prev_value)
    compare = _COMPARE[gate.op]
    where = _bound_text(gate, bound, prev_value)
    if bound is None:
        return GateResult(
            gate.text, "inconclusive", value, None, samples,
            f"{gate.text}: no baseline from the previous version to compare with",
        )  # fmt: skip
    if value is None:
        what = "no installs finished yet" if gate.metric == "install_success" else "no data yet"
        return GateResult(gate.text, "inconclusive", None, bound, samples, f"{gate.text}: {what}")
    ok = compare(value, bound)
    needs_min = gate.metric != "install_success"
    if needs_min and samples < min_invocations:
        if not ok and _decided_early(gate, current, bound, min_invocations):
            return GateResult(
                gate.text, "fail", value, bound, samples,
                f"{gate.metric}={_fmt(value)} violates {where} already after {samples} "
                f"invocations (more cannot bring it back within the bound)",
            )  # fmt: skip
        return GateResult(
            gate.text, "inconclusive", value, bound, samples,
            f"{gate.text}: only {samples} of {min_invocations} invocations needed to judge "
            f"(now {gate.metric}={_fmt(value)})",
        )  # fmt: skip
    unit = "installs" if gate.metric == "install_success" else "invocations"
    verdict: Outcome = "pass" if ok else "fail"
    word = "within" if ok else "violates"
    return GateResult(
        gate.text, verdict, value, bound, samples,
        f"{gate.metric}={_fmt(value)} {word} {where} over {samples} {unit}",
    )  # fmt: skip


def _decided_early(gate: Gate, m: VersionMetrics, bound: float, minimum: int) -> bool:
    """True when no further (perfect) traffic up to `minimum` can bring the value within bound."""
    if gate.op not in ("<=", "<"):
        return False
    if gate.metric == "crash_count":
        return True  # crashes only add up
    if gate.metric == "error_rate":
        best = m.errors / max(m.invocations, minimum)
        return not _COMPARE[gate.op](best, bound)
    return False


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    results: tuple[GateResult, ...]
    reason: str  # the failing (or else inconclusive) gates' reasons; "" on pass

    def to_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "gates": [r.to_dict() for r in self.results],
        }


def evaluate_gates(
    gates: Sequence[Gate],
    current: VersionMetrics,
    previous: VersionMetrics | None,
    min_invocations: int,
) -> Verdict:
    """fail if any gate fails; else inconclusive if any is; else pass."""
    results = tuple(evaluate_gate(g, current, previous, min_invocations) for g in gates)
    for outcome in ("fail", "inconclusive"):
        hit = [r.reason for r in results if r.outcome == outcome]
        if hit:
            return Verdict(outcome, results, "; ".join(hit))  # type: ignore[arg-type]
    return Verdict("pass", results, "")


def _bound_text(gate: Gate, bound: float | None, previous: float | None) -> str:
    if bound is None:
        return gate.text
    text = f"{gate.op} {_fmt(bound)}"
    if uses_previous(gate.bound):
        text += f" ({gate.text}, previous={_fmt(previous)})"
    else:
        text += f" ({gate.text})"
    return text


def _fmt(value: float | None) -> str:
    if value is None:
        return "unknown"
    if math.isinf(value):
        return "above the largest histogram bucket"
    return f"{value:.4g}"


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
