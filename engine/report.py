"""A readable report of one selection: PNG plots plus one self-contained ``index.html``.

``write_report`` draws, into ``<out_dir>/report/``:

- ``hist_influence.png``, ``hist_effort.png``, ``hist_score.png``: each score term and the
  combined score over all samples, with the selected subset overlaid (both as densities,
  so a 1% subset is visible next to the full set); ``hist_llm_influence.png`` /
  ``hist_surrogate_influence.png`` too where the scores have those columns;
- ``strata.png``: the K strata of Algorithm 2, stratum size vs how many were taken;
- ``coverage.png``: item-popularity coverage: per popularity decile of the full set, the
  fraction of items the subset's targets cover (with what a uniform random subset of
  the same size covers in expectation), and the share of targets per decile;
- ``index.html``: the plots by relative link, a table of counts, the strata and the config.

Plots whose inputs are absent (method=random has no influence, no strata, ...) are
skipped and the page says why. Matplotlib is used through ``Figure`` objects only (Agg
canvas, no pyplot state), so it is safe in workers and never opens a window.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.errors import DataError

__all__ = ["write_report"]

REPORT_DIR = "report"
SCORE_TERMS = (
    ("influence", "influence score (raw)", "hist_influence.png"),
    ("effort", "effort score (raw)", "hist_effort.png"),
    ("score", "combined / ranking score", "hist_score.png"),
)
#: score columns plotted only where a run has them (no note where it has not)
OPTIONAL_TERMS = (
    ("llm_influence", "LLM-side influence (raw: LoRA gradient . u)", "hist_llm_influence.png"),
    ("surrogate_influence", "surrogate influence (raw; not the term selected on)", "hist_surrogate_influence.png"),
)
N_DECILES = 10


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _stats_dict(stats: object) -> dict | None:
    if stats is None:
        return None
    if hasattr(stats, "to_dict"):
        stats = stats.to_dict()
    if not isinstance(stats, Mapping):
        raise DataError("stats must be a StrataStats or a mapping with 'size' and 'taken'", field="stats",
                        value=type(stats).__name__)
    d = dict(stats)
    if "size" not in d or "taken" not in d:
        raise DataError("stats needs per-stratum 'size' and 'taken'", field="stats", value=sorted(d))
    if len(d["size"]) != len(d["taken"]):
        raise DataError("stats 'size' and 'taken' differ in length", field="stats")
    return d


def _plot_hist(values: np.ndarray, sel: np.ndarray, label: str, path: Path, threshold: float | None) -> None:
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi, 51) if hi > lo else np.array([lo - 0.5, lo + 0.5])
    ax.hist(values, bins=bins, density=True, histtype="step", color="0.3", linewidth=1.4,
            label=f"all samples (n={values.size:,})")
    if sel.size:
        ax.hist(sel, bins=bins, density=True, alpha=0.55, color="tab:orange",
                label=f"selected (n={sel.size:,})")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label="hard-prune cut")
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title(f"{label}: all vs selected")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_strata(size: np.ndarray, taken: np.ndarray, path: Path) -> None:
    k = size.size
    x = np.arange(k)
    fig = Figure(figsize=(max(6.4, 0.14 * k + 2), 5.0))
    ax1 = fig.add_subplot(2, 1, 1)
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax1)
    ax1.bar(x, size, color="0.6", label="stratum size")
    nz = size[size > 0]
    if nz.size and nz.max() / max(nz.min(), 1) > 100:
        ax1.set_yscale("log")
    ax1.set_ylabel("samples in stratum")
    ax1.set_title("Algorithm 2 strata (0 = lowest scores): size and samples taken")
    ax2.bar(x, taken, color="tab:orange", label="taken")
    ax2.set_ylabel("taken")
    ax2.set_xlabel("stratum (equal score-range width)")
    _save(fig, path)


def _decile_bins(pop: np.ndarray) -> list[np.ndarray]:
    """Items with >= 1 target, least popular first, in (up to) 10 equal-count bins.

    Bins by rank rather than by count thresholds, so long ties of count 1 do not
    leave bins empty; ties are ordered by item id.
    """
    items = np.flatnonzero(pop > 0)
    order = items[np.lexsort((items, pop[items]))]
    return [b for b in np.array_split(order, min(N_DECILES, order.size)) if b.size]


def _expected_random_coverage(counts: np.ndarray, n: int, b: int) -> np.ndarray:
    """P(item with c targets appears in a uniform b-of-n subset) = 1 - C(n-c, b) / C(n, b)."""
    from scipy.special import gammaln

    c = counts.astype(np.float64)
    out = np.ones_like(c)
    ok = n - c >= b
    cc = c[ok]
    log_ratio = (gammaln(n - cc + 1) - gammaln(n - cc - b + 1)) - (gammaln(n + 1) - gammaln(n - b + 1))
    out[ok] = 1.0 - np.exp(log_ratio)
    return out


def _coverage(pop: np.ndarray, targets: np.ndarray, sel_mask: np.ndarray) -> dict:
    bins = _decile_bins(pop)
    sub_targets = targets[sel_mask]
    sub_counts = np.bincount(sub_targets, minlength=pop.size)[: pop.size]
    n, b = targets.size, int(sel_mask.sum())
    rows = []
    for i, items in enumerate(bins):
        rows.append({
            "decile": i + 1,
            "items": int(items.size),
            "min_pop": int(pop[items].min()),
            "max_pop": int(pop[items].max()),
            "covered": float((sub_counts[items] > 0).mean()),
            "random_expected": float(_expected_random_coverage(pop[items], n, b).mean()),
            "share_full": float(pop[items].sum() / max(pop.sum(), 1)),
            "share_subset": float(sub_counts[items].sum() / max(sub_counts.sum(), 1)),
        })
    return {
        "rows": rows,
        "items_full": int((pop > 0).sum()),
        "items_subset": int((sub_counts > 0).sum()),
    }


def _plot_coverage(cov: dict, path: Path) -> None:
    rows = cov["rows"]
    x = np.arange(1, len(rows) + 1)
    fig = Figure(figsize=(10, 4))
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.bar(x, [r["covered"] for r in rows], color="tab:orange", label="selected subset")
    ax1.plot(x, [r["random_expected"] for r in rows], "k.--", label="uniform random, same size (expected)")
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("item popularity decile of the full set (1 = rarest)")
    ax1.set_ylabel("fraction of the decile's items covered")
    ax1.set_title("item coverage by the subset's targets\n(the full set covers 100% of every decile)")
    ax1.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    w = 0.4
    ax2.bar(x - w / 2, [r["share_full"] for r in rows], width=w, color="0.6", label="full set")
    ax2.bar(x + w / 2, [r["share_subset"] for r in rows], width=w, color="tab:orange", label="selected")
    ax2.set_xlabel("item popularity decile (1 = rarest)")
    shares = np.array([r["share_full"] for r in rows] + [r["share_subset"] for r in rows])
    pos = shares[shares > 0]
    if pos.size and pos.max() / pos.min() > 50:  # popularity is long-tailed: keep the rare deciles visible
        ax2.set_yscale("log")
    ax2.set_ylabel("share of targets")
    ax2.set_title("where the targets fall")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
    _save(fig, path)


def _table(header: list[str], rows: list[list[object]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_report(
    out_dir: str | Path,
    *,
    scores: pd.DataFrame | Mapping[str, object],
    selected: np.ndarray,
    stats: object = None,
    item_popularity_full: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    title: str = "DEALRec selection",
    config: Mapping[str, object] | None = None,
) -> Path:
    """Write ``<out_dir>/report/`` (PNGs + ``index.html``) describing one selection.

    Args:
        out_dir: folder to write ``report/`` under (created if absent).
        scores: one row per sample: ``sample_id`` (positions 0..n-1 when absent) and any of
            ``influence``, ``effort``, ``score``, ``group``; missing columns skip their plot.
        selected: sample_ids of the selected samples.
        stats: :class:`engine.selection.StrataStats` or a mapping with per-stratum ``size``
            and ``taken`` (optional ``budget``, ``order``, ``edges``, ``n_hard_pruned``,
            ``hard_prune_threshold``); None skips the strata plot unless ``scores`` has a
            ``group`` column to count from.
        item_popularity_full: target count per item id over all samples (index = item id).
        targets: target item id of each row of ``scores``; with ``item_popularity_full``
            enables the coverage plot.
        title: page title.
        config: the selection config (any JSON-able mapping), shown as a table.

    Returns:
        Path of the written ``index.html``.

    Raises:
        DataError: selected ids not in ``scores``, ``targets`` of the wrong length or
            item ids outside ``item_popularity_full``, or malformed ``stats``.
    """
    df = scores.copy() if isinstance(scores, pd.DataFrame) else pd.DataFrame(dict(scores))
    n = len(df)
    ids = df["sample_id"].to_numpy() if "sample_id" in df.columns else np.arange(n)
    sel_ids = np.asarray(selected).ravel()
    pos = pd.Index(ids).get_indexer(sel_ids) if n else np.full(sel_ids.size, -1)
    if (pos < 0).any():
        bad = sel_ids[pos < 0][:5].tolist()
        raise DataError(f"{int((pos < 0).sum())} selected id(s) are not sample_ids of scores", field="selected",
                        value=bad)
    sel_mask = np.zeros(n, dtype=bool)
    sel_mask[pos] = True

    rdir = Path(out_dir) / REPORT_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    sd = _stats_dict(stats)
    notes: list[str] = []
    images: list[tuple[str, str]] = []

    threshold = sd.get("hard_prune_threshold") if sd else None
    for col, label, fname in (*SCORE_TERMS, *(t for t in OPTIONAL_TERMS if t[0] in df.columns)):
        if col not in df.columns:
            notes.append(f"{label}: not plotted, scores has no '{col}' column (this method does not use it).")
            continue
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        fin = np.isfinite(v)
        if not fin.any():
            notes.append(f"{label}: not plotted, column '{col}' has no finite values.")
            continue
        if not fin.all():
            notes.append(f"{label}: {int((~fin).sum())} non-finite value(s) left out of the histogram.")
        _plot_hist(v[fin], v[fin & sel_mask], label, rdir / fname, threshold if col == "score" else None)
        images.append((fname, f"{label}: all samples vs the selected subset (densities)"))

    if sd is None and "group" in df.columns:
        g = pd.to_numeric(df["group"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        if (g >= 0).any():
            k = int(g.max()) + 1
            sd = {"size": np.bincount(g[g >= 0], minlength=k).tolist(),
                  "taken": np.bincount(g[(g >= 0) & sel_mask], minlength=k).tolist(),
                  "n_hard_pruned": None}
    strata_rows: list[list[object]] = []
    if sd is not None and len(sd["size"]):
        size, taken = np.asarray(sd["size"], dtype=np.int64), np.asarray(sd["taken"], dtype=np.int64)
        _plot_strata(size, taken, rdir / "strata.png")
        images.append(("strata.png", "Algorithm 2 strata: size vs samples taken"))
        edges = sd.get("edges")
        budget, order = sd.get("budget"), sd.get("order")
        for i in range(size.size):
            strata_rows.append([
                i,
                _fmt(float(edges[i])) if edges is not None else "",
                _fmt(float(edges[i + 1])) if edges is not None else "",
                int(size[i]),
                int(budget[i]) if budget is not None else "",
                int(taken[i]),
                int(order[i]) if order is not None else "",
            ])
    else:
        notes.append("strata: not plotted, this selection has no strata (e.g. random, top-k methods).")

    cov = None
    if item_popularity_full is None or targets is None:
        notes.append("item coverage: not plotted, item_popularity_full and targets are both needed.")
    else:
        pop = np.asarray(item_popularity_full).ravel().astype(np.int64)
        tg = np.asarray(targets).ravel()
        if tg.size != n:
            raise DataError(f"targets has {tg.size} entries for {n} score rows; give one target per row",
                            field="targets")
        tg = tg.astype(np.int64)
        if tg.size and (tg.min() < 0 or tg.max() >= pop.size):
            raise DataError(f"target item ids must be in [0, {pop.size}) to index item_popularity_full",
                            field="targets", value=[int(tg.min()), int(tg.max())])
        if (pop > 0).any():
            cov = _coverage(pop, tg, sel_mask)
            _plot_coverage(cov, rdir / "coverage.png")
            images.append(("coverage.png", "item-popularity coverage of the subset vs the full set"))
        else:
            notes.append("item coverage: not plotted, item_popularity_full is all zero.")

    n_sel = int(sel_mask.sum())
    counts: list[list[object]] = [
        ["samples (n)", f"{n:,}"],
        ["selected", f"{n_sel:,} ({n_sel / n:.2%})" if n else "0"],
    ]
    if sd is not None:
        if sd.get("n_hard_pruned") is not None:
            counts.append(["hard-pruned before stratifying", f"{int(sd['n_hard_pruned']):,}"])
        size = np.asarray(sd["size"])
        counts.append(["strata (non-empty / K)", f"{int((size > 0).sum())} / {size.size}"])
    if cov is not None:
        counts.append(["items with >= 1 target (full set)", f"{cov['items_full']:,}"])
        counts.append(["items covered by the subset's targets",
                       f"{cov['items_subset']:,} ({cov['items_subset'] / cov['items_full']:.2%})"])

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}"
        ".note{color:#8a5a00}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Counts</h2>",
        _table(["", "value"], counts),
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{html.escape(m)}</li>" for m in notes)
                     + "</ul>")
    parts.append("<h2>Plots</h2>")
    for fname, caption in images:
        parts.append(f"<figure><img src='{html.escape(fname)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if cov is not None:
        parts.append("<h2>Coverage by popularity decile</h2>")
        parts.append(_table(
            ["decile", "items", "targets per item", "covered", "uniform random (expected)",
             "share of targets: full", "share of targets: subset"],
            [[r["decile"], r["items"], f"{r['min_pop']}-{r['max_pop']}", f"{r['covered']:.1%}",
              f"{r['random_expected']:.1%}", f"{r['share_full']:.1%}", f"{r['share_subset']:.1%}"]
             for r in cov["rows"]]))
    if strata_rows:
        parts.append("<h2>Strata</h2>")
        parts.append(_table(["stratum", "from", "to", "size", "budget when visited", "taken", "visit order"],
                            strata_rows))
    if config:
        parts.append("<h2>Config</h2>")
        parts.append(_table(["field", "value"],
                            [[k, json.dumps(v, default=str)] for k, v in dict(config).items()]))
    parts.append("</body></html>")
    index = rdir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
