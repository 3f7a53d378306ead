"""Domain exceptions. Messages name the file, field and value and say how to fix it."""

from __future__ import annotations

import errno
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


#: What an OS error on an output path means, for the user (errno -> reason).
_OS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a regular file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "a part of the path is a regular file, not a folder",
    errno.EBUSY: "it is busy (a mount point cannot be replaced)",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EXDEV: "it is on another file system than its temporary copy",
}


def os_reason(exc: OSError) -> str:
    """What an ``OSError`` means for the user, in words (its errno, else its own text)."""
    return _OS_REASONS.get(exc.errno or -1, exc.strerror or str(exc))


class OutputError(DealrecError):
    """An output path cannot be written (read-only, not a folder, no space, ...): names the
    option (``--out``), the path and the reason, and says how to fix it."""

    def __init__(self, path: object, reason: str, *, option: str | None = None):
        self.path, self.reason, self.option = path, reason, option
        what = f"{option} {str(path)!r}" if option else repr(str(path))
        super().__init__(f"cannot write {what}: {reason}; choose a writable location"
                         + (f" for {option}" if option else ""))

    @classmethod
    def from_os(cls, exc: OSError, path: object = None, *, option: str | None = None) -> "OutputError":
        """The OutputError for an ``OSError`` raised while writing ``path`` (default: the
        file the OS error names)."""
        reason = os_reason(exc)
        target = exc.filename if exc.filename is not None else path
        if path is not None and target is not None and str(target) != str(path):
            reason += f" ({target})"
        return cls(path if path is not None else target, reason, option=option)


class ResumeError(DealrecError, RuntimeError):
    """An output folder holds results of a different config; pass --overwrite to replace them."""


def check(problems: list[str], cond: bool, message: str) -> None:
    """Append ``message`` to ``problems`` when ``cond`` is false (config validation helper)."""
    if not cond:
        problems.append(message)
