"""`dealrec finetune` on a bad --selected, bad data and bad output paths (issue #17): refused
before Ray starts, exit 2, the file / field named, no traceback; nothing is committed to
--out, so the corrected rerun into the same folder is not refused as "another config"."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinput_helpers import assert_rejected, run_cli, snapshot

ARGS = ("--workers", "1", "--epochs", "1")

# (id, selected.parquet contents as a pyarrow table or raw bytes, strings the message must name)
SELECTED_CASES = [
    ("truncated", b"PAR1\x00\x00", ["selected.parquet"]),
    ("duplicate-ids", pa.table({"sample_id": [1, 2, 2]}), ["selected.parquet", "duplicate", "sample_id"]),
    ("id-outside-data", pa.table({"sample_id": [1, 999]}), ["selected.parquet", "999"]),
    ("no-sample-id-column", pa.table({"id": [1]}), ["selected.parquet", "sample_id"]),
    ("string-ids", pa.table({"sample_id": ["a"]}), ["selected.parquet", "sample_id", "string"]),
]

#: the issue's own reproductions run in a fresh interpreter, as a user runs them
FRESH = {'truncated'}


@pytest.mark.parametrize("content, named", [c[1:] for c in SELECTED_CASES], ids=[c[0] for c in SELECTED_CASES])
def test_bad_selected(request, tmp_path, synth_data, content, named):
    sel = tmp_path / "selected.parquet"
    sel.write_bytes(content) if isinstance(content, bytes) else pq.write_table(content, sel)
    res = run_cli("finetune", "--data", synth_data, "--selected", sel, "--out", "ft", *ARGS, cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert not (tmp_path / "ft").exists()  # no finetune_config.json to block the corrected rerun


def test_duplicate_sample_id_in_the_data(tmp_path, data_copy):
    f = sorted((data_copy / "samples").glob("*.parquet"))[0]
    t = pq.read_table(f)
    ids = t.column("sample_id").to_numpy().copy()
    ids[1] = ids[0]
    pq.write_table(t.set_column(0, "sample_id", pa.array(ids)), f)
    res = run_cli("finetune", "--data", data_copy, "--all", "--out", "ft", *ARGS, cwd=tmp_path)
    assert_rejected(res, "duplicate sample_id", "part-00000.parquet")
    assert not (tmp_path / "ft").exists()


def test_out_on_a_read_only_location(tmp_path, synth_data, read_only):
    read_only("ro")
    res = run_cli("finetune", "--data", synth_data, "--all", "--out", "ro/ft", *ARGS, cwd=tmp_path, fresh=True)
    assert_rejected(res, "--out", "ro/ft", "read-only")


def test_corrupt_config_of_an_earlier_run(tmp_path, synth_data):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "manifest.json").write_text('{"stages": ')
    before = snapshot(tmp_path / "ft")
    res = run_cli("finetune", "--data", synth_data, "--all", "--out", "ft", *ARGS, cwd=tmp_path)
    assert_rejected(res, "manifest.json")
    assert snapshot(tmp_path / "ft") == before


def test_a_failed_start_commits_no_config(tmp_path, synth_data):
    """Issue #17 (8), in process: the config is written only once the inputs are good, so a
    run that failed on a bad --selected leaves nothing that refuses the corrected one."""
    import argparse

    from jobs.finetune import add_arguments, check_resume, config_from_args, load_examples

    p = argparse.ArgumentParser()
    add_arguments(p)
    pq.write_table(pa.table({"sample_id": [5, 5]}), tmp_path / "bad.parquet")
    pq.write_table(pa.table({"sample_id": [5, 6]}), tmp_path / "good.parquet")
    out = tmp_path / "ft"
    bad = config_from_args(p.parse_args(["--data", str(synth_data), "--selected", str(tmp_path / "bad.parquet"),
                                         "--out", str(out), *ARGS]))
    with pytest.raises(Exception, match="duplicate"):
        load_examples(bad)
    good = config_from_args(p.parse_args(["--data", str(synth_data), "--selected", str(tmp_path / "good.parquet"),
                                          "--out", str(out), *ARGS]))
    assert check_resume(good) is False and load_examples(good)["train_ids"] == [5, 6]
    assert not out.exists()
