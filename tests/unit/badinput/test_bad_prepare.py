"""`dealrec prepare` on bad input and bad output paths (issue #17): exit 2, the file / option
named, no traceback, nothing written (no hidden temporary copy either) and an existing
output kept as it was."""

from __future__ import annotations

import numpy as np
import pytest

from badinput_helpers import assert_rejected, run_cli, snapshot

SYNTH = ("prepare", "--format", "synthetic", "--users", "60", "--items", "30")


def _release(root, *, titles=b"", train="1 1 2 3\n2 2 4\n3 3 1 2\n"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequential_train.txt").write_text(train)
    (root / "sequential_valid.txt").write_text("1 4\n")
    (root / "sequential_test.txt").write_text("2 1\n")
    if titles:
        (root / "title_maps.npy").write_bytes(titles)
    else:
        np.save(root / "title_maps.npy", {"seqid2title": {str(i): f"T{i}" for i in range(1, 5)}})
    return root


# (case id, extra arguments, what the message must name); --out is OUT unless the case sets it
CONFIG_CASES = [
    ("split-ratio-no-valid-test", ["--split-ratio", "1", "0", "0"], ["split_ratio"]),
    ("split-ratio-no-test", ["--split-ratio", "0.9", "0.1", "0"], ["split_ratio"]),
    ("min-rating-with-synthetic", ["--min-rating", "3"], ["--min-rating"]),
    ("split-with-synthetic", ["--split", "user"], ["--split"]),
]

#: the issue's own reproductions run in a fresh interpreter, as a user runs them
FRESH = {'split-ratio-no-valid-test'}


@pytest.mark.parametrize("args, named", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_refused_options(request, tmp_path, args, named):
    res = run_cli(*SYNTH, "--out", "out", *args, cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_split_ratio_refused_for_the_release_layout(tmp_path):
    src = _release(tmp_path / "rel")
    res = run_cli("prepare", "--format", "dealrec-release", "--input", src, "--out", "out",
                  "--split-ratio", "0.8", "0.1", "0.1", cwd=tmp_path, fresh=True)
    assert_rejected(res, "split_ratio", "dealrec-release")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("titles, named", [
    (b"\x93NUMPY garbage", "title_maps.npy"),           # a corrupt .npy
    (b"", None),                                          # control: a good release prepares
], ids=["corrupt-npy", "good"])
def test_release_npy(tmp_path, titles, named):
    src = _release(tmp_path / "rel", titles=titles)
    res = run_cli("prepare", "--format", "dealrec-release", "--input", src, "--out", "out", cwd=tmp_path)
    if named is None:
        assert res.returncode == 0, res.stderr
        return
    assert_rejected(res, named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]


def test_out_inside_a_regular_file(tmp_path):
    (tmp_path / "f").write_text("hi")
    res = run_cli(*SYNTH, "--out", "f/sub", cwd=tmp_path, fresh=True)
    assert_rejected(res, "--out", "f/sub", "regular file")
    assert (tmp_path / "f").read_text() == "hi" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_out_is_a_regular_file(tmp_path):
    (tmp_path / "f").write_text("hi")
    res = run_cli(*SYNTH, "--out", "f", "--overwrite", cwd=tmp_path)
    assert_rejected(res, "--out", "'f'")
    assert (tmp_path / "f").read_text() == "hi"


def test_out_on_a_read_only_location(tmp_path, read_only):
    ro = read_only("ro")
    res = run_cli(*SYNTH, "--out", "ro/out", cwd=tmp_path, fresh=True)
    assert_rejected(res, "--out", "ro/out")
    assert list(ro.iterdir()) == []


def test_overwrite_a_read_only_out_leaves_no_copy(tmp_path, read_only):
    """The issue's case: the old output sits on a read-only mount; --overwrite used to build a
    complete hidden copy beside it and fail only when swapping it in."""
    run_cli(*SYNTH, "--out", "keep", cwd=tmp_path)
    before = snapshot(tmp_path / "keep")
    ro = read_only("ro", fill=lambda d: (d / "x").write_text("x"))
    for out in ("ro", "ro/x"):  # the mount point itself, and a file inside it
        res = run_cli(*SYNTH, "--out", out, "--overwrite", cwd=tmp_path, fresh=True)
        assert_rejected(res, "--out", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "ro"]  # no hidden .ro.tmp-* copy
    assert [p.name for p in ro.iterdir()] == ["x"] and snapshot(tmp_path / "keep") == before


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    src = _release(tmp_path / "rel")
    assert run_cli("prepare", "--format", "dealrec-release", "--input", src, "--out", "out",
                   cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "out")
    (src / "sequential_train.txt").write_text("1 1 99\n")  # an item beyond the title map
    res = run_cli("prepare", "--format", "dealrec-release", "--input", src, "--out", "out", "--overwrite",
                  cwd=tmp_path)
    assert_rejected(res, "sequential_train.txt", "99")
    assert snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rel"]
