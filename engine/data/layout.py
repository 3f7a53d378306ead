"""Canonical Parquet layout of a prepared data set: file names and Arrow schemas.

A prepared folder holds::

    samples/part-00000.parquet ...  sample_id int64 (dense 0..n-1), user_id string,
                                    history list<int32> (oldest first), target int32
    items.parquet                   item_id int32, title string, category string (nullable)
    valid.parquet, test.parquet     user_id string, history list<int32>, targets list<int32>
    meta.json                       source, counts, what was dropped or filled

One sample per user (docs/method.md#samples): history = the user's training items in time
order except the last, target = the last. Samples are split over several Parquet files
so that Ray Data reads them as several blocks.

Read and checked by :mod:`engine.data.schema`, written by :mod:`engine.data.writer`.
"""

from __future__ import annotations

import pyarrow as pa

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),
        pa.field("target", pa.int32(), nullable=False),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
    ]
)
SPLIT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),
        pa.field("targets", pa.list_(pa.int32()), nullable=False),
    ]
)
SPLITS = ("valid", "test")
SAMPLES_DIR = "samples"
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"
DEFAULT_ROWS_PER_FILE = 8192
