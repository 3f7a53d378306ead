"""Comparison tables of selection methods: per-user metrics of fine-tuned runs -> rows with the
mean over seeds, the paired per-user bootstrap against a reference, and DEALRec's component table.

Input is a mapping ``method -> MethodRuns`` (the seeds run for that method, a ``[seeds, users]``
matrix per metric, one record per seed and the user ids); every method must have been evaluated
on the same users in the same order (checked). This module knows nothing of how runs are stored:
the selection-quality benchmark gathers them from its result files, a user from anywhere.

* :func:`method_rows`: per method, mean +- std over seeds of each metric and, against the
  reference (random by default), :func:`engine.bootstrap.seed_pooled` (users resampled jointly
  across the common seeds): relative change, 95% CI, two-sided p. A single-seed row (zero-shot)
  is compared with every reference seed.
* :func:`component_rows`: DEALRec against each ablation present (:data:`ABLATIONS`: greedy tests
  the strata, influence-only the effort term, effort-only the influence term, dealrec-align the
  inverse Hessian, full-data the selection itself), paired over the common seeds.
* :func:`markdown_rows`, :func:`markdown_components`, :func:`csv_rows`, :func:`plot_rows`: the
  table as Markdown, CSV rows and a bar chart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.bootstrap import seed_pooled
from engine.errors import DealrecError

__all__ = ["MethodRuns", "finetune_record", "load_runs", "ABLATIONS", "REFERENCE", "ALIGN", "VALID_TARGET", "LLM_INFLUENCE", "FULL_DATA", "ZERO_SHOT",
           "method_rows",
           "component_rows", "markdown_rows", "markdown_components", "csv_rows", "plot_rows"]

REFERENCE = "random"
ALIGN = "dealrec-align"
VALID_TARGET, LLM_INFLUENCE = "dealrec-valid", "dealrec-llm"
ZERO_SHOT, FULL_DATA = "zero-shot", "full-data"

#: which part of DEALRec each row removes (full-data: the selection itself): dealrec vs that row, paired
ABLATIONS = (("greedy", "strata (Algorithm 2) vs top-k of the same score"),
             ("influence-only", "the effort term"),
             ("effort-only", "the influence term"),
             (ALIGN, "the inverse Hessian (iHVP influence vs plain gradient alignment)"),
             (FULL_DATA, "the selection itself: the subset vs every candidate (the paper's '2% beats full')"))


@dataclass
class MethodRuns:
    """The finished runs of one method on one split.

    Attributes:
        seeds: the seeds, in the row order of every matrix.
        per_user: metric name -> ``[len(seeds), users]`` per-user values.
        records: one dict per seed (``n_train``, ``train_seconds``, ``optimizer_steps`` are read).
        user_ids: the evaluated users, in column order.
    """

    seeds: list[int]
    per_user: dict[str, np.ndarray]
    records: list[dict] = field(default_factory=list)
    user_ids: np.ndarray | None = None


def finetune_record(run: str | Path) -> dict:
    """The ``finetune.json`` report of a benchmark run folder ({} before its fine-tune finished)."""
    f = Path(run) / "finetune.json"
    return json.loads(f.read_text()) if f.exists() else {}


def load_runs(runs_dir: str | Path, seeds_of: Mapping[str, Sequence[int]], split: str) -> dict[str, MethodRuns]:
    """Per method, the per-user metrics of every finished seed of a benchmark's run folders.

    ``runs_dir/METHOD__seedS/`` holds ``metrics-SPLIT.per_user.npz`` (what ``dealrec evaluate``
    writes: ``user_ids`` and one array per ``metric@K``) and ``finetune.json`` (its ``n_train``,
    ``train_seconds``, ``optimizer_steps``; a run that trained no epoch counts 0 samples). A
    missing seed is skipped (a partial table); seeds evaluated on other users are an error.
    """
    runs = {}
    for name, seeds in seeds_of.items():
        done, mats, recs, uids = [], {}, [], None
        for s in seeds:
            run = Path(runs_dir) / f"{name}__seed{s}"
            f = run / f"metrics-{split}.per_user.npz"
            if not f.exists():
                continue
            with np.load(f) as z:
                if uids is None:
                    uids = z["user_ids"]
                elif not np.array_equal(uids, z["user_ids"]):
                    raise DealrecError(f"{name} seed {s} was evaluated on other users than seed {done[0]}")
                for k in z.files:
                    if "@" in k:
                        mats.setdefault(k, []).append(z[k])
            rec = finetune_record(run)
            recs.append({"n_train": rec.get("n_train", 0) if rec.get("epochs_done") else 0,
                         "train_seconds": rec.get("train_seconds", 0.0), "optimizer_steps": rec.get("optimizer_steps", 0)})
            done.append(s)
        runs[name] = MethodRuns(seeds=done, per_user={k: np.stack(v) for k, v in mats.items()}, records=recs,
                                user_ids=uids)
    return runs


def _rows_of(runs: MethodRuns, seeds: Sequence[int], metric: str) -> np.ndarray:
    return runs.per_user[metric][[runs.seeds.index(s) for s in seeds]]


def _check_users(name: str, runs: MethodRuns, ref_name: str, ref: MethodRuns | None) -> None:
    if ref is not None and ref.user_ids is not None and runs.user_ids is not None \
            and not np.array_equal(runs.user_ids, ref.user_ids):
        raise DealrecError(f"{name} was evaluated on other users than {ref_name}")


def method_rows(runs: Mapping[str, MethodRuns], metrics: Sequence[str], *, reference: str = REFERENCE,
                n_boot: int = 2000, single_seed: Sequence[str] = (ZERO_SHOT,)) -> list[dict]:
    """One row per method with runs, in ``runs`` order.

    Args:
        runs: method -> its runs (methods without seeds are skipped).
        metrics: the metrics of each row.
        reference: the method every other row is compared with.
        n_boot: bootstrap resamples.
        single_seed: methods run once and compared with every reference seed.

    Returns:
        ``[{"method", "seeds", "n_train", "train_s", "steps", "stats": {metric: {"mean", "std",
        + seed_pooled's fields vs the reference}}}]``.

    Raises:
        DealrecError: a method evaluated on other users than the reference.
    """
    ref = runs.get(reference)
    ref = ref if ref is not None and ref.seeds else None
    rows = []
    for name, r in runs.items():
        if not r.seeds:
            continue
        _check_users(name, r, reference, ref)
        recs = r.records or [{}]
        row = {"method": name, "seeds": len(r.seeds),
               "n_train": int(np.mean([x.get("n_train", 0) for x in recs])),
               "train_s": float(np.mean([x.get("train_seconds", 0.0) for x in recs])),
               "steps": float(np.mean([x.get("optimizer_steps", 0) for x in recs])), "stats": {}}
        for metric in metrics:
            per_seed = r.per_user[metric].mean(1)
            st = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0}
            if name != reference and ref is not None:
                if name in single_seed:  # one run, compared with every reference seed
                    a, b = ref.per_user[metric], np.repeat(r.per_user[metric][:1], len(ref.seeds), 0)
                else:
                    common = [s for s in r.seeds if s in ref.seeds]
                    a, b = _rows_of(ref, common, metric), _rows_of(r, common, metric)
                if len(a):
                    st.update(seed_pooled(a, b, n_boot=n_boot, seed=0))
            row["stats"][metric] = st
        rows.append(row)
    return rows


def component_rows(runs: Mapping[str, MethodRuns], metrics: Sequence[str], *, target: str = "dealrec",
                   ablations: Sequence[tuple[str, str]] = ABLATIONS, n_boot: int = 2000) -> list[dict]:
    """``target`` against each ablation present (same seeds, same users): the relative change of
    the target's mean over the ablation's, with the paired per-user bootstrap CI and p.

    Returns:
        ``[{"ablation", "component", "seeds", "stats": {metric: seed_pooled(...)}}]``.
    """
    d = runs.get(target)
    if d is None or not d.seeds:
        return []
    rows = []
    for name, what in ablations:
        r = runs.get(name)
        if r is None or not r.seeds:
            continue
        _check_users(name, r, target, d)
        common = [s for s in r.seeds if s in d.seeds]
        if not common:
            continue
        st = {m: seed_pooled(_rows_of(r, common, m), _rows_of(d, common, m), n_boot=n_boot, seed=0) for m in metrics}
        rows.append({"ablation": name, "component": what, "seeds": len(common), "stats": st})
    return rows


def _delta(st: dict) -> str:
    return (f"{100 * st['rel_diff']:+.1f}% [{100 * st['ci_low']:+.1f}, {100 * st['ci_high']:+.1f}] "
            f"(p={st['p_value']:.3f})")


def markdown_rows(rows: Sequence[dict], metrics: Sequence[str], *, reference: str = REFERENCE) -> list[str]:
    """The method table as Markdown lines."""
    md = ["| method | seeds | train samples | train s | " + " | ".join(metrics) + " | "
          + " | ".join(f"Δ {m} [95% CI] (p)" for m in metrics) + " |", "|" + "---|" * (4 + 2 * len(metrics))]
    for row in rows:
        cells = [row["method"], str(row["seeds"]), str(row["n_train"]), f"{row['train_s']:.0f}"]
        cells += [f"{row['stats'][m]['mean']:.4f} ± {row['stats'][m]['std']:.4f}" for m in metrics]
        for m in metrics:
            st = row["stats"][m]
            if "rel_diff" in st and not math.isnan(st["rel_diff"]):
                cells.append(_delta(st))
            else:
                cells.append("ref" if row["method"] == reference else "–")
        md.append("| " + " | ".join(cells) + " |")
    return md


def markdown_components(rows: Sequence[dict], metrics: Sequence[str], *, target: str = "dealrec") -> list[str]:
    """The component table as Markdown lines (none when there are no rows)."""
    if not rows:
        return []
    md = ["", f"Components: {target} against each ablation (Δ = {target}'s mean relative to the ablation's, "
          "paired per-user bootstrap CI over the common seeds; > 0: the component helps, or for "
          f"{FULL_DATA}: the subset beats the full data).", "",
          f"| {target} vs | component tested | seeds | " + " | ".join(f"Δ {m} [95% CI] (p)" for m in metrics) + " |",
          "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        md.append(f"| {r['ablation']} | {r['component']} | {r['seeds']} | "
                  + " | ".join(_delta(r["stats"][m]) for m in metrics) + " |")
    return md


def csv_rows(rows_by_split: Mapping[str, Sequence[dict]], metrics: Sequence[str]) -> list[dict]:
    """Flat rows (split, method, metric, mean, std, rel. diff vs the reference, CI, p, users)."""
    out = []
    for split, rows in rows_by_split.items():
        for row in rows:
            for m in sorted(set(metrics)):
                st = row["stats"][m]
                out.append({"split": split, "method": row["method"], "seeds": row["seeds"],
                            "n_train": row["n_train"], "train_seconds": round(row["train_s"], 2), "metric": m,
                            "mean": st["mean"], "std": st["std"], "rel_diff_vs_random": st.get("rel_diff"),
                            "ci_low": st.get("ci_low"), "ci_high": st.get("ci_high"),
                            "p_value": st.get("p_value"), "users": st.get("users")})
    return out


def plot_rows(rows: Sequence[dict], metric: str, path: str | Path, *, title: str,
              reference: str = REFERENCE, target: str = "dealrec") -> None:
    """Bar chart of each method's relative change vs the reference with its 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in rows if r["method"] != reference and "rel_diff" in r["stats"][metric]
             and not math.isnan(r["stats"][metric]["rel_diff"])]
    fig = Figure(figsize=(1.2 + 0.8 * max(1, len(shown)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if shown:
        y = [100 * r["stats"][metric]["rel_diff"] for r in shown]
        lo = [y[i] - 100 * r["stats"][metric]["ci_low"] for i, r in enumerate(shown)]
        hi = [100 * r["stats"][metric]["ci_high"] - y[i] for i, r in enumerate(shown)]
        colors = ["tab:red" if r["method"] == target else "tab:gray" if r["method"] in (FULL_DATA, ZERO_SHOT)
                  else "tab:blue" for r in shown]
        ax.bar(range(len(shown)), y, yerr=[lo, hi], color=colors, capsize=4)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([r["method"] for r in shown], rotation=40, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(f"{metric}: % change vs {reference} (95% CI)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
