"""Domain exceptions. Messages name the file, field and value and say how to fix it."""

from __future__ import annotations

from collections.abc import Iterable


class DealrecError(Exception):
    """Base class of every error dealrec raises on purpose."""


class DataError(DealrecError, ValueError):
    """Input data is malformed: names the file, the field and the offending value."""

    def __init__(self, message: str, *, path: object = None, field: str | None = None, value: object = None):
        parts = []
        if path is not None:
            parts.append(f"file {str(path)!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        if value is not None:
            shown = repr(value)
            parts.append(f"value {shown[:200]}")
        where = (" [" + ", ".join(parts) + "]") if parts else ""
        super().__init__(message + where)
        self.path, self.field, self.value = path, field, value


class UnsafePickleError(DataError):
    """A pickle holds something other than plain dict/list/str/int/float data."""


class ConfigError(DealrecError, ValueError):
    """A stage config is invalid. Carries every problem found, reported at once."""

    def __init__(self, problems: Iterable[str], *, config: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {config} ({len(self.problems)} problem(s)):\n{lines}")


class SolverError(DealrecError, RuntimeError):
    """An iterative solver diverged or produced NaN; the message says which knob to turn."""


class ResumeError(DealrecError, RuntimeError):
    """An output folder holds results of a different config; pass --overwrite to replace them."""


def check(problems: list[str], cond: bool, message: str) -> None:
    """Append ``message`` to ``problems`` when ``cond`` is false (config validation helper)."""
    if not cond:
        problems.append(message)
