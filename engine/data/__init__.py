"""Canonical data: schemas, readers, atomic writers, importers."""

from engine.data.schema import (
    ITEMS_SCHEMA,
    SAMPLES_SCHEMA,
    SPLIT_SCHEMA,
    PreparedWriter,
    atomic_dir,
    read_items,
    read_meta,
    read_samples,
    read_split,
    sample_files,
    validate_prepared,
)

__all__ = [
    "ITEMS_SCHEMA",
    "SAMPLES_SCHEMA",
    "SPLIT_SCHEMA",
    "PreparedWriter",
    "atomic_dir",
    "read_items",
    "read_meta",
    "read_samples",
    "read_split",
    "sample_files",
    "validate_prepared",
]
