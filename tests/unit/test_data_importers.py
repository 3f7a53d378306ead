"""Importers on small hand-made inputs (ground truth worked out by hand), bad inputs, and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from engine.data.prepare import PrepareConfig, prepare
from engine.data.schema import read_items, read_meta, read_samples, read_split, sample_files, validate_prepared
from engine.errors import ConfigError, DataError, UnsafePickleError


def _rows(table, *cols):
    return [tuple(r[c] for c in cols) for r in table.to_pylist()]


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


# ----------------------------------------------------------------------------- dealrec-release


def _write_release(root: Path, *, train="1 1 2 3\n2 4\n3 2 5 1\n", valid="1 5\n2\n3\n4 3\n",
                   test="1 4\n2 1 2\n3\n4 2\n", titles=None, categories=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequential_train.txt").write_text(train)
    (root / "sequential_valid.txt").write_text(valid)
    (root / "sequential_test.txt").write_text(test)
    if titles is None:  # '3' blank and '5' absent -> two placeholders; '6' never interacted
        titles = {"1": "A", "2": "B", "3": "  ", "4": "D", "6": "F"}
    np.save(root / "title_maps.npy", {"seqid2title": titles, "recid2title": {}, "item2title": {}})
    if categories:
        np.save(root / "category_map.npy", {"seqid2category": {"1": ["G", "PC"], "2": []}})
    return root


def test_release_by_hand(tmp_path):
    src = _write_release(tmp_path / "rel")
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="dealrec-release", input=str(src), out=str(out)))
    s = read_samples(out)
    # user 4 has no training line: dropped (no sample), but keeps cold valid/test rows
    assert _rows(s, "sample_id", "user_id", "history", "target") == [
        (0, "1", [0, 1], 2), (1, "2", [], 3), (2, "3", [1, 4], 0)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("1", [0, 1, 2], [4]), ("4", [], [2])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [
        ("1", [0, 1, 2, 4], [3]), ("2", [3], [0, 1]), ("4", [2], [1])]
    items = read_items(out)
    assert items.column("title").to_pylist() == ["A", "B", "<item 2>", "D", "<item 4>", "F"]
    assert items.column("category").to_pylist() == ["G > PC", None, None, None, None, None]
    c = summary["counts"]
    assert (c["samples"], c["items"], c["valid"], c["test"]) == (3, 6, 2, 3)
    assert (c["dropped_users"], c["placeholder_titles"], c["cold_valid"], c["cold_test"]) == (1, 2, 1, 1)
    assert c["interactions"] == {"train": 7, "valid": 2, "test": 4}
    meta = read_meta(out)
    assert meta["counts"] == c and meta["source_format"] == "dealrec-release"
    assert meta["input"] == str(src.resolve()) and meta["dealrec_version"]
    assert validate_prepared(out) == {"samples": 3, "items": 6, "valid": 2, "test": 3}


def test_release_without_category_map_has_null_categories(tmp_path):
    out = tmp_path / "out"
    prepare(PrepareConfig(format="dealrec-release", input=str(_write_release(tmp_path / "r", categories=False)),
                          out=str(out)))
    assert read_items(out).column("category").null_count == 6


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"valid": "1 5\n2 7\n"}, ["sequential_valid.txt", "line 2", "7", "unknown item id"]),
        ({"train": "1 1 2\n2 4 x3\n"}, ["sequential_train.txt", "line 2", "x3"]),
        ({"train": ""}, ["sequential_train.txt", "empty"]),
        ({"train": "1 1 2\n1 3\n"}, ["sequential_train.txt", "line 2", "twice"]),
        ({"test": "1 0\n"}, ["sequential_test.txt", "line 1", "1-based"]),
        ({"titles": {"1": "A", "x": "B"}}, ["title_maps.npy", "seqid2title", "x"]),
        ({"titles": {"1": "A", "2": 5}}, ["title_maps.npy", "seqid2title", "5"]),
    ],
)
def test_release_bad_input(tmp_path, kwargs, needles):
    src = _write_release(tmp_path / "rel", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(DataError) as ei:
        prepare(PrepareConfig(format="dealrec-release", input=str(src), out=str(out)))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))
    _no_leftovers(out)


def test_release_crafted_title_pickle_refused_runs_nothing(tmp_path):
    src = _write_release(tmp_path / "rel")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    np.save(src / "title_maps.npy", {"seqid2title": {"1": Evil()}}, allow_pickle=True)
    out = tmp_path / "out"
    with pytest.raises(UnsafePickleError) as ei:
        prepare(PrepareConfig(format="dealrec-release", input=str(src), out=str(out)))
    assert "title_maps.npy" in str(ei.value) and "system" in str(ei.value)
    assert not marker.exists()
    _no_leftovers(out)


def test_release_book_layout_names_missing_files(tmp_path):
    src = tmp_path / "book"
    src.mkdir()
    (src / "sequential_valid.txt").write_text("1 2\n")
    (src / "sequential_test.txt").write_text("1 3\n")
    np.save(src / "item_map.npy", {"a": 0})
    with pytest.raises(DataError) as ei:
        prepare(PrepareConfig(format="dealrec-release", input=str(src), out=str(tmp_path / "out")))
    assert "sequential_train.txt" in str(ei.value) and "title_maps.npy" in str(ei.value)
    _no_leftovers(tmp_path / "out")


def test_failure_keeps_existing_output_untouched(tmp_path):
    out = tmp_path / "out"
    prepare(PrepareConfig(format="dealrec-release", input=str(_write_release(tmp_path / "ok")), out=str(out)))
    before = sorted(p.name for p in out.rglob("*"))
    bad = _write_release(tmp_path / "bad", valid="1 99\n")
    with pytest.raises(DataError):
        prepare(PrepareConfig(format="dealrec-release", input=str(bad), out=str(out), overwrite=True))
    assert sorted(p.name for p in out.rglob("*")) == before


# ----------------------------------------------------------------------------- recbole

_INTER = [  # user, item, rating, timestamp (file order != time order on purpose)
    ("a", "10", 5, 1), ("b", "10", 3, 3), ("a", "20", 4, 2), ("b", "30", 5, 4), ("c", "20", 4, 5),
    ("a", "30", 5, 6), ("b", "20", 4, 7), ("c", "10", 5, 8), ("d", "40", 5, 9), ("c", "30", 4, 10),
]


def _write_recbole(root: Path, inter=None, item_lines=None, header=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    header = header or "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    rows = inter if inter is not None else [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in _INTER]
    (root / "x.inter").write_text("\n".join([header, *rows]) + "\n")
    if item_lines is None:  # item 30 has no row -> placeholder; 20 has no year
        item_lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                      "10\tAlpha\t1999\tAction Comedy", "20\tBeta\t\tDrama", "40\tDelta\t2001\t",
                      "50\tUnused\t2002\tDrama"]
    (root / "x.item").write_text("\n".join(item_lines) + "\n")
    return root


def test_recbole_by_hand(tmp_path):
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="recbole", input=str(_write_recbole(tmp_path / "rb")), out=str(out)))
    # ratings >= 4 kept: 9 of 10; time order a10 a20 b30 c20 a30 b20 c10 | d40 | c30 (cuts at 7 and 8)
    # items by sorted raw id 10,20,30,40 -> 0..3; users a,b,c,d; d has only a valid item (dropped)
    assert _rows(read_samples(out), "user_id", "history", "target") == [
        ("a", [0, 1], 2), ("b", [2], 1), ("c", [1], 0)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("d", [], [3])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [("c", [1, 0], [2])]
    items = read_items(out)
    assert items.column("title").to_pylist() == ["Alpha (1999)", "Beta", "<item 2>", "Delta (2001)"]
    assert items.column("category").to_pylist() == ["Action, Comedy", "Drama", None, None]
    c = summary["counts"]
    assert (c["samples"], c["dropped_users"], c["placeholder_titles"], c["valid"], c["test"]) == (3, 1, 1, 1, 1)
    assert (c["interactions_read"], c["interactions_kept"]) == (10, 9)
    assert c["interactions"] == {"train": 7, "valid": 1, "test": 1}
    validate_prepared(out)


def test_recbole_min_rating_zero_and_numeric_ids(tmp_path):
    rows = ["1\t5\t1\t3", "2\t5\t1\t1", "10\t7\t1\t2", "1\t7\t1\t4", "2\t7\t1\t5"]
    out = tmp_path / "out"
    prepare(PrepareConfig(format="recbole", input=str(_write_recbole(tmp_path / "rb", inter=rows)),
                          out=str(out), min_rating=0, split_ratio=(0.6, 0.2, 0.2)))
    # time order 2:5, 10:7, 1:5 | 1:7 | 2:7; users ordered numerically 1, 2, 10
    assert _rows(read_samples(out), "user_id", "history", "target") == [("1", [], 0), ("2", [], 0), ("10", [], 1)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("1", [0], [1])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [("2", [0], [1])]


def test_recbole_per_user_split(tmp_path):
    rows = [f"u\t{i}\t5\t{i}" for i in range(1, 11)] + ["v\t1\t5\t1", "v\t2\t5\t2", "v\t3\t5\t3"]
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="recbole", input=str(_write_recbole(tmp_path / "rb", inter=rows)),
                                    out=str(out), split="user"))
    # u: 10 items -> 8 train, 1 valid, 1 test; v: 3 items -> floor(0.3) = 0 valid/test, all train
    assert _rows(read_samples(out), "user_id", "history", "target") == [
        ("u", list(range(7)), 7), ("v", [0, 1], 2)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("u", list(range(8)), [8])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [("u", list(range(9)), [9])]
    assert summary["counts"]["dropped_users"] == 0


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"header": "user_id:token\titem_id:token\trating:float"}, ["x.inter", "timestamp"]),
        ({"inter": ["a\t1\t5\t1", "a\t2\t5\tabc"]}, ["x.inter", "timestamp", "line 3", "abc"]),
        ({"inter": ["a\t1\tfive\t1"]}, ["x.inter", "rating", "line 2", "five"]),
        ({"inter": ["a\t1\t5\t1", "a"]}, ["x.inter", "item_id", "line 3"]),
        ({"inter": []}, ["x.inter", "no interactions"]),
        ({"inter": ["a\t1\t1\t1", "b\t2\t2\t2"]}, ["x.inter", "rating", "min-rating"]),
        ({"header": "user_id\titem_id:token\trating:float\ttimestamp:float"}, ["x.inter", "header", "user_id"]),
        ({"item_lines": ["item_id:token\tyear:token", "1\t1999"]}, ["x.item", "title"]),
    ],
)
def test_recbole_bad_input(tmp_path, kwargs, needles):
    src = _write_recbole(tmp_path / "rb", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(DataError) as ei:
        prepare(PrepareConfig(format="recbole", input=str(src), out=str(out)))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))
    _no_leftovers(out)


def test_recbole_empty_file(tmp_path):
    src = tmp_path / "rb"
    src.mkdir()
    (src / "y.inter").write_text("")
    with pytest.raises(DataError, match="empty file"):
        prepare(PrepareConfig(format="recbole", input=str(src), out=str(tmp_path / "out")))


# ----------------------------------------------------------------------------- amazon

_REVIEWS = [  # reviewer, asin, overall, time; written shuffled
    ("U1", "B1", 5.0, 1), ("U1", "B2", 4.0, 2), ("U2", "B1", 2.0, 3), ("U2", "B3", 4.0, 4), ("U1", "B3", 5.0, 5),
    ("U2", "B2", 5.0, 6), ("U3", "B1", 4.0, 7), ("U3", "B2", 4.0, 8), ("U1", "B1", 5.0, 9), ("U3", "B3", 1.0, 10),
]


def _write_amazon(root: Path, *, gz: bool, reviews=None, meta=None) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    if reviews is None:
        order = [3, 0, 9, 5, 1, 7, 2, 8, 4, 6]
        reviews = [json.dumps({"reviewerID": u, "asin": a, "overall": r, "unixReviewTime": t, "summary": "ok"})
                   for u, a, r, t in (_REVIEWS[i] for i in order)]
    if meta is None:
        meta = [json.dumps({"asin": "B1", "title": "Book One", "categories": [["Books", "Fiction"], ["Other"]]}),
                "{'asin': 'B2', 'title': 'Book Two', 'category': ['Books', 'Mystery']}",  # 2014 Python literal
                json.dumps({"asin": "B3", "price": 3.5})]
    suffix = ".json.gz" if gz else ".json"
    rp, mp = root / f"reviews_X{suffix}", root / f"meta_X{suffix}"
    for p, lines in ((rp, reviews), (mp, meta)):
        data = ("\n".join(lines) + "\n").encode()
        p.write_bytes(gzip.compress(data) if gz else data)
    return rp, mp


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_by_hand(tmp_path, gz):
    rp, mp = _write_amazon(tmp_path / "amz", gz=gz)
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="amazon", input=str(rp), meta=str(mp), out=str(out)))
    # kept (>= 4), time order: U1B1 U1B2 U2B3 U1B3 U2B2 U3B1 | U3B2 | U1B1 (cuts at int(6.4)=6, int(7.2)=7)
    assert _rows(read_samples(out), "user_id", "history", "target") == [
        ("U1", [0, 1], 2), ("U2", [2], 1), ("U3", [], 0)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("U3", [0], [1])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [("U1", [0, 1, 2], [0])]
    items = read_items(out)
    assert items.column("title").to_pylist() == ["Book One", "Book Two", "<item 2>"]
    assert items.column("category").to_pylist() == ["Books > Fiction", "Books > Mystery", None]
    c = summary["counts"]
    assert (c["samples"], c["dropped_users"], c["placeholder_titles"], c["interactions_kept"]) == (3, 0, 1, 8)
    validate_prepared(out)


def test_amazon_folder_input(tmp_path):
    _write_amazon(tmp_path / "amz", gz=True)
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="amazon", input=str(tmp_path / "amz"), out=str(out)))
    assert summary["counts"]["samples"] == 3


@pytest.mark.parametrize(
    "reviews, needles",
    [
        (['{"reviewerID": "U1", "asin": "B1", "overall": 5, "unixReviewTime": 1}', "{not json"],
         ["reviews_X.json", "line 2", "not json"]),
        (['{"reviewerID": "U1", "asin": "B1", "unixReviewTime": 1}'], ["reviews_X.json", "overall", "line 1"]),
        (['{"reviewerID": "U1", "asin": "B1", "overall": "great", "unixReviewTime": 1}'],
         ["reviews_X.json", "line 1", "great"]),
        ([], ["reviews_X.json", "empty"]),
    ],
)
def test_amazon_bad_input(tmp_path, reviews, needles):
    rp, mp = _write_amazon(tmp_path / "amz", gz=False, reviews=reviews)
    out = tmp_path / "out"
    with pytest.raises(DataError) as ei:
        prepare(PrepareConfig(format="amazon", input=str(rp), meta=str(mp), out=str(out)))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))
    _no_leftovers(out)


def test_amazon_needs_meta(tmp_path):
    rp, _ = _write_amazon(tmp_path / "amz", gz=False)
    with pytest.raises(DataError, match="--meta"):
        prepare(PrepareConfig(format="amazon", input=str(rp), out=str(tmp_path / "out")))


# ----------------------------------------------------------------------------- config, corrupt Parquet, CLI


def test_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as ei:
        PrepareConfig(format="csv", out="", min_rating=-1, split="random", split_ratio=(0.5, 0.5, 0.5),
                      users=0, seed=-3)
    assert len(ei.value.problems) >= 6
    with pytest.raises(ConfigError) as ei:
        PrepareConfig(format="recbole", out=str(tmp_path / "o"), users=10)
    text = str(ei.value)
    assert "input is required" in text and "--users" in text


def test_config_refuses_non_empty_out_without_overwrite(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite"):
        PrepareConfig(format="synthetic", out=str(tmp_path / "o"))


def test_corrupt_parquet_is_a_data_error(tmp_path):
    out = tmp_path / "out"
    prepare(PrepareConfig(format="dealrec-release", input=str(_write_release(tmp_path / "rel")), out=str(out)))
    sample_files(out)[0].write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="part-00000"):
        read_samples(out)
    (out / "items.parquet").write_bytes(pickle.dumps("nope"))
    with pytest.raises(DataError, match="items.parquet"):
        validate_prepared(out)


def test_cli_prepare_ok_and_bad_input(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    assert main(["prepare", "--format", "dealrec-release", "--input", str(_write_release(tmp_path / "r")),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples 3" in printed and "dropped users (no training item) 1" in printed and str(out) in printed
    assert "placeholder titles 2" in printed
    assert validate_prepared(out)["samples"] == 3
    bad = _write_release(tmp_path / "bad", valid="1 42\n")
    out2 = tmp_path / "out2"
    assert main(["prepare", "--format", "dealrec-release", "--input", str(bad), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "sequential_valid.txt" in err and "42" in err
    _no_leftovers(out2)
    # a config problem is exit 2 too, with every problem listed
    assert main(["prepare", "--format", "recbole", "--out", str(out2), "--min-rating", "-1"]) == 2
    err = capsys.readouterr().err
    assert "input is required" in err and "min_rating" in err
