"""Resumable, exactly-once scoring of a sharded samples table with a Ray Data actor pool.

One input Parquet file = one shard. For every shard without a finished output, the
samples are streamed through ``map_batches(ScorerClass, compute=ActorPoolStrategy(...))``;
the driver only collects the (small) score columns, and writes a shard's output the
moment all of its rows have come back (``<out>/<input-stem>.parquet``, written to a
temporary name and renamed, so a file that exists is complete). A rerun skips every
shard whose output exists; a driver killed mid-run loses only the shards in flight.

Every output shard is checked before it is written: its ``sample_id`` set must equal the
input file's (no row lost, none scored twice). Rows that an actor restart re-delivered
are dropped by ``sample_id`` (same deterministic score) and counted.

:func:`score_shards_inline` is the same contract in the calling process (no pool, no Ray Data),
for an update's small delta, where a pool's start-up costs more than the scoring.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from engine.config import STALL_TIMEOUT_S, STALL_WARN_S
from engine.errors import DealrecError

log = logging.getLogger("dealrec.shards")

PATH_COLUMN = "path"
# Reads are light IO and ask for NO CPU, so no actor pool can starve them: any positive
# request can be left without room on every node once the pool fills them (a 0.25-CPU read
# beside 0.875-CPU actors on 1-CPU nodes never started: a silent hang). Their number is
# capped instead (READ_CONCURRENCY), so they cannot flood the object store either.
READ_CPUS = 0.0
READ_CONCURRENCY = 4


class StallError(DealrecError):
    """A scoring stage made no progress for longer than its stall timeout."""


@dataclass
class ShardRunStats:
    shards_total: int
    shards_skipped: int
    shards_written: int
    rows_written: int
    duplicate_rows_dropped: int
    wall_s: float


class Beating:
    """Wraps a Ray Data callable class so that its actor tells a heartbeat actor "alive and
    working" every ``beat_s`` seconds while it builds its model or scores a batch: the driver's
    stall watchdog (:func:`watched_batches`) then tells a slow batch from a stalled pool."""

    def __init__(self, inner_cls: type, args: tuple, kwargs: dict, heartbeat=None, beat_s: float = 0.0):
        self._busy = 1  # constructing (model loading) counts as work
        self._heartbeat = heartbeat
        if heartbeat is not None and beat_s > 0:
            threading.Thread(target=self._beat, args=(heartbeat, beat_s), daemon=True,
                             name="dealrec-heartbeat").start()
        try:
            self.inner = inner_cls(*args, **kwargs)
        finally:
            self._busy = 0

    def _beat(self, heartbeat, beat_s: float) -> None:
        # a slow batch on a loaded machine is not a stall
        while True:
            if self._busy:
                try:
                    heartbeat.beat.remote()
                except Exception:  # the driver is gone or the beat actor died: nothing to tell
                    return
            time.sleep(beat_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._busy += 1
        n = len(next(iter(batch.values()), ()))
        try:
            out = self._call(batch)
        finally:
            self._busy -= 1
        if self._heartbeat is not None:  # rows done, for progress inside a shard (one block)
            try:
                self._heartbeat.scored.remote(n)
            except Exception:  # the driver is gone: nothing to tell
                pass
        return out

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner(batch)


class _PathCarrier(Beating):
    """Wraps a scorer so that each output row keeps the input file it came from.

    The inner scorer may reorder rows (e.g. bucketing by length); rows are matched
    back to their file by ``sample_id``.
    """

    def _call(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = batch.pop(PATH_COLUMN)
        ids_in = np.asarray(batch["sample_id"], dtype=np.int64)
        out = self.inner(batch)
        ids_out = np.asarray(out["sample_id"], dtype=np.int64)
        order = np.argsort(ids_in, kind="stable")
        pos = np.searchsorted(ids_in, ids_out, sorter=order)
        out = dict(out)
        out[PATH_COLUMN] = np.asarray(paths)[order[pos]]
        return out


@contextmanager
def heartbeat_actor(stall_warn_s: float, stall_timeout_s: float):
    """``(heartbeat actor, beat period)`` for a pool's :class:`Beating` actors (``(None, 0.0)`` when
    both guards are off): a zero-CPU actor, schedulable on any node, so that it cannot itself be
    starved; killed on exit."""
    heartbeat, beat_s = None, 0.0
    if stall_timeout_s or stall_warn_s:
        beat_s = max(0.5, min(10.0, *(t / 6 for t in (stall_warn_s, stall_timeout_s) if t)))
        heartbeat = ray.remote(num_cpus=0)(_Heartbeat).remote()
    try:
        yield heartbeat, beat_s
    finally:
        if heartbeat is not None:
            try:
                ray.kill(heartbeat)
            except Exception:  # already gone
                pass


def watched_batches(ds, *, heartbeat, stall_warn_s: float, stall_timeout_s: float, knobs: str = "",
                    name: str = "scores", progress: Callable[[str], None] = print, total: int | None = None,
                    progress_s: float = 60.0):
    """The output batches of ``ds`` (numpy, as produced), under the heartbeat watchdog of
    :func:`_watched` instead of Ray Data's own no-progress guard.

    Ray Data's guard (Ray 2.60: 30 min by default) counts only blocks that move; one block of a
    slow model (8,192 samples of an LLM's effort; the textrec effort of an 8,000-sample pool here:
    ExecutionTimeoutError after 1,800 s) failed a working job. The watchdog counts a stall from the
    later of the last batch and the last beat of a busy actor."""
    ds.context.execution_no_progress_timeout_s = -1
    return _watched(ds.iter_batches(batch_format="numpy", batch_size=None), warn_s=stall_warn_s,
                    timeout_s=stall_timeout_s, knobs=knobs, name=name, progress=progress, heartbeat=heartbeat,
                    total=total, progress_s=progress_s)


class _Heartbeat:
    """Receives "still working" beats from a pool's actors; the driver asks how long ago."""

    def __init__(self):
        self.last = None
        self.rows = 0

    def beat(self) -> None:
        self.last = time.monotonic()

    def scored(self, n: int) -> None:
        self.rows += int(n)
        self.last = time.monotonic()

    def rows_scored(self) -> int:
        """Rows the pool's actors have returned so far (re-delivered rows counted again)."""
        return self.rows

    def age(self) -> float | None:
        """Seconds since the last beat on this actor's clock (None: never)."""
        return None if self.last is None else time.monotonic() - self.last


