"""The prune job's daily side (#21 item 2): ``--update RUN0`` and the effort score cache.

``dealrec prune --update RUN0 --data NEW --out RUN1`` prunes today's data folder NEW starting
from yesterday's run folder RUN0 (a finished prune of the same catalogue):

* **samples** are told apart by content (:mod:`engine.samplekey`, :func:`engine.daily.diff_days`
  against RUN0's ``sample_keys.parquet``): *unchanged* (same user, history and target as a sample
  of RUN0), *changed* (a user of RUN0 with a new target / longer history) or *new* (a user
  without a sample in RUN0);
* **surrogate**: RUN0's checkpoint, trained ``ceil(--update-epochs * U / batch)`` more steps on
  U = every new and changed sample plus a seeded replay of ``--update-replay`` x as many
  unchanged ones (the optimizer starts afresh); on the driver whatever ``--surrogate-train`` says;
* **iHVP**: g_bar streamed over NEW as usual, CG started from RUN0's v (``x0``). The manifest
  records the warm iterations and residual, and as the cold reference RUN0's own iteration
  count, or with ``--update-cold-check`` a cold solve on the same operator;
* **influence**: recomputed for every sample (``--update-influence all``, the default: the
  surrogate and v changed, so every score changes), or (``changed``) with the surrogate and v
  frozen at RUN0's: only new and changed samples are scored, unchanged ones reuse RUN0's
  influence by key, rescaled by n0/n (influence = grad L_s . v / n). The sampled loss draws its
  negatives by sample_id, a row number: a reused score keeps RUN0's draw;
* **effort**: only for samples whose key is missing from the score cache (below);
* selection and report as usual. ``manifest.json`` holds ``update``: the counts (samples new /
  changed / unchanged / removed, warm-start steps, CG iterations warm vs cold, effort cache hits /
  misses) and why each part was reused or recomputed.

Refused before anything is written (a ConfigError naming the field, exit 2): a RUN0 that is not
a finished prune, of another catalogue (``catalogue``: items.parquet's fingerprint), or whose
surrogate has another architecture (``surrogate.model`` / ``hidden`` / ``n_blocks`` / ``n_heads``
/ ``max_len`` / ``n_items``); ``--out`` equal to RUN0.

**The score cache** (:class:`engine.score_cache.ScoreCache`, every prune, not only updates):
effort is taken at the fixed pretrained LLM, so it is a pure function of (sample content,
LLM-side config). Each prune looks every sample's key up under the config key of
:func:`engine.daily.effort_cache_config` (backend, LLM / encoder with a sha256 of its weights
folder, LoRA, adapter, prompt, catalogue, CPU/GPU): hits are reused bit for bit, misses are
scored by the actor pool and added. A changed LLM or prompt config is another key (another
folder): nothing is reused, nothing is overwritten. ``--score-cache DIR`` (default: the folder
``score-cache`` beside ``--out``, i.e. ``OUT/../score-cache``, shared by the runs of one parent
folder; with ``--update``, the cache RUN0 used; ``off``: no cache). The text encoder's fixed
negatives are seeded by the sample key, not by the row (:mod:`actors.content_effort`), so that
its effort is a function of content too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.daily import (
    ARCHITECTURE_FIELDS, SAMPLE_KEYS_FILE, STATUS, KeyIndex, UpdateConfig, architecture_problems, diff_days,
    effort_cache_config, file_keys, read_sample_keys, update_rows, update_steps, write_sample_keys,
)
from engine.data.schema import SAMPLES_SCHEMA, read_parquet_checked, sample_files, take_rows
from engine.errors import ConfigError, DataError
from engine.rundir import MANIFEST, atomic_write_bytes, atomic_write_with, read_json, writable_problem

CACHE_NAME = "score-cache"
OFF = ("off", "none")


# ---- command line ------------------------------------------------------------------------
def add_update_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("daily update + effort score cache")
    g.add_argument("--update", default=None, metavar="RUN0",
                   help="update yesterday's prune RUN0 with today's --data: warm-start its surrogate, start CG from "
                        "its v, and score effort only for samples missing from the score cache (same catalogue and "
                        "surrogate architecture as RUN0; refused otherwise)")
    g.add_argument("--score-cache", default=None, metavar="DIR|off",
                   help="effort score cache shared by runs, keyed by sample content and LLM/prompt config "
                        f"(default: {CACHE_NAME}/ beside --out; with --update, the cache RUN0 used; 'off': none)")
    u = UpdateConfig.__dataclass_fields__
    g.add_argument("--update-epochs", type=float, default=u["epochs"].default, help=u["epochs"].metadata["help"])
    g.add_argument("--update-replay", type=float, default=u["replay"].default, help=u["replay"].metadata["help"])
    g.add_argument("--update-influence", default=u["influence"].default, choices=("all", "changed"),
                   help=u["influence"].metadata["help"])
    g.add_argument("--update-cold-check", action="store_true", help=u["cold_check"].metadata["help"])


def update_config_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(``update``, ``score_cache``, ``update_cfg`` fields of PruneJobConfig, problems)."""
    problems: list[str] = []
    out = Path(args.out).resolve()
    update = getattr(args, "update", None)
    run0 = None
    try:
        ucfg = UpdateConfig(epochs=getattr(args, "update_epochs", 1.0), replay=getattr(args, "update_replay", 1.0),
                            influence=getattr(args, "update_influence", "all"),
                            cold_check=bool(getattr(args, "update_cold_check", False)))
    except ConfigError as e:
        problems += [f"update: {p}" for p in e.problems]
        ucfg = UpdateConfig()
    if update is not None:
        run0 = Path(update).resolve()
        if not (run0 / MANIFEST).is_file():
            problems.append(f"update: {str(run0)!r} is not a prune run folder (no {MANIFEST}); --update takes the "
                            "--out folder of an earlier `dealrec prune`")
            run0 = None
        elif run0 == out:
            problems.append(f"update: --update and --out are the same folder {str(out)!r}; write the update into "
                            "a new --out (RUN0 is read, never changed)")
    cache = getattr(args, "score_cache", None)
    if cache is not None and cache.lower() in OFF:
        cache_dir = None
    elif cache is not None:
        cache_dir = str(Path(cache).resolve())
    else:
        cache_dir = str(out.parent / CACHE_NAME)
        if run0 is not None:
            try:
                rec = read_json(run0 / MANIFEST).get("score_cache") or {}
            except DataError:
                rec = {}
            cache_dir = rec.get("dir") or str(run0.parent / CACHE_NAME)
    if cache_dir is not None:
        why = writable_problem(cache_dir, option="--score-cache")
        if why:
            problems.append(why + " (or --score-cache off)")
    return {"update": None if run0 is None else str(run0), "score_cache": cache_dir, "update_cfg": ucfg}, problems


