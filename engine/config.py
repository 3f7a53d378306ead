"""Helpers shared by the stage configs: dict round-trips, stable hashes, validation of several
configs at once (every problem reported in one error), and a version stamp for manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable, Iterable
from typing import Any

from engine.errors import ConfigError

# The stall watchdog of every actor pool (prune's scoring stages, evaluate's model pools): a
# stage with no batch scored and no actor working for STALL_WARN_S seconds logs the cluster's
# pending demands; after STALL_TIMEOUT_S it fails with a clear error (actor start-up, i.e. model
# loading, counts). 0 turns either off. One place, so that the jobs and their help agree.
STALL_WARN_S = 120.0
STALL_TIMEOUT_S = 1800.0
STALL = (STALL_WARN_S, STALL_TIMEOUT_S)


def stall_ok(seconds: Any) -> bool:
    """A stall setting is a number >= 0 (0 = off); NaN and negatives are not."""
    try:
        return float(seconds) >= 0
    except (TypeError, ValueError):
        return False


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict of a (possibly nested) config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def dataclass_from_dict(cls: type, d: Any, *, config: str) -> Any:
    """``cls(**d)`` for a config dataclass: a copy when ``d`` is already a ``cls``; unknown keys
    reported with the valid ones (ConfigError naming ``config``), as is a ``d`` that is no dict."""
    if isinstance(d, cls):
        return cls(**{f.name: getattr(d, f.name) for f in dataclasses.fields(cls)})
    if not isinstance(d, dict):
        raise ConfigError([f"config must be a dict or {cls.__name__}, got {type(d).__name__}"], config=config)
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError([f"unknown field {k!r}; known: {known}" for k in unknown], config=config)
    return cls(**d)


def stable_hash(obj: Any) -> str:
    """Order-independent short hash of a JSON-able object (or a config dataclass)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def collect_problems(builders: Iterable[tuple[str, Callable[[], Any]]]) -> tuple[dict[str, Any], list[str]]:
    """Build several configs, collecting every ConfigError instead of stopping at the first.

    Args:
        builders: (name, zero-argument constructor) pairs.

    Returns:
        The configs that were built (by name) and the list of all problems, each
        prefixed with its config's name.
    """
    built: dict[str, Any] = {}
    problems: list[str] = []
    for name, make in builders:
        try:
            built[name] = make()
        except ConfigError as e:
            problems.extend(f"{name}: {p}" for p in e.problems)
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
    return built, problems


def raise_if(problems: list[str], *, config: str) -> None:
    if problems:
        raise ConfigError(problems, config=config)


def versions() -> dict[str, str]:
    """Versions of the stack, for manifests."""
    out = {"python": platform.python_version()}
    for mod in ("engine", "torch", "ray", "transformers", "peft", "deepspeed", "pyarrow", "numpy"):
        try:
            m = __import__(mod)
            out["dealrec" if mod == "engine" else mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            out[mod] = "not installed"
    return out
