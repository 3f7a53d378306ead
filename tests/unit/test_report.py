"""Report: every PNG the HTML links exists; missing inputs skip their plot with a note."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.errors import DataError
from engine.report import write_report
from engine.selection import SelectionConfig, select


def _linked_images(index: Path) -> list[str]:
    return re.findall(r"<img src='([^']+)'", index.read_text(encoding="utf-8"))


def _data(n=400, items=60, seed=0):
    rng = np.random.default_rng(seed)
    sc = {"influence": rng.standard_normal(n), "effort": rng.gamma(2.0, size=n)}
    # Zipf-like targets so the popularity deciles differ
    targets = np.minimum(rng.zipf(1.6, size=n) - 1, items - 1)
    pop = np.bincount(targets, minlength=items)
    return sc, targets, pop


def test_full_report_writes_all_plots_and_links_them(tmp_path):
    sc, targets, pop = _data()
    cfg = SelectionConfig(method="dealrec", ratio=0.05, groups=10, seed=1)
    r = select("dealrec", sc, cfg)
    df = pd.DataFrame({"sample_id": np.arange(400) + 1000, **sc, "score": r.score, "group": r.groups})
    index = write_report(tmp_path, scores=df, selected=r.indices + 1000, stats=r.stats,
                         item_popularity_full=pop, targets=targets, title="games <test>",
                         config=vars(cfg))
    assert index == tmp_path / "report" / "index.html"
    links = _linked_images(index)
    assert set(links) == {"hist_influence.png", "hist_effort.png", "hist_score.png", "strata.png", "coverage.png"}
    for name in links:
        png = index.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not Path(name).is_absolute()
    text = index.read_text(encoding="utf-8")
    assert "games &lt;test&gt;" in text  # escaped
    assert "20 (5.00%)" in text and "hard-pruned" in text and "&quot;dealrec&quot;" in text
    assert "Notes" not in text


def test_random_selection_skips_score_and_strata_plots_with_notes(tmp_path):
    _, targets, pop = _data()
    r = select("random", {}, SelectionConfig(budget=40), n=400)
    index = write_report(tmp_path, scores={"sample_id": np.arange(400)}, selected=r.indices, stats=r.stats,
                         item_popularity_full=pop, targets=targets, title="random", config={"method": "random"})
    assert _linked_images(index) == ["coverage.png"]
    text = index.read_text(encoding="utf-8")
    assert "no &#x27;influence&#x27; column" in text and "no strata" in text
    for name in _linked_images(index):
        assert (index.parent / name).exists()


def test_minimal_inputs_and_group_column_fallback(tmp_path):
    # no sample_id, no coverage inputs, no stats: strata counted from the group column
    scores = {"score": np.arange(10.0), "group": np.array([-1, 0, 0, 0, 1, 1, 1, 2, 2, 2])}
    index = write_report(tmp_path, scores=scores, selected=np.array([1, 4, 7]))
    assert set(_linked_images(index)) == {"hist_score.png", "strata.png"}
    assert "item coverage: not plotted" in index.read_text(encoding="utf-8")


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="selected"):
        write_report(tmp_path, scores={"sample_id": np.arange(5)}, selected=np.array([7]))
    with pytest.raises(DataError, match="targets"):
        write_report(tmp_path, scores={"sample_id": np.arange(5)}, selected=np.array([1]),
                     item_popularity_full=np.ones(3), targets=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="targets"):
        write_report(tmp_path, scores={"sample_id": np.arange(2)}, selected=np.array([1]),
                     item_popularity_full=np.ones(3), targets=np.array([0, 5]))


def test_expected_random_coverage_matches_combinatorics():
    from math import comb

    from engine.report import _expected_random_coverage

    n, b = 30, 7
    counts = np.array([1, 2, 5, 23, 24, 30])
    exact = [1 - comb(n - c, b) / comb(n, b) for c in counts]
    assert np.allclose(_expected_random_coverage(counts, n, b), exact)