# ---- RUN0 -------------------------------------------------------------------------------
@dataclass
class Run0:
    root: Path
    manifest: dict
    keys: dict[str, np.ndarray]
    n: int
    catalogue: str | None
    surrogate: dict | None = None  # RUN0/surrogate/config.json

    @property
    def ihvp(self) -> dict:
        return self.manifest.get("stages", {}).get("ihvp", {})

    def fingerprint(self) -> dict:
        st = self.manifest.get("stages", {})
        return {"run0": str(self.root), **{s: [st.get(s, {}).get("config_hash"), st.get(s, {}).get("finished_at")]
                                           for s in ("surrogate", "ihvp", "surrogate_scores")}}


def open_run0(path: str, cfg, *, catalogue: str, n_items: int, need_sur: bool) -> Run0:
    """RUN0 read and checked against this run (``cfg``: PruneJobConfig).

    Raises:
        ConfigError: RUN0 cannot be updated (every problem, each naming its field).
    """
    root = Path(path)
    where = f"RUN0 {str(root)!r}"
    man = read_json(root / MANIFEST, hint="; --update takes the --out folder of a finished `dealrec prune`")
    problems: list[str] = []
    if man.get("job") != "prune":
        raise ConfigError([f"job: {where} is a {man.get('job')!r} run, not a prune"], config="prune --update")
    st = man.get("stages", {})
    data0 = (man.get("config") or {}).get("data")
    cat0 = man.get("catalogue")
    if cat0 is None and data0 and (Path(data0) / "items.parquet").exists():  # a run from before the record
        from engine.score_cache import catalogue_key

        cat0 = catalogue_key(data0)
    if cat0 is None:
        problems.append(f"catalogue: {where} records no catalogue fingerprint and its data folder {data0!r} is gone")
    elif cat0 != catalogue:
        problems.append(f"catalogue: {where} was pruned on another catalogue (items.parquet fingerprint {cat0} != "
                        f"{catalogue} of --data): sample keys and the surrogate's item ids are not comparable; "
                        "prune afresh without --update")
    sur0 = None
    if need_sur:
        for s in ("surrogate", "ihvp") + (("surrogate_scores", "select") if cfg.update_cfg.influence == "changed"
                                          else ()):
            if not st.get(s, {}).get("done"):
                problems.append(f"stages.{s}: {where} has not finished its {s} stage; finish it (rerun that prune) "
                                "or prune afresh without --update")
        sp = root / "surrogate" / "config.json"
        if sp.is_file():
            sur0 = read_json(sp)
            problems += architecture_problems(sur0.get("config", {}), cfg.surrogate.to_dict(),
                                              old_items=int(sur0.get("n_items", -1)), new_items=n_items, where=where)
        elif st.get("surrogate", {}).get("done"):
            problems.append(f"surrogate: {where} has no surrogate/config.json")
        if cfg.update_cfg.influence == "changed":
            if (root / "scores.parquet").exists():
                have = pq.read_schema(root / "scores.parquet").names
                miss = [c for c in cfg.surrogate_columns if c not in have]
                if miss:
                    problems.append(f"scores: {where}'s scores.parquet has no {miss} column(s), which "
                                    "--update-influence changed would reuse; use --update-influence all")
            else:
                problems.append(f"scores: {where} has no scores.parquet (--update-influence changed reuses it)")
    if problems:
        raise ConfigError(problems, config="prune --update")
    kp = root / SAMPLE_KEYS_FILE
    if kp.exists():
        keys = read_sample_keys(kp)
    elif data0 and Path(data0).exists():  # a run from before sample_keys.parquet: its data folder
        parts = [file_keys(read_parquet_checked(f, SAMPLES_SCHEMA)) for f in sample_files(data0)]
        keys = {k: np.concatenate([p[k] for p in parts]) for k in ("sample_id", "user_hash", "key")}
    else:
        raise ConfigError([f"sample_keys: {where} has no {SAMPLE_KEYS_FILE} and its data folder {data0!r} is gone: "
                           "nothing tells its samples apart; prune afresh without --update"], config="prune --update")
    return Run0(root=root, manifest=man, keys=keys, n=int(keys["sample_id"].size), catalogue=cat0, surrogate=sur0)