def _read_shard(batch: pa.Table, columns: list[str]) -> pa.Table:
    """Read the input files named in ``batch["item"]``, tagging each row with its file."""
    tables = []
    for path in batch.column("item").to_pylist():
        t = pq.read_table(path, columns=columns)
        tables.append(t.append_column(PATH_COLUMN, pa.array([path] * t.num_rows, pa.string())))
    return pa.concat_tables(tables)


def shard_output_path(out_dir: Path, input_file: str | os.PathLike) -> Path:
    return Path(out_dir) / (Path(input_file).stem + ".parquet")


def finished_shards(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    return [shard_output_path(Path(out_dir), f) for f in files if shard_output_path(Path(out_dir), f).exists()]


def _input_ids(path: str) -> np.ndarray:
    return pq.read_table(path, columns=["sample_id"]).column("sample_id").to_numpy()


def _write_shard(out_path: Path, rows: list[dict[str, np.ndarray]], expected_ids: np.ndarray, columns: Sequence[str]) -> tuple[int, int]:
    cols = {c: np.concatenate([r[c] for r in rows]) for c in columns}
    ids = cols["sample_id"].astype(np.int64)
    uniq, first = np.unique(ids, return_index=True)
    dropped = len(ids) - len(uniq)
    if not np.array_equal(uniq, np.sort(expected_ids)):
        missing = np.setdiff1d(expected_ids, uniq)
        extra = np.setdiff1d(uniq, expected_ids)
        raise DealrecError(
            f"shard {out_path.name}: scored sample_ids do not match the input "
            f"(missing {missing[:5].tolist()}..., unexpected {extra[:5].tolist()}...)"
        )
    table = pa.table({c: cols[c][first] for c in columns})
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    return len(uniq), dropped


def _plan(files, out_dir, output_columns, progress, name) -> tuple[Path, list[str], list[str]]:
    """(out folder, resolved input files, those without a finished output); logs 'all done'."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(Path(f).resolve()) for f in files]
    if "sample_id" not in output_columns:
        raise ValueError("output_columns must include 'sample_id'")
    todo = [f for f in files if not shard_output_path(out, f).exists()]
    if not todo:
        progress(f"[{name}] all {len(files)} shards already done; skipping")
    return out, files, todo


def score_shards(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    scorer_cls: type,
    *,
    constructor_args: tuple = (),
    constructor_kwargs: dict[str, Any] | None = None,
    input_columns: Sequence[str] = ("sample_id", "history", "target"),
    output_columns: Sequence[str],
    batch_size: int = 256,
    num_actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_restarts: int = 3,
    max_task_retries: int = -1,
    min_actors: int = 1,
    max_actors: int | None = None,
    stall_warn_s: float = STALL_WARN_S,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    stall_knobs: str = "",
    progress: Callable[[str], None] = print,
    name: str = "scores",
    progress_s: float = 60.0,
) -> ShardRunStats:
    """Score every input shard that has no finished output; return what was done.

    Args:
        files: the input Parquet files (one shard each), holding ``input_columns``.
        out_dir: where ``<stem>.parquet`` outputs go; existing ones are skipped.
        scorer_cls: a Ray Data callable class; ``__call__(batch) -> dict`` returning
            ``output_columns`` (``sample_id`` among them), rows in any order.
        constructor_args / constructor_kwargs: passed to ``scorer_cls`` once per actor
            (ObjectRefs inside are resolved by the scorer).
        num_actors, num_cpus, num_gpus: the pool's initial size and each actor's resources
            (``actors.pool.plan_pool`` sizes it per node). Reads ask for no CPU, so a pool
            may take every CPU.
        min_actors, max_actors: the pool autoscales in this range (None = ``num_actors``):
            it shrinks when a node is lost and grows, within the cluster's resources, up to
            ``max_actors`` when nodes join.
        stall_warn_s, stall_timeout_s: with no scored batch for ``stall_warn_s`` seconds the
            cluster's per-node use, its pending resource demands and the pool's actors are
            logged (again every ``stall_warn_s``); after ``stall_timeout_s`` the stage fails
            with a StallError naming ``stall_knobs`` (0 disables either). The clock counts
            actor start-up too: set it above the time to load one model replica.
        max_restarts, max_task_retries: actor fault tolerance (a node lost mid-run; -1 =
            unlimited). Task retries default to unlimited, Ray Data's own default for
            pools: until the cluster declares a crashed node dead, every resubmitted batch
            spends a retry, so a small finite limit fails runs that would recover.
        progress_s: while no shard comes back, log the rows scored so far this often (0 = never).

    Raises:
        DealrecError: a shard's scored ids differ from its input ids.
        StallError: no progress for ``stall_timeout_s``.
    """
    t0 = time.perf_counter()
    out, files, todo = _plan(files, out_dir, output_columns, progress, name)
    skipped = len(files) - len(todo)
    if not todo:
        return ShardRunStats(len(files), skipped, 0, 0, 0, time.perf_counter() - t0)
    expected = {f: _input_ids(f) for f in todo}
    total_rows = sum(len(v) for v in expected.values())
    max_actors = max(int(max_actors or num_actors), int(num_actors))
    min_actors = max(1, min(int(min_actors), int(num_actors)))
    progress(f"[{name}] scoring {len(todo)} shards ({total_rows} samples), {skipped} already done; "
             f"{num_actors} actor(s) (autoscaling {min_actors}..{max_actors}) x {num_cpus} CPU / {num_gpus} GPU, "
             f"batch {batch_size}, max_restarts={max_restarts}, max_task_retries={max_task_retries}")

    # One block per input file. ray.data.read_parquet (Ray 2.60, datasource v2) bin-packs
    # small files into ~128 MiB read tasks: every shard of a run would travel in one
    # block, scored by one actor task (no parallelism) and finished only at the very end
    # (a killed driver resumes nothing).
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        _read_shard, fn_kwargs={"columns": list(input_columns)}, batch_size=1, batch_format="pyarrow",
        num_cpus=READ_CPUS, compute=ray.data.TaskPoolStrategy(size=READ_CONCURRENCY))
    with heartbeat_actor(stall_warn_s, stall_timeout_s) as (heartbeat, beat_s):
        ds = ds.map_batches(
            _PathCarrier,
            fn_constructor_args=(scorer_cls, tuple(constructor_args), dict(constructor_kwargs or {}), heartbeat,
                                 beat_s or 0.0),
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors, initial_size=int(num_actors)),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )
        pending: dict[str, list[dict[str, np.ndarray]]] = {f: [] for f in todo}
        got: dict[str, set] = {f: set() for f in todo}
        written = rows_written = dropped = 0
        done_rows = 0
        last = time.perf_counter()
        # Paths that Ray Data reports may differ in form (e.g. no leading '/'); normalise.
        norm = {os.path.normpath(f).lstrip("/"): f for f in todo}
        # one shard is one block: Ray Data's no-progress guard is off, the heartbeat watchdog is on
        batches = watched_batches(ds, heartbeat=heartbeat, stall_warn_s=stall_warn_s, stall_timeout_s=stall_timeout_s,
                                  knobs=stall_knobs, name=name, progress=progress, total=total_rows,
                                  progress_s=progress_s)
        for batch in batches:
            paths = batch[PATH_COLUMN]
            for p in np.unique(paths):
                key = norm.get(os.path.normpath(str(p)).lstrip("/"))
                if key is None:
                    raise DealrecError(f"[{name}] row from unexpected input path {p!r}")
                m = paths == p
                rows = {c: np.asarray(batch[c])[m] for c in output_columns}
                pending[key].append(rows)
                before = len(got[key])
                got[key].update(rows["sample_id"].tolist())
                done_rows += len(got[key]) - before
                if len(got[key]) == len(expected[key]):
                    n, d = _write_shard(shard_output_path(out, key), pending.pop(key), expected[key], output_columns)
                    got[key] = set()
                    written += 1
                    rows_written += n
                    dropped += d
            now = time.perf_counter()
            if now - last > 10:
                rate = done_rows / (now - t0)
                progress(f"[{name}] {done_rows}/{total_rows} samples, {written}/{len(todo)} shards, {rate:.0f} samples/s")
                last = now
        if written != len(todo):
            incomplete = [Path(f).name for f in pending]
            raise DealrecError(f"[{name}] stream ended with incomplete shards: {incomplete[:5]}")
        wall = time.perf_counter() - t0
        progress(f"[{name}] done: {rows_written} samples in {written} shards, {wall:.1f}s"
                 + (f", {dropped} re-delivered rows dropped" if dropped else ""))
        return ShardRunStats(len(files), skipped, written, rows_written, dropped, wall)


def score_shards_inline(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    scorer_cls: type,
    *,
    constructor_args: tuple = (),
    constructor_kwargs: dict[str, Any] | None = None,
    input_columns: Sequence[str] = ("sample_id", "history", "target"),
    output_columns: Sequence[str],
    batch_size: int = 256,
    threads: int = 1,
    progress: Callable[[str], None] = print,
    name: str = "scores",
) -> ShardRunStats:
    """:func:`score_shards` in this process: one ``scorer_cls`` built here, no actor pool.

    For a handful of rows (an update's delta: the score cache holds the rest), where starting a
    pool and loading a model replica in each actor costs more than the scoring itself. Same
    contract as :func:`score_shards`: the scorer class and its arguments (ObjectRefs resolve in
    this process), batches of ``batch_size`` rows in Ray Data's numpy format, every shard checked
    against its input ids and written atomically, finished shards skipped. ``threads``: torch's
    intra-op threads while scoring (Ray gives an actor of ``num_cpus`` CPUs that many), restored
    after.
    """
    import torch
    from ray.data.block import BlockAccessor

    t0 = time.perf_counter()
    out, files, todo = _plan(files, out_dir, output_columns, progress, name)
    skipped = len(files) - len(todo)
    if not todo:
        return ShardRunStats(len(files), skipped, 0, 0, 0, time.perf_counter() - t0)
    total_rows = sum(pq.read_metadata(f).num_rows for f in todo)
    progress(f"[{name}] scoring {len(todo)} shards ({total_rows} samples) in this process, {skipped} already done; "
             f"batch {batch_size}, {threads} thread(s)")
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    written = rows_written = dropped = done_rows = 0
    last = time.perf_counter()
    try:
        scorer = scorer_cls(*constructor_args, **dict(constructor_kwargs or {}))
        for f in todo:
            table = pq.read_table(f, columns=list(input_columns))
            rows = []
            for lo in range(0, table.num_rows, batch_size):
                batch = BlockAccessor.for_block(table.slice(lo, batch_size)).to_batch_format("numpy")
                res = scorer(batch)
                rows.append({c: np.asarray(res[c]) for c in output_columns})
                done_rows += len(rows[-1]["sample_id"])
                if time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    progress(f"[{name}] {done_rows}/{total_rows} samples, {written}/{len(todo)} shards")
            n, d = _write_shard(shard_output_path(out, f), rows, table.column("sample_id").to_numpy(), output_columns)
            written, rows_written, dropped = written + 1, rows_written + n, dropped + d
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - t0
    progress(f"[{name}] done: {rows_written} samples in {written} shards, {wall:.1f}s (in this process)")
    return ShardRunStats(len(files), skipped, written, rows_written, dropped, wall)


def _rows_scored(heartbeat) -> int:
    try:
        return int(ray.get(heartbeat.rows_scored.remote(), timeout=10))
    except Exception:  # the beat actor is unreachable: no count
        return 0


def _beat_age(heartbeat) -> float | None:
    """Seconds since any actor of the pool last said it was working (None: never or unknown)."""
    if heartbeat is None:
        return None
    try:
        return ray.get(heartbeat.age.remote(), timeout=10)
    except Exception:  # the beat actor is unreachable: fall back to batches alone
        return None


def _watched(it, *, warn_s: float, timeout_s: float, knobs: str, name: str, progress: Callable[[str], None],
             heartbeat=None, total: int | None = None, progress_s: float = 60.0):
    """Yield from ``it`` (consumed in a thread) and watch for stalls.

    A Ray Data stream that cannot schedule its tasks blocks ``next()`` forever without a
    word; here the driver waits on a queue instead, says what the cluster is waiting for
    after ``warn_s`` without a batch, and fails after ``timeout_s``. On failure the
    consuming thread is left to end with the driver (Ray Data offers no way to cancel a
    stream from another thread); the job process exits on the error.

    While no block comes back (one shard is one block: an 8,000-sample shard of a slow LLM is
    silent for an hour otherwise), the rows the actors have scored so far are logged every
    ``progress_s`` seconds, from the heartbeat actor's count (0 = never).
    """
    if not warn_s and not timeout_s:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=8)
    end = object()

    def pump():
        try:
            for b in it:
                q.put((None, b))
            q.put((None, end))
        except BaseException as e:  # re-raised in the driver's thread
            q.put((e, None))

    threading.Thread(target=pump, name=f"dealrec-{name}-stream", daemon=True).start()
    last = last_warn = last_progress = time.monotonic()
    poll = max(0.5, min(5.0, *(t / 4 for t in (warn_s, timeout_s, progress_s) if t)))
    rows_seen = 0
    while True:
        try:
            err, b = q.get(timeout=poll)
        except queue.Empty:
            now = time.monotonic()
            if heartbeat is not None and progress_s and now - last_progress >= progress_s:
                last_progress = now
                rows = _rows_scored(heartbeat)
                if rows and rows != rows_seen:
                    rows_seen = rows
                    progress(f"[{name}] {rows}{f'/{total}' if total else ''} samples scored by the actors so far "
                             "(counted per batch; a shard is written once all its rows are back)")
            idle = now - last
            first = min(t for t in (warn_s, timeout_s) if t)
            if idle < first:
                continue
            age = _beat_age(heartbeat)
            if age is not None:
                idle = min(idle, age)  # an actor is busy (or loading its model): slow, not stalled
            if timeout_s and idle >= timeout_s:
                diag = _diagnosis(name)
                raise StallError(
                    f"[{name}] no batch scored for {idle:.0f}s and no actor working (stall timeout {timeout_s:g}s): "
                    f"the stage is waiting for resources it cannot get or for actors that do not start.\n{diag}\n"
                    f"Change: {knobs or 'the pool size'}"
                    " (smaller or fewer actors, or more nodes), or raise the stall timeout (0 = wait forever)")
            if warn_s and idle >= warn_s and now - last_warn >= warn_s:
                last_warn = now
                progress(f"[{name}] WARNING: no batch scored for {idle:.0f}s and no actor working; fails after "
                         f"{timeout_s:g}s ({knobs or 'stall timeout'}).\n{_diagnosis(name)}")
            continue
        if err is not None:
            raise err
        if b is end:
            return
        last = last_warn = time.monotonic()
        yield b


def _diagnosis(name: str) -> str:
    from actors.pool import cluster_diagnosis

    return cluster_diagnosis(ray, name=name)


def read_shards(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> pa.Table:
    """Concatenate the finished outputs of ``files`` (all must exist), sorted by sample_id."""
    paths = [shard_output_path(Path(out_dir), f) for f in files]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise DealrecError(f"missing score shards in {out_dir}: {missing[:5]}")
    t = pa.concat_tables([pq.read_table(p) for p in paths])
    return t.sort_by("sample_id")
