"""Ray Tune over DEALRec's lambda and K for the text-encoder recommender (validation NDCG@20).

The grid lambda x K is searched on FIXED scores: influence (the surrogate's, from a prune
run) and effort (this backend's per-sample LoRA gradient norm, e.g. the selection-quality
benchmark's ``effort.parquet``); nothing is rescored. Each Ray Tune trial selects the
dealrec subset for its (lambda, K), fine-tunes the encoder on it in process
(:func:`jobs.finetune_textrec.fit`, strategy ``local``: the trials are the parallelism, as in
``jobs/tune.py``) and reports NDCG@20 / Recall@20 on the validation period (all validation
users, or a seeded subset that is the same for every trial). The test period is not looked at.

Outputs in ``out``: ``trials/lam<L>_K<K>/`` (each trial's fine-tune folder: reused when the
search is resumed), ``tune/`` (the Ray Tune experiment) and ``tune.json`` (every trial and
the best one, with the config fingerprint; a finished search with the same fingerprint is
returned without running anything).

Used by ``benchmarks/selection_quality.py --tune-lam ... --tune-groups ...``, whose dealrec
rows then use the best (lambda, K).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.config import stable_hash, versions
from engine.errors import ConfigError, DataError, check
from engine.rundir import atomic_write_bytes
from engine.selection import SelectionConfig

TUNE_FILE = "tune.json"
TRIALS_DIR = "trials"
METRICS = ("ndcg@20", "recall@20")


@dataclass
class TextTuneConfig:
    """Grid search of (lambda, K) for one data set and budget (validated as a whole)."""

    data: str = field(metadata={"help": "prepared data folder"})
    out: str = field(metadata={"help": "output folder (resumable)"})
    budget: int | None = field(default=None, metadata={"help": "samples per subset"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of the candidates per subset"})
    lams: tuple[float, ...] = field(default=(0.1, 0.3, 0.5, 1.0, 2.0), metadata={"help": "lambda grid"})
    groups: tuple[int, ...] = field(default=(25, 50, 75), metadata={"help": "K grid"})
    hard_prune: float = 0.1
    seed: int = field(default=0, metadata={"help": "selection and fine-tune seed of every trial"})
    textrec: dict = field(default_factory=dict, metadata={"help": "TextRecConfig fields of the fine-tune"})
    val_users: int | None = field(default=None, metadata={"help": "seeded subset of validation users (None: all)"})
    metric: str = "ndcg@20"
    max_concurrent: int = 2
    trial_cpus: float = 1.0

    def __post_init__(self) -> None:
        self.lams, self.groups = tuple(float(x) for x in self.lams), tuple(self.groups)
        p: list[str] = []
        check(p, len(self.lams) >= 1 and all(math.isfinite(x) and x >= 0 for x in self.lams),
              f"lams={list(self.lams)}: give one or more finite values >= 0")
        check(p, len(self.groups) >= 1 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                for k in self.groups),
              f"groups={list(self.groups)}: give one or more integers >= 1")
        check(p, len(set(self.lams)) == len(self.lams) and len(set(self.groups)) == len(self.groups),
              "lams and groups must not repeat a value")
        check(p, (self.budget is None) != (self.ratio is None),
              f"give exactly one of budget ({self.budget!r}) or ratio ({self.ratio!r})")
        check(p, self.metric in METRICS, f"metric={self.metric!r}: one of {METRICS}")
        check(p, self.val_users is None or self.val_users >= 1, f"val_users={self.val_users!r}: None or >= 1")
        check(p, self.max_concurrent >= 1 and self.trial_cpus > 0,
              f"max_concurrent={self.max_concurrent} must be >= 1 and trial_cpus={self.trial_cpus} > 0")
        if p:
            raise ConfigError(p, config="text-encoder tune")

    def selection(self, lam: float, groups: int) -> SelectionConfig:
        return SelectionConfig(method="dealrec", budget=self.budget, ratio=self.ratio, lam=lam, groups=groups,
                               hard_prune=self.hard_prune, seed=self.seed)

    def fingerprint(self, ids: np.ndarray, scores: dict[str, np.ndarray]) -> str:
        d = asdict(self)
        for k in ("out", "max_concurrent", "trial_cpus"):
            d.pop(k)
        d["ids"] = stable_hash(np.asarray(ids).tolist())
        d["scores"] = {k: stable_hash(np.round(np.asarray(scores[k], dtype=np.float64), 12).tolist())
                       for k in ("influence", "effort")}
        return stable_hash(d)


def _trial_dir(out: Path, lam: float, groups: int) -> Path:
    return out / TRIALS_DIR / f"lam{lam:g}_K{groups}"


def trial(config: dict, shared: dict) -> None:
    """One trial: select with (lambda, K), fine-tune in process, report validation metrics."""
    import torch
    from ray import tune

    from engine.selection import select
    from jobs.finetune_textrec import TextFinetuneConfig, fit

    cfg = TextTuneConfig(**shared["cfg"])
    torch.set_num_threads(max(1, int(cfg.trial_cpus)))
    lam, groups = float(config["lam"]), int(config["groups"])
    ids = shared["ids"]
    res = select("dealrec", shared["scores"], cfg.selection(lam, groups), n=len(ids))
    ft = TextFinetuneConfig(
        data=cfg.data, out=str(_trial_dir(Path(cfg.out), lam, groups)),
        sample_ids=[int(i) for i in ids[res.indices]], textrec=dict(cfg.textrec, seed=cfg.seed), strategy="local",
        split="valid", max_eval_users=cfg.val_users, eval_seed=0, ks=(20,))
    out = fit(ft, overwrite=True, log=None)
    m = out["metrics"]
    tune.report({"ndcg@20": float(m["ndcg@20"]), "recall@20": float(m["recall@20"]), "users": int(m["users"]),
                 "n_selected": len(res.indices), "train_seconds": float(out["train"]["train_seconds"])})


def tune_lambda_k(cfg: TextTuneConfig, ids: np.ndarray, scores: dict[str, np.ndarray], *, log=print) -> dict:
    """Grid search over ``cfg.lams`` x ``cfg.groups`` (Ray must be initialised or initialisable).

    Args:
        cfg: the search.
        ids: candidate sample ids (the selection picks among them).
        scores: ``influence`` and ``effort`` aligned with ``ids``.
        log: progress lines.

    Returns:
        the content of ``tune.json``: ``best`` ({lam, groups, metric, value}), ``trials`` (one row each).

    Raises:
        ConfigError: a (lambda, K, budget) that the selection refuses, or missing scores.
        DataError: every trial failed.
    """
    import ray
    from ray import tune

    p: list[str] = []
    for k in ("influence", "effort"):
        check(p, k in scores and len(scores[k]) == len(ids), f"scores[{k!r}] must be given, one per candidate")
    for g in cfg.groups:  # every (budget, K) problem before any trial runs
        try:
            cfg.selection(cfg.lams[0], g).validate(len(ids))
        except ConfigError as e:
            p.extend(x for x in e.problems if x not in p)
    if p:
        raise ConfigError(p, config="text-encoder tune")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint(ids, scores)
    f = out / TUNE_FILE
    if f.exists():
        prev = json.loads(f.read_text())
        if prev.get("fingerprint") == fp:
            b = prev["best"]
            log(f"[tune] done before ({len(prev['trials'])} trials): best lam={b['lam']:g} K={b['groups']} "
                f"{b['metric']}={b['value']:.4f}")
            return prev
    n_trials = len(cfg.lams) * len(cfg.groups)
    log(f"[tune] grid lam {list(cfg.lams)} x K {list(cfg.groups)} = {n_trials} trials on validation "
        f"{cfg.metric} ({cfg.val_users or 'all'} users), {cfg.max_concurrent} at a time")
    from jobs.ray_init import init_ray

    init_ray(runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                       "HF_HUB_OFFLINE": "1"}})
    t0 = time.perf_counter()
    shared = {"cfg": asdict(cfg), "ids": np.asarray(ids), "scores": {k: np.asarray(scores[k]) for k in
                                                                       ("influence", "effort")}}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, shared=shared), {"cpu": cfg.trial_cpus}),
        param_space={"lam": tune.grid_search(list(cfg.lams)), "groups": tune.grid_search(list(cfg.groups))},
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(name="tune", failure_config=tune.FailureConfig(max_failures=2), storage_path=str(out.resolve()), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for r in grid:
        m, c = r.metrics or {}, r.config or {}
        rows.append({"lam": float(c.get("lam")), "groups": int(c.get("groups")),
                     **{k: m.get(k) for k in (*METRICS, "users", "n_selected", "train_seconds")},
                     "error": str(r.error) if r.error else None})
    rows.sort(key=lambda r: (r["lam"], r["groups"]))
    ok = [r for r in rows if r["error"] is None and r[cfg.metric] is not None]
    if not ok:
        raise DataError(f"every trial failed; see {out / 'tune'}: {rows[0]['error'] if rows else 'no trials'}",
                        field="trials")
    # ties (equal metric) go to the smaller lambda, then the smaller K: a stable, documented choice
    b = max(ok, key=lambda r: (r[cfg.metric], -r["lam"], -r["groups"]))
    for r in rows:
        log(f"[tune] lam={r['lam']:g} K={r['groups']}: " + (f"error {r['error']}" if r["error"] else
            f"{cfg.metric} {r[cfg.metric]:.4f}  recall@20 {r['recall@20']:.4f} on {r['users']} users"))
    res = {"fingerprint": fp, "config": asdict(cfg), "trials": rows, "wall_s": time.perf_counter() - t0,
           "best": {"lam": b["lam"], "groups": b["groups"], "metric": cfg.metric, "value": b[cfg.metric]},
           "versions": versions()}
    atomic_write_bytes(f, json.dumps(res, indent=2, default=str).encode())
    log(f"[tune] best lam={b['lam']:g} K={b['groups']} ({cfg.metric} {b[cfg.metric]:.4f}), "
        f"{res['wall_s'] / 60:.1f} min -> {f}")
    return res