# ---- the day --------------------------------------------------------------------------------
@dataclass
class Day:
    """What the prune job needs to know about today's samples: keys per file, the score cache,
    RUN0 and the diff against it (built by :func:`prepare_day` before anything is written)."""

    cfg: Any
    files: list[Path]
    parts: list[dict[str, np.ndarray]]  # file_keys per file
    catalogue: str
    cache_dir: str | None
    run0: Run0 | None = None
    status: list[np.ndarray] = field(default_factory=list)  # per file, STATUS codes (update only)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(sum(len(p["sample_id"]) for p in self.parts))

    @property
    def frozen(self) -> bool:
        return self.run0 is not None and self.cfg.update_cfg.influence == "changed"

    def counts(self) -> dict[str, int] | None:
        if self.run0 is None:
            return None
        c = {name: int(sum(int((s == code).sum()) for s in self.status)) for name, code in STATUS.items()}
        c["total"] = self.n
        c["removed"] = self.info["removed"]
        c["run0_samples"] = self.run0.n
        return c

    # ---- manifest ----------------------------------------------------------------------
    def record(self, run) -> None:
        """Write RUN/sample_keys.parquet and the day's records into the manifest."""
        write_sample_keys(run.path(SAMPLE_KEYS_FILE), self.parts)
        fields: dict[str, Any] = {"catalogue": self.catalogue, "sample_keys": SAMPLE_KEYS_FILE,
                                  "score_cache": {"dir": self.cache_dir}}
        if self.run0 is not None:  # (a resumed run keeps what its stages noted)
            up = dict(run.manifest.get("update") or {})
            up.update(run0=str(self.run0.root), samples=self.counts(), config=dataclasses.asdict(self.cfg.update_cfg))
            fields["update"] = up
        run.set(**fields)

    def note(self, run, stage: str, **info: Any) -> None:
        """Record what the update did in ``stage`` (reused / recomputed, and why) in manifest.update.stages."""
        if self.run0 is None:
            return
        up = run.manifest.setdefault("update", {})
        up.setdefault("stages", {})[stage] = info
        run.save()

    def stage_hash_extra(self) -> dict | None:
        """What the surrogate stage's hash holds besides data and config in an update run."""
        if self.run0 is None:
            return None
        u = self.cfg.update_cfg
        return {**self.run0.fingerprint(), "epochs": u.epochs, "replay": u.replay, "influence": u.influence}

    # ---- 1. surrogate ------------------------------------------------------------------
    def train_surrogate(self, run, n_items: int, valid, *, log: Callable[[str], None] = print):
        """RUN0's surrogate, warm-started on the update set (or frozen); returns (model, history, info)."""
        from engine.surrogate import load_surrogate, make_batches, train_surrogate
        from engine.surrogate.evaluate import evaluate_ranking

        cfg, u = self.cfg, self.cfg.update_cfg
        model0 = load_surrogate(self.run0.root / "surrogate")
        if self.frozen:
            info = {"mode": "frozen", "steps": 0, "why": "--update-influence changed: RUN0's surrogate and v are kept "
                    "so that RUN0's influence of unchanged samples stays valid"}
            return model0, [], info
        status = np.concatenate(self.status) if self.status else np.zeros(0, np.int8)
        rows, mix = update_rows(status, u.replay, cfg.surrogate.seed)
        steps = update_steps(rows.size, u.epochs, cfg.surrogate.batch_size)
        info: dict[str, Any] = {"mode": "warm start from RUN0's checkpoint", "update_set": mix, "steps": steps,
                                "epochs": u.epochs, "replay": u.replay, "batch_size": cfg.surrogate.batch_size}
        vb = None
        if valid is not None:
            vb = make_batches(valid, batch_size=512, max_len=cfg.surrogate.max_len)
            info["valid_before"] = evaluate_ranking(model0, vb, k=cfg.surrogate.eval_k)
        if steps == 0:
            info["why"] = "no new or changed sample: RUN0's surrogate is kept as it is"
            return model0, [], info
        loaders, start = [], 0
        for f, part in zip(self.files, self.parts):
            m = len(part["sample_id"])
            lo, hi = np.searchsorted(rows, [start, start + m])
            if hi > lo:
                local = rows[lo:hi] - start
                loaders.append(lambda f=f, local=local: take_rows(read_parquet_checked(f, SAMPLES_SCHEMA), local))
            start += m
        scfg = dataclasses.replace(cfg.surrogate, epochs=max(1, math.ceil(u.epochs)), distributed="local")
        log(f"[surrogate] update: warm start from {self.run0.root}, {steps} steps over {rows.size} samples "
            f"({mix['new_and_changed']} new/changed + {mix['replayed_unchanged']} replayed unchanged)")
        model, history = train_surrogate(loaders, n_items, scfg, valid=valid, log=log,
                                         init_state=model0.state_dict(), max_steps=steps)
        if vb is not None:
            info["valid_after"] = evaluate_ranking(model, vb, k=cfg.surrogate.eval_k)
        info["why"] = "the data changed: the surrogate continues from RUN0's instead of training from scratch"
        return model, history, info

    # ---- 2. iHVP -----------------------------------------------------------------------
    def solve_options(self) -> dict[str, Any]:
        """Extra :func:`solve_ihvp` options: CG from RUN0's v (and the cold check)."""
        if self.run0 is None or self.cfg.influence.solver != "cg":
            return {}
        v0 = np.load(self.run0.root / "ihvp" / "v.npy", allow_pickle=False)
        return {"x0": v0, "cold_reference": bool(self.cfg.update_cfg.cold_check)}

    def ihvp_info(self, report: dict) -> dict[str, Any]:
        """The warm vs cold CG record of an update's iHVP stage."""
        if self.run0 is None:
            return {}
        r0 = self.run0.ihvp
        extra = report.get("extra") or {}
        out: dict[str, Any] = {
            "x0": "RUN0's v" if self.cfg.influence.solver == "cg" else f"none (solver {self.cfg.influence.solver!r})",
            "warm": {"iterations": report.get("iterations"), "rel_residual": report.get("rel_residual"),
                     "x0_rel_residual": extra.get("x0_rel_residual"), "x0_scale": extra.get("x0_scale"),
                     "seconds": report.get("seconds")}}
        if "cold" in extra:
            out["cold"] = {"source": "a cold CG solve (x0 = 0) on this run's operator and g_bar (--update-cold-check)",
                           **extra["cold"]}
        else:
            out["cold"] = {"source": "RUN0's own solve from zero (its surrogate and data; not this operator): "
                                     "rerun with --update-cold-check for the same operator",
                           "iterations": r0.get("iterations"), "rel_residual": r0.get("rel_residual"),
                           "seconds": r0.get("seconds")}
        if out["warm"]["iterations"] is not None and out["cold"].get("iterations") is not None:
            out["iterations_saved"] = int(out["cold"]["iterations"]) - int(out["warm"]["iterations"])
        return out

    def reuse_ihvp(self, run) -> dict[str, Any]:
        """Frozen mode: RUN0's v, copied."""
        shutil.copyfile(self.run0.root / "ihvp" / "v.npy", run.path("ihvp") / "v.npy")
        r0 = self.run0.ihvp
        keep = {k: r0.get(k) for k in ("n", "damping", "g_bar_norm", "rel_residual", "solver")}
        return {**keep, "iterations": 0, "reused": "RUN0's v (--update-influence changed: surrogate frozen)"}

    def copy_surrogate(self, run) -> None:
        src, dst = self.run0.root / "surrogate", run.path("surrogate")
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("model.pt", "config.json"):
            shutil.copyfile(src / f, dst / f)

    # ---- 3. influence of new and changed samples only (frozen) ---------------------------
    def influence_store(self, columns: Sequence[str]) -> KeyIndex:
        """RUN0's surrogate scores by key, influence rescaled by n0 / n (the same grad L_s . v)."""
        t = pq.read_table(self.run0.root / "scores.parquet", columns=["sample_id", *columns]).sort_by("sample_id")
        k0 = self.run0.keys
        order = np.argsort(k0["sample_id"], kind="stable")
        ids = t.column("sample_id").to_numpy()
        pos = np.searchsorted(k0["sample_id"][order], ids)
        keys = k0["key"][order][pos]
        vals = {c: t.column(c).to_numpy().astype(np.float64) for c in columns}
        if "influence" in vals:
            vals["influence"] = vals["influence"] * (self.run0.n / self.n)
        return KeyIndex(keys, vals)

    # ---- 4. effort with the cache --------------------------------------------------------
    def effort_cache(self, backend: str, options: dict, *, base: str | None, gpus: float):
        from engine.score_cache import ScoreCache

        if self.cache_dir is None:
            return None, None
        conf = effort_cache_config(backend, options, catalogue=self.catalogue, base=base,
                                   device_kind="gpu" if gpus > 0 else "cpu")
        cache = ScoreCache(self.cache_dir, conf, stage="effort", columns=("effort",))
        return cache, conf


