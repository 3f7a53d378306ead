"""`dealrec tune` on bad scores, bad data and a read-only run folder (issue #17): refused
before Ray starts, exit 2, the file / field named, no traceback, the run folder unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinput_helpers import assert_rejected, run_cli, snapshot


def _scores(n=300, ids=None, effort=None):
    return pa.table({"sample_id": np.arange(n) if ids is None else ids, "influence": np.linspace(0, 1, n),
                     "effort": np.linspace(1, 0, n) if effort is None else effort})


def _truncated(run):
    b = run.joinpath("scores.parquet").read_bytes()
    run.joinpath("scores.parquet").write_bytes(b[: len(b) // 2])


# (id, damage(run folder, data folder), strings the message must name)
CASES = [
    ("truncated-scores", lambda run, d: _truncated(run), ["scores.parquet"]),
    ("string-sample-ids", lambda run, d: pq.write_table(_scores(3, ids=["a", "b", "c"]), run / "scores.parquet"),
     ["scores.parquet", "sample_id"]),
    ("text-effort", lambda run, d: pq.write_table(_scores(effort=[str(i) for i in range(300)]), run / "scores.parquet"),
     ["scores.parquet", "effort"]),
    ("ids-not-the-data", lambda run, d: pq.write_table(_scores(200), run / "scores.parquet"),
     ["scores.parquet", "sample_id"]),
    ("empty-valid-split", lambda run, d: pq.write_table(
        pq.read_table(d / "valid.parquet").slice(0, 0), d / "valid.parquet"), ["valid.parquet"]),
]

#: the issue's own reproductions run in a fresh interpreter, as a user runs them
FRESH = {'truncated-scores'}


@pytest.mark.parametrize("damage, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_inputs(request, tmp_path, data_copy, damage, named):
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(_scores(), run / "scores.parquet")
    damage(run, data_copy)
    before = snapshot(run)
    res = run_cli("tune", "--run", run, "--data", data_copy, "--samples", "1", "--budget", "16", cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert snapshot(run) == before


def test_run_folder_read_only(tmp_path, synth_data, read_only):
    run = read_only("run", fill=lambda d: pq.write_table(_scores(), d / "scores.parquet"))
    before = snapshot(run)
    res = run_cli("tune", "--run", run, "--data", synth_data, "--samples", "1", "--budget", "16",
                  cwd=tmp_path, fresh=True)
    assert_rejected(res, "--run", "read-only")
    assert snapshot(run) == before
