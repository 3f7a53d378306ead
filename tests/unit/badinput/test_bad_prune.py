"""`dealrec prune` on bad data and bad output paths (issue #17): every case is refused before
Ray starts (seconds, not the ~45 s of a scoring pass), exit 2, the file / field named, no
traceback, and --out absent or unchanged."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinput_helpers import assert_rejected, run_cli, snapshot


def _truncate(p):
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _rewrite_part(d, fn):
    f = sorted((d / "samples").glob("*.parquet"))[1]
    t = pq.read_table(f)
    pq.write_table(fn(t), f)
    return f


def _dup_id(t):
    ids = t.column("sample_id").to_numpy().copy()
    ids[3] = ids[2]
    return t.set_column(0, "sample_id", pa.array(ids))


def _bad_target(t):
    tg = t.column("target").to_numpy().copy()
    tg[0] = 10_000
    return t.set_column(t.column_names.index("target"), "target", pa.array(tg, pa.int32()))


# (id, damage(data folder), strings the message must name)
DATA_CASES = [
    ("truncated-part-file", lambda d: _truncate(sorted((d / "samples").glob("*.parquet"))[0]), ["part-00000.parquet"]),
    ("corrupt-meta-json", lambda d: (d / "meta.json").write_text('{"config": '), ["meta.json"]),
    ("meta-json-not-an-object", lambda d: (d / "meta.json").write_text("[1, 2]"), ["meta.json"]),
    ("duplicate-sample-id", lambda d: _rewrite_part(d, _dup_id), ["sample_id", "duplicate", "part-00001.parquet"]),
    ("target-outside-catalogue", lambda d: _rewrite_part(d, _bad_target), ["target", "10000"]),
    ("corrupt-items", lambda d: (d / "items.parquet").write_bytes(b"PAR1 not parquet"), ["items.parquet"]),
    ("truncated-valid", lambda d: _truncate(d / "valid.parquet"), ["valid.parquet"]),
]

#: the issue's own reproductions run in a fresh interpreter, as a user runs them
FRESH = {'truncated-part-file', 'duplicate-sample-id', 'corrupt-meta-json'}


@pytest.mark.parametrize("damage, named", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data(request, tmp_path, data_copy, damage, named):
    damage(data_copy)
    res = run_cli("prune", "--data", data_copy, "--out", "run", "--budget", "16", cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert not (tmp_path / "run").exists()


def test_out_on_a_read_only_location(tmp_path, synth_data, read_only):
    read_only("ro")
    res = run_cli("prune", "--data", synth_data, "--out", "ro/run", "--budget", "16", cwd=tmp_path, fresh=True)
    assert_rejected(res, "--out", "ro/run", "read-only")
    assert list((tmp_path / "ro").iterdir()) == []


def test_out_inside_a_regular_file(tmp_path, synth_data):
    (tmp_path / "f").write_text("hi")
    res = run_cli("prune", "--data", synth_data, "--out", "f/run", "--budget", "16", cwd=tmp_path)
    assert_rejected(res, "--out", "regular file")


def test_corrupt_manifest_of_an_earlier_run(tmp_path, synth_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"stages": {')
    before = snapshot(tmp_path / "run")
    res = run_cli("prune", "--data", synth_data, "--out", "run", "--budget", "16", cwd=tmp_path)
    assert_rejected(res, "manifest.json")
    assert snapshot(tmp_path / "run") == before


def test_no_early_stopping_on_an_empty_validation_split(tmp_path, data_copy, capsys):
    """Issue #17 (6): a valid split with no user gives no early-stopping set (the surrogate
    then trains every epoch), said loudly, instead of stopping on a Recall of 0.0."""
    from engine.data.schema import SPLIT_SCHEMA
    from engine.surrogate import SurrogateConfig
    from jobs.surrogate_train import early_stopping_split

    cfg = SurrogateConfig(epochs=3)
    assert early_stopping_split(data_copy, cfg, 400) is not None
    pq.write_table(SPLIT_SCHEMA.empty_table(), data_copy / "valid.parquet")
    assert early_stopping_split(data_copy, cfg, 400) is None
    err = capsys.readouterr().err
    assert "WARNING" in err and "valid.parquet" in err and "no early stopping" in err