def prepare_day(cfg, files: Sequence[Path], items: pa.Table, *, n_items: int, need_sur: bool,
                log: Callable[[str], None] = print) -> Day:
    """Keys of every sample, the catalogue fingerprint and (``cfg.update``) RUN0, checked, with the
    diff against it. Reads only: a refused update writes nothing."""
    from engine.score_cache import catalogue_key

    t0 = time.perf_counter()
    cat = catalogue_key(items)
    parts = [file_keys(read_parquet_checked(f, SAMPLES_SCHEMA)) for f in files]
    day = Day(cfg=cfg, files=list(files), parts=parts, catalogue=cat, cache_dir=getattr(cfg, "score_cache", None))
    if getattr(cfg, "update", None):
        day.run0 = open_run0(cfg.update, cfg, catalogue=cat, n_items=n_items, need_sur=need_sur)
        new_k = np.concatenate([p["key"] for p in parts])
        new_u = np.concatenate([p["user_hash"] for p in parts])
        d = diff_days(day.run0.keys["key"], day.run0.keys["user_hash"], new_k, new_u)
        bounds = np.cumsum([0] + [len(p["sample_id"]) for p in parts])
        day.status = [d.status[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        day.info["removed"] = d.removed
        c = day.counts()
        log(f"[update] against {day.run0.root}: {c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged "
            f"samples ({c['removed']} of RUN0's users without a sample today); keys in "
            f"{time.perf_counter() - t0:.1f}s")
    return day


# ---- scoring only what no store holds ------------------------------------------------------
def _keys_of(part: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    order = np.argsort(part["sample_id"], kind="stable")
    pos = np.searchsorted(part["sample_id"][order], ids)
    if np.any(pos >= order.size) or np.any(part["sample_id"][order][np.minimum(pos, order.size - 1)] != ids):
        raise DataError("a score shard holds sample ids its samples file does not", field="sample_id")
    return part["key"][order][pos]


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp), option="--out")


def score_missing(files: Sequence[Path], parts: Sequence[dict[str, np.ndarray]], store, out_dir: Path,
                  columns: Sequence[str], score: Callable[..., dict], *, record: dict,
                  save: Callable[[], None], log: Callable[[str], None] = print, name: str = "effort") -> dict:
    """Score, through ``score(todo_files, delta=...)`` (the shard runner into ``out_dir``; ``delta``:
    the store held some rows, so the todo is a delta), only the rows whose key ``store`` lacks;
    then write ``out_dir/<stem>.parquet`` (sample_id + ``columns``) for every file, every value
    read back from ``store`` (so reused values are bit for bit the stored ones).

    ``store``: ``lookup(keys) -> ({col: values}, found)`` and ``add(keys, {col: values})``
    (a :class:`~engine.score_cache.ScoreCache` or a :class:`~engine.daily.KeyIndex`).

    Resumable: a shard of an earlier (killed) invocation is added to the store first. A file with
    some stored rows is scored through ``out_dir/misses/<stem>.parquet`` (its missing rows); its
    output shard then holds those rows only until it is rewritten whole from the store. The
    lookup of the first invocation is kept in ``record["lookup"]`` (hits / misses of the run).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    misses_dir = out_dir / "misses"
    t0 = time.perf_counter()
    added = conflicts = 0

    def add(keys, vals):
        nonlocal added, conflicts
        r = store.add(keys, vals)
        if hasattr(r, "written"):
            added += r.written
            conflicts += r.conflicts
        else:
            added += int(r)

    # 1. shards of an earlier invocation into the store (idempotent)
    complete = set()
    for f, part in zip(files, parts):
        p = out_dir / f"{Path(f).stem}.parquet"
        if p.exists():
            t = pq.read_table(p)
            add(_keys_of(part, t.column("sample_id").to_numpy()), {c: t.column(c).to_numpy() for c in columns})
            if t.num_rows == len(part["sample_id"]):
                complete.add(str(f))
    # 2. what the store holds
    found_by_file = [store.lookup(part["key"])[1] for part in parts]
    if "lookup" not in record:
        hits = int(sum(int(m.sum()) for m in found_by_file))
        record["lookup"] = {"hits": hits, "misses": int(sum(len(m) for m in found_by_file)) - hits,
                            "stored_rows_before": None if not hasattr(store, "__len__") else len(store)}
        save()
    # 3. plan
    todo, partial = [], {}
    for f, part, found in zip(files, parts, found_by_file):
        stem = Path(f).stem
        p = out_dir / f"{stem}.parquet"
        if str(f) in complete:
            todo.append(str(f))  # the shard runner skips it (its output exists) and counts it
            continue
        if found.all():
            continue  # written from the store below
        if p.exists():  # a partial shard, yet the store lacks rows: score them again
            p.unlink()
        if not found.any():
            todo.append(str(f))
        else:
            t = read_parquet_checked(f, SAMPLES_SCHEMA)
            mp = misses_dir / f"{stem}.parquet"
            _write_table(mp, t.take(pa.array(np.flatnonzero(~found))))
            todo.append(str(mp))
            partial[stem] = f
    log(f"[{name}] {record['lookup']['hits']} of {sum(len(p['sample_id']) for p in parts)} samples held by the "
        f"{'score cache' if hasattr(store, 'dir') else 'reused scores'}; scoring the rest "
        f"({len(todo) - len(complete)} shard(s) to score, {len(complete)} done before)")
    # a delta when the store held rows at the first invocation (jobs/prune.inline_reason)
    st = score(todo, delta=record["lookup"]["hits"] > 0) if todo else {
        "shards_total": 0, "shards_skipped": 0, "shards_written": 0, "rows_written": 0, "duplicate_rows_dropped": 0}
    # 4. scored rows into the store; every shard written whole from it
    for f, part in zip(files, parts):
        stem = Path(f).stem
        p = out_dir / f"{stem}.parquet"
        if str(f) in complete:
            continue
        if p.exists():
            t = pq.read_table(p)
            add(_keys_of(part, t.column("sample_id").to_numpy()), {c: t.column(c).to_numpy() for c in columns})
            if stem not in partial and t.num_rows == len(part["sample_id"]):
                continue  # scored whole: it is the shard
        vals, found = store.lookup(part["key"])
        if not found.all():
            raise DataError(f"{int((~found).sum())} sample(s) neither stored nor scored", path=p)
        _write_table(p, pa.table({"sample_id": pa.array(part["sample_id"]),
                                  **{c: pa.array(vals[c]) for c in columns}}))
    if misses_dir.exists():
        shutil.rmtree(misses_dir)
    total = int(sum(len(p["sample_id"]) for p in parts))
    out = {**st, "samples": total, "reused": record["lookup"]["hits"], "scored": record["lookup"]["misses"],
           "scored_this_invocation": int(st.get("rows_written", 0)), "stored_rows_added": added,
           "store_conflicts": conflicts, "lookup_wall_s": round(time.perf_counter() - t0 - float(st.get("wall_s", 0)), 3)}
    return out


def effort_stage(day: Day, run, files, *, backend: str, options: dict, base: str | None, pool, score,
                 log: Callable[[str], None] = print, cacheable: bool = True) -> dict:
    """The prune job's effort stage: :func:`score_missing` over the score cache (or every sample
    through ``score`` when the cache is off). ``score(todo, out_dir)`` runs the shard runner.

    ``cacheable=False`` (the stage also emits ``llm_influence``, a dot product with today's
    validation gradient u: not a function of the sample alone): every sample is scored."""
    out_dir = run.path("shards/effort")
    cache, conf = day.effort_cache(backend, options, base=base, gpus=pool.gpus) if cacheable else (None, None)
    if cache is None:
        why = ("--score-cache off" if day.cache_dir is None else
               "the effort stage also computes llm_influence, which depends on today's validation gradient u: "
               "every sample scored, nothing cached")
        st = score([str(f) for f in files], out_dir)
        day.note(run, "effort", reused=0, recomputed=day.n, why=why)
        return {**st, "score_cache": {"dir": None, "why": why}}
    rec = run.manifest["stages"].setdefault("effort", {})
    st = score_missing(files, day.parts, cache, out_dir, ("effort",),
                       lambda todo, delta: score(todo, out_dir, delta=delta),
                       record=rec.setdefault("score_cache", {}), save=run.save, log=log, name="effort")
    info = {"dir": str(cache.root), "key": cache.key, "config": conf, "hits": st["reused"], "misses": st["scored"],
            "scored_this_invocation": st["scored_this_invocation"], "rows_added": st["stored_rows_added"],
            "conflicts": st["store_conflicts"], "rows_in_cache": len(cache),
            "lookup": rec["score_cache"]["lookup"],
            "why": "effort is a pure function of (sample key, LLM-side config): a key held under this config key is "
                   "reused bit for bit, a missing one is scored and added; a changed LLM or prompt config is another "
                   "config key and reuses nothing"}
    keep = {k: st[k] for k in ("shards_total", "shards_skipped", "shards_written", "rows_written",
                               "duplicate_rows_dropped") if k in st}
    extra = {k: v for k, v in st.items() if k not in keep and k not in ("samples", "reused", "scored",
                                                                          "scored_this_invocation",
                                                                          "stored_rows_added", "store_conflicts",
                                                                          "lookup_wall_s")}
    day.note(run, "effort", reused=st["reused"], recomputed=st["scored"], why=info["why"])
    return {**extra, **keep, "score_cache": info}


def influence_changed_stage(day: Day, run, files, *, columns: Sequence[str], score,
                            log: Callable[[str], None] = print) -> dict:
    """Frozen mode's influence stage: only samples RUN0 did not score (by key) go to ``score``."""
    store = day.influence_store(columns)
    out_dir = run.path("shards/surrogate")
    rec = run.manifest["stages"].setdefault("surrogate_scores", {}).setdefault("reuse", {})
    st = score_missing(files, day.parts, store, out_dir, tuple(columns),
                       lambda todo, delta: score(todo, out_dir, delta=delta),
                       record=rec, save=run.save, log=log, name="influence")
    why = ("--update-influence changed: surrogate and v frozen at RUN0's, so an unchanged sample's influence is "
           "RUN0's (rescaled by n0/n); new and changed samples scored")
    day.note(run, "surrogate_scores", reused=st["reused"], recomputed=st["scored"], why=why)
    return {**{k: v for k, v in st.items() if k != "lookup_wall_s"}, "why": why}


def summary(day: Day, run) -> dict | None:
    """The manifest's ``update`` block once the run is done."""
    if day.run0 is None:
        return None
    st = run.manifest["stages"]
    up = dict(run.manifest.get("update", {}))
    eff = st.get("effort", {}).get("score_cache") or {}
    up.update({
        "run0": str(day.run0.root), "samples": day.counts(), "config": dataclasses.asdict(day.cfg.update_cfg),
        "surrogate_warm_start_steps": (st.get("surrogate", {}).get("update") or {}).get("steps"),
        "cg_iterations": {"warm": ((st.get("ihvp", {}).get("update") or {}).get("warm") or {}).get("iterations"),
                          "cold": ((st.get("ihvp", {}).get("update") or {}).get("cold") or {}).get("iterations"),
                          "cold_source": ((st.get("ihvp", {}).get("update") or {}).get("cold") or {}).get("source")},
        "effort_cache": {"hits": eff.get("hits"), "misses": eff.get("misses")} if eff else None,
    })
    return up
