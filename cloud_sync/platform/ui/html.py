"""Escaping for the console: every value is escaped unless it is already `Html`.

`h(fragment, **values)` fills a `string.Template` fragment (`$name`) and escapes each value that
is not `Html`, so a device that reports `<script>` in a label is shown as text. Only code in
this package builds `Html`, from its own literals and from other `h()` results: a reported
string never becomes markup. Templates (templates/*.html) are read once from the package.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import string
from collections.abc import Iterable
from typing import Any


class Html(str):
    """Markup that is safe to emit as is (built here, never from device data)."""

    __slots__ = ()


def esc(value: Any) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def h(fragment: str, **values: Any) -> Html:
    return Html(string.Template(fragment).substitute({k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Html], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


@functools.cache
def _template(name: str) -> string.Template:
    text = importlib.resources.files(__package__).joinpath("templates", name).read_text("utf-8")
    return string.Template(text)


def render(name: str, **values: Any) -> Html:
    """A template file from templates/, every value escaped unless `Html`."""
    return Html(_template(name).substitute({k: esc(v) for k, v in values.items()}))
