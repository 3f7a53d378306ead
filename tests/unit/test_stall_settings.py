"""The stall watchdog's settings: one default pair for every pool, one check, the same in prune
and evaluate (engine.config.STALL*, stall_ok)."""

from __future__ import annotations

import argparse
import math

import pytest

from engine.config import STALL, STALL_TIMEOUT_S, STALL_WARN_S, stall_ok
from engine.errors import ConfigError


@pytest.mark.parametrize("v, ok", [(0, True), (0.0, True), (3.5, True), ("120", True), (-1, False),
                                   (math.nan, False), ("soon", False), (None, False)])
def test_stall_ok(v, ok):
    assert stall_ok(v) is ok


def test_prune_and_evaluate_share_the_defaults_and_refuse_the_same_values():
    from jobs import evaluate
    from jobs.prune import ScaleConfig

    assert (ScaleConfig().stall_warn_s, ScaleConfig().stall_timeout_s) == STALL == (STALL_WARN_S, STALL_TIMEOUT_S)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    a = parser.parse_args(["--data", "/nowhere", "--adapter", "/nowhere"])
    assert (a.stall_warn_s, a.stall_timeout_s) == STALL
    for bad in (-1.0, math.nan):
        with pytest.raises(ConfigError, match="stall_timeout_s must be >= 0"):
            ScaleConfig(stall_timeout_s=bad)
        a.stall_timeout_s = bad
        with pytest.raises(ConfigError, match=r"--stall-timeout-s .* must be >= 0 \(0 = off\)"):
            evaluate.config_from_args(a)
