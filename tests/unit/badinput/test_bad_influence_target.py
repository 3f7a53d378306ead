"""`dealrec prune` with a validation target on data that cannot give one (issue #20): no
valid.parquet, or no user with a validation item, for ``--influence-target valid`` and for the
LLM-side influence (``--influence-source llm``, ``--llm-influence``); and the LLM source with a
training target. Each is refused before Ray starts: exit 2, the file / field / option named, no
traceback, no --out written."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from badinput_helpers import assert_rejected, run_cli


def _no_split(d):
    (d / "valid.parquet").unlink()


def _no_users(d):
    from engine.data.schema import SPLIT_SCHEMA

    pq.write_table(SPLIT_SCHEMA.empty_table(), d / "valid.parquet")


def _users_without_items(d):  # rows, but every targets list empty
    t = pq.read_table(d / "valid.parquet")
    import pyarrow as pa

    empty = pa.array([[] for _ in range(t.num_rows)], pa.list_(pa.int32()))
    pq.write_table(t.set_column(t.column_names.index("targets"), pa.field("targets", pa.list_(pa.int32()), False),
                                empty), d / "valid.parquet")


CASES = [
    ("no-split-surrogate", _no_split, ["--influence-target", "valid"],
     ["valid.parquet", "field 'valid'", "--influence-target valid", "validation split"]),
    ("no-users-surrogate", _no_users, ["--influence-target", "valid"],
     ["valid.parquet", "field 'targets'", "--influence-target valid"]),
    ("users-without-items-surrogate", _users_without_items, ["--influence-target", "valid"],
     ["valid.parquet", "field 'targets'"]),
    ("no-split-llm", _no_split, ["--influence-source", "llm"],
     ["valid.parquet", "field 'valid'", "--influence-source llm"]),
    ("no-users-llm-flag", _no_users, ["--llm-influence"], ["valid.parquet", "field 'targets'", "--llm-influence"]),
]
FRESH = {"no-split-surrogate"}  # as a user runs it, in a new interpreter


@pytest.mark.parametrize("damage, extra, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_target_without_validation_users(request, tmp_path, data_copy, damage, extra, named):
    damage(data_copy)
    res = run_cli("prune", "--data", data_copy, "--out", "run", "--budget", "16", *extra, cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert not (tmp_path / "run").exists()


def test_llm_source_with_a_training_target_and_bad_user_count(tmp_path, synth_data):
    res = run_cli("prune", "--data", synth_data, "--out", "run", "--budget", "16", "--influence-source", "llm",
                  "--influence-target", "train", "--influence-valid-users", "-1", cwd=tmp_path)
    assert_rejected(res, "influence_target", "validation period", "influence_valid_users=-1")
    assert not (tmp_path / "run").exists()
