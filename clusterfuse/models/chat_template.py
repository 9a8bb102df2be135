"""Rendering a model's chat template under limits of cost: output size, loop sizes and time.

A chat template is code from the checkpoint's author.  jinja2's sandbox already blocks escapes
(no attribute access to internals, no I/O); it does not bound what a template costs:
``{{ 'A' * 4000000000 }}`` allocates gigabytes and ``{% for i in range(100000) %}{% for j in
range(100000) %}`` runs for hours.  `LimitedSandbox` adds the missing bounds:

* ``*`` / ``+`` / ``**`` / ``%`` on strings, lists and numbers are checked before they run (result
  size, exponent size, no 8-digit field widths in a format string);
* every call (functions, methods, filters) is refused an integer argument above the output cap
  (``'x'.center(10**9)``, ``batch(10**9)``), and the elements of every ``range`` a render creates
  are counted against one budget, which bounds nested loops;
* the render is streamed and stopped when its output passes `MAX_OUTPUT_CHARS` or its time passes
  `MAX_RENDER_SECONDS`; the deadline is also checked at every call and operator.

Whatever a template raises (a limit, a TypeError of its own, RecursionError from a recursive
macro) becomes a ``TemplateLimitError`` / the caller's one-line error, never a traceback.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Longest rendered prompt (characters); far above any context window's worth of text.
MAX_OUTPUT_CHARS = 16 << 20
#: Total elements of all ``range()``s one render may create (nested loops multiply).
MAX_RANGE_ELEMENTS = 1_000_000
#: Wall time one render may take.
MAX_RENDER_SECONDS = 5.0
#: Largest exponent of ``**`` on integers.
MAX_EXPONENT = 4096
_HUGE_FIELD_WIDTH = re.compile(r"\d{8,}")


class TemplateLimitError(ValueError):
    """A chat template that exceeded a limit of output size, loop size or time."""


class _Budget:
    def __init__(self, max_seconds: float) -> None:
        self.deadline = time.monotonic() + max_seconds
        self.max_seconds = max_seconds
        self.range_elements = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template: rendering took longer than {self.max_seconds:g} s; stopped")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _check_time() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.check_time()


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _check_format_string(value: Any) -> None:
    if isinstance(value, str) and _HUGE_FIELD_WIDTH.search(value):
        raise TemplateLimitError("chat template: a format string with an 8-digit field width or precision; refused")


def _check_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"chat template: an argument of {a} (more than {MAX_OUTPUT_CHARS}); refused")


def _bounded_filter(f: Callable) -> Callable:
    """A filter that refuses huge integer arguments (``center(10**9)``, ``batch(10**9)``) and huge
    ``format`` widths before it runs."""

    skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # the context (if passed) and the filtered value
    is_format = f.__name__ == "do_format"

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_args(args[skip:], kwargs)
        if is_format and args:
            _check_format_string(args[skip - 1])
        return f(*args, **kwargs)

    return bounded


class _BoundedFilters(dict):
    """The filter table: every filter put in it, also later (``env.filters["tojson"] = ...``), is bounded."""

    def __setitem__(self, name: str, f: Callable) -> None:
        super().__setitem__(name, _bounded_filter(f))


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox plus bounds on what a template can cost (see the module docstring)."""

    intercepted_binops = frozenset(["*", "+", "**", "%"])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)  # generates text of any size; no chat template uses it
        filters, self.filters = self.filters, _BoundedFilters()
        for name, f in filters.items():
            self.filters[name] = f

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "*":
            seq, times = (left, right) if _size(left) is not None else (right, left)
            n = _size(seq)
            if n is not None and isinstance(times, int) and n * max(times, 0) > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"chat template: repeating {n} items {times} times is more than "
                                         f"{MAX_OUTPUT_CHARS}; refused")
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"chat template: a string or list longer than {MAX_OUTPUT_CHARS}; refused")
        elif operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and isinstance(left, int) and abs(left) > 1:
                raise TemplateLimitError(f"chat template: an exponent of {right} (more than {MAX_EXPONENT}); refused")
        elif operator == "%":
            _check_format_string(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget.get()
        if budget is not None:
            budget.check_time()
        _check_args(args, kwargs)
        if getattr(__obj, "__name__", "") in ("format", "format_map", "vformat"):  # str.format, as jinja wraps it
            bound_to = getattr(__obj, "__self__", None)
            for a in (bound_to, *args, *getattr(__obj, "args", ())):
                _check_format_string(a)
        if __obj is __self.globals.get("range") and budget is not None:
            try:
                budget.range_elements += len(range(*args))
            except (TypeError, ValueError, OverflowError) as e:
                raise TemplateLimitError(f"chat template: range{args}: {e}") from e
            if budget.range_elements > MAX_RANGE_ELEMENTS:
                raise TemplateLimitError(f"chat template: loops over more than {MAX_RANGE_ELEMENTS} range elements "
                                         "in all; refused")
        return super().call(__context, __obj, *args, **kwargs)


def render_limited(template: jinja2.Template, context: Mapping[str, Any], *,
                   max_chars: int = MAX_OUTPUT_CHARS, max_seconds: float = MAX_RENDER_SECONDS) -> str:
    """Render ``template`` (made by a `LimitedSandbox`) with ``context``, streaming, under the limits.

    Raises `TemplateLimitError` for a limit, and lets the template's own errors through for the
    caller to word (jinja2.TemplateError, TypeError, RecursionError, ...)."""
    token = _budget.set(_Budget(max_seconds))
    try:
        parts: list[str] = []
        total = 0
        budget = _budget.get()
        for chunk in template.generate(**context):
            total += len(chunk)
            if total > max_chars:
                raise TemplateLimitError(f"chat template: output longer than {max_chars} characters; stopped")
            parts.append(chunk)
            budget.check_time()
        return "".join(parts)
    finally:
        _budget.reset(token)
