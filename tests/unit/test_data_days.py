"""Days of data (#21 item 3): ``--until`` cut-offs of timestamped importers and the seeded
simulated yesterday of a prepared folder. Hand-made inputs; MovieLens-100K where present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.data.prepare import PrepareConfig, parse_until, prepare
from engine.data.schema import ITEMS_FILE, read_items, read_meta, read_samples, read_split, validate_prepared
from engine.errors import ConfigError
from engine.samplekey import table_keys


def _rows(table, *cols):
    return [tuple(r[c] for c in cols) for r in table.to_pylist()]


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# (user, item, rating, time): the hand-made RecBole set of test_data_importers
_INTER = [
    ("a", "10", 5, 1), ("b", "10", 3, 3), ("a", "20", 4, 2), ("b", "30", 5, 4), ("c", "20", 4, 5),
    ("a", "30", 5, 6), ("b", "20", 4, 7), ("c", "10", 5, 8), ("d", "40", 5, 9), ("c", "30", 4, 10),
]


def _write_recbole(root: Path, rows=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = _INTER if rows is None else rows
    (root / "x.inter").write_text("\n".join(["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                                             *(f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows)]) + "\n")
    (root / "x.item").write_text("item_id:token\tmovie_title:token_seq\n10\tAlpha\n20\tBeta\n30\tGamma\n40\tDelta\n")
    return root


# ----------------------------------------------------------------------------- --until


def test_parse_until_forms():
    assert parse_until("1998-03-01")[:2] == (888796800.0, False)  # the next midnight, UTC; strict <
    assert parse_until("888796800")[:2] == (888796800.0, True)
    assert parse_until(12.5)[:2] == (12.5, True)
    for bad in ("1998-13-01", "1998-02-30", "yesterday", "nan", "inf", "1998/03/01", "", True):
        with pytest.raises(ValueError):
            parse_until(bad)


def test_until_drops_later_interactions_before_filtering_and_splitting(tmp_path):
    src = _write_recbole(tmp_path / "rb")
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(format="recbole", input=str(src), out=str(out), until="6",
                                    split_ratio=(0.6, 0.2, 0.2)))
    # t <= 6: a10 a20 (b10 rated 3) b30 c20 a30 -> 5 rated; cuts int(3.0)=3, int(4.0)=4:
    # train a10 a20 b30 | valid c20 | test a30. The catalogue is every rated item of the input
    # (10, 20, 30, 40 -> 0..3), 40 not seen yet.
    assert _rows(read_samples(out), "user_id", "history", "target") == [("a", [0], 1), ("b", [], 2)]
    assert _rows(read_split(out, "valid"), "user_id", "history", "targets") == [("c", [], [1])]
    assert _rows(read_split(out, "test"), "user_id", "history", "targets") == [("a", [0, 1], [2])]
    assert read_items(out).column("title").to_pylist() == ["Alpha", "Beta", "Gamma", "Delta"]
    c = summary["counts"]
    assert (c["interactions_read"], c["interactions_after_until"], c["interactions_kept"]) == (10, 4, 5)
    assert c["items_unseen_until"] == 1
    meta = read_meta(out)
    assert meta["config"]["until"] == "6"
    assert meta["until"]["rule"] == "timestamp <= 6" and meta["until"]["last_kept_timestamp"] == 6.0
    validate_prepared(out)
    # the same catalogue as the input prepared whole: item ids are comparable across cut-offs
    full = tmp_path / "full"
    prepare(PrepareConfig(format="recbole", input=str(src), out=str(full)))
    assert read_items(full).equals(read_items(out))
    assert "until" not in read_meta(full) and "until" not in read_meta(full)["config"]


def test_until_date_keeps_the_whole_day_utc(tmp_path):
    end = 888796800  # 1998-03-02T00:00:00Z
    rows = [("u", "1", 5, end - 100), ("u", "2", 5, end - 1), ("u", "3", 5, end), ("v", "1", 5, end - 50),
            ("v", "2", 5, end + 10)]
    out = tmp_path / "out"
    s = prepare(PrepareConfig(format="recbole", input=str(_write_recbole(tmp_path / "rb", rows)), out=str(out),
                              until="1998-03-01", split="user"))
    assert s["counts"]["interactions_kept"] == 3 and s["counts"]["interactions_after_until"] == 2
    assert s["until"]["inclusive"] is False and s["until"]["bound"] == end
    assert _rows(read_samples(out), "user_id", "history", "target") == [("u", [0], 1), ("v", [], 0)]


def test_until_on_amazon(tmp_path):
    rows = [("U1", "B1", 5.0, 1), ("U1", "B2", 4.0, 2), ("U2", "B1", 4.0, 3), ("U1", "B3", 5.0, 9)]
    rp, mp = tmp_path / "reviews.json", tmp_path / "meta.json"
    rp.write_text("".join(json.dumps({"reviewerID": u, "asin": a, "overall": r, "unixReviewTime": t}) + "\n"
                          for u, a, r, t in rows))
    mp.write_text("".join(json.dumps({"asin": a, "title": f"T{a}"}) + "\n" for a in ("B1", "B2", "B3")))
    out = tmp_path / "out"
    s = prepare(PrepareConfig(format="amazon", input=str(rp), meta=str(mp), out=str(out), until=3, split="user"))
    assert _rows(read_samples(out), "user_id", "history", "target") == [("U1", [0], 1), ("U2", [], 0)]
    assert s["counts"]["interactions_after_until"] == 1 and s["counts"]["items"] == 3  # B3 in the catalogue


@pytest.mark.parametrize("extra, needles", [
    (["--until", "1998-13-01"], ["until='1998-13-01'", "month must be in 1..12"]),
    (["--until", "yesterday"], ["until='yesterday'", "YYYY-MM-DD"]),
    (["--until", "nan"], ["until='nan'", "unix timestamp"]),
    (["--until", "1e999"], ["until='1e999'", "finite"]),
    (["--until", "0"], ["until='0'", "before every interaction", "x.inter", "later cut-off"]),
    (["--until", "-5"], ["until='-5'", "before every interaction"]),
])
def test_bad_until_is_one_message_exit_2_nothing_written(tmp_path, capsys, extra, needles):
    from jobs.cli import main

    src = _write_recbole(tmp_path / "rb")
    out = tmp_path / "out"
    assert main(["prepare", "--format", "recbole", "--input", str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("dealrec prepare: error: ")
    assert len(err.strip().splitlines()) == 2  # "invalid PrepareConfig (1 problem(s)):" and the problem
    for n in needles:
        assert n in err, (n, err)
    _no_leftovers(out)


def test_until_with_no_rated_interaction_by_then(tmp_path, capsys):
    from jobs.cli import main

    src = _write_recbole(tmp_path / "rb", [("a", "10", 3, 1), ("a", "20", 5, 5), ("b", "20", 5, 6)])
    out = tmp_path / "out"
    assert main(["prepare", "--format", "recbole", "--input", str(src), "--out", str(out), "--until", "2"]) == 2
    err = capsys.readouterr().err
    assert "until='2'" in err and "no interaction rated >= 4.0" in err and "Traceback" not in err
    _no_leftovers(out)


def test_until_refused_for_formats_without_timestamps(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    assert main(["prepare", "--format", "synthetic", "--users", "20", "--items", "5", "--until", "1998-03-01",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "until='1998-03-01'" in err and "only applies to the timestamped formats recbole and amazon" in err
    _no_leftovers(out)
    rel = tmp_path / "rel"
    rel.mkdir()
    with pytest.raises(ConfigError, match="simulate-yesterday"):
        PrepareConfig(format="dealrec-release", input=str(rel), out=str(out), until="5")


# ----------------------------------------------------------------------------- simulate-yesterday


def _write_release(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequential_train.txt").write_text("1 1 2 3\n2 4\n3 2 5 1\n")
    (root / "sequential_valid.txt").write_text("1 5\n2\n3\n4 3\n")
    (root / "sequential_test.txt").write_text("1 4\n2 1 2\n3\n4 2\n")
    np.save(root / "title_maps.npy", {"seqid2title": {str(i): f"T{i}" for i in range(1, 6)}})
    return root


def test_simulated_yesterday_by_hand(tmp_path):
    today = tmp_path / "today"
    prepare(PrepareConfig(format="dealrec-release", input=str(_write_release(tmp_path / "rel")), out=str(today)))
    assert _rows(read_samples(today), "user_id", "history", "target") == [
        ("1", [0, 1], 2), ("2", [], 3), ("3", [1, 4], 0)]
    y = tmp_path / "y"
    s = prepare(PrepareConfig(format="simulate-yesterday", input=str(today), out=str(y), new_user_share=0))
    # every training sequence loses its last item; user 2 (one item) has none left
    assert _rows(read_samples(y), "sample_id", "user_id", "history", "target") == [
        (0, "1", [0], 1), (1, "3", [1], 4)]
    # valid history = training sequence, test history = training + valid: the same item removed
    assert _rows(read_split(y, "valid"), "user_id", "history", "targets") == [("1", [0, 1], [4]), ("4", [], [2])]
    assert _rows(read_split(y, "test"), "user_id", "history", "targets") == [
        ("1", [0, 1, 4], [3]), ("2", [], [0, 1]), ("4", [2], [1])]
    assert (today / ITEMS_FILE).read_bytes() == (y / ITEMS_FILE).read_bytes()
    c = s["counts"]
    assert (c["samples"], c["dropped_users"], c["held_back_users"], c["cold_valid"], c["cold_test"]) == (2, 1, 0, 1, 2)
    assert c["interactions"] == {"train": 4, "valid": 2, "test": 4}
    assert s["simulation"]["today"]["source_format"] == "dealrec-release" and s["seed"] == 0
    validate_prepared(y)


@pytest.fixture(scope="module")
def synth_today(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "today"
    prepare(PrepareConfig(format="synthetic", users=400, items=60, out=str(out), seed=3))
    return out


def _yesterday(today: Path, out: Path, share: float, seed: int) -> Path:
    prepare(PrepareConfig(format="simulate-yesterday", input=str(today), out=str(out), new_user_share=share,
                          seed=seed))
    return out


def test_simulated_yesterday_rule_and_seed(synth_today, tmp_path):
    today = read_samples(synth_today).to_pandas().set_index("user_id")
    y = _yesterday(synth_today, tmp_path / "y0", 0.1, seed=0)
    yd = read_samples(y).to_pandas().set_index("user_id")
    assert read_items(y).equals(read_items(synth_today))
    # every kept user: yesterday's history + target == today's history (one item shorter)
    for u, r in yd.iterrows():
        assert list(r["history"]) + [r["target"]] == list(today.loc[u, "history"])
    single = {u for u, r in today.iterrows() if len(r["history"]) == 0}
    absent = set(today.index) - set(yd.index)
    # the rule: round(share * n) users drawn by default_rng(seed) over today's samples in id order
    n = len(today)
    held = set(today.index[np.random.default_rng(0).choice(n, size=round(0.1 * n), replace=False)])
    assert len(held) == 40 and absent == held | single and single
    assert not set(yd.index) - set(today.index)  # no user appears only yesterday
    meta = read_meta(y)
    assert meta["simulation"]["held_back_users"] == 40 and meta["counts"]["dropped_users"] == len(single - held)
    for split in ("valid", "test"):  # held-back users have no valid/test row yesterday
        assert not held & set(read_split(y, split).column("user_id").to_pylist())
    validate_prepared(y)
    # deterministic for a seed; another seed holds back other users
    y_again = _yesterday(synth_today, tmp_path / "y0b", 0.1, seed=0)
    for part in ("samples", "valid.parquet", "test.parquet", ITEMS_FILE):
        a, b = Path(y) / part, Path(y_again) / part
        files = sorted(a.glob("*.parquet")) if a.is_dir() else [a]
        assert [f.read_bytes() for f in files] == [(b / f.name if a.is_dir() else b).read_bytes() for f in files]
    y1 = read_samples(_yesterday(synth_today, tmp_path / "y1", 0.1, seed=1)).column("user_id").to_pylist()
    assert set(y1) != set(yd.index)


def test_simulated_days_share_user_identity_and_keys(synth_today, tmp_path):
    """Sample keys of the two folders: no kept user's key is unchanged (each gained an item),
    and yesterday's sample of user u is today's with the last item removed, by user id."""
    y = _yesterday(synth_today, tmp_path / "y", 0.05, seed=0)
    t_s, y_s = read_samples(synth_today), read_samples(y)
    kt = dict(zip(t_s.column("user_id").to_pylist(), table_keys(t_s).tolist()))
    ky = dict(zip(y_s.column("user_id").to_pylist(), table_keys(y_s).tolist()))
    assert set(ky) <= set(kt)
    assert all(ky[u] != kt[u] for u in ky)
    assert len(set(ky.values()) & set(kt.values())) == 0


def test_simulated_yesterday_with_idle_users(synth_today, tmp_path):
    """changed_user_share < 1: the other users are yesterday exactly as today (same key)."""
    y = tmp_path / "y"
    s = prepare(PrepareConfig(format="simulate-yesterday", input=str(synth_today), out=str(y), new_user_share=0.05,
                              changed_user_share=0.3, seed=0))
    t_s, y_s = read_samples(synth_today), read_samples(y)
    kt = dict(zip(t_s.column("user_id").to_pylist(), table_keys(t_s).tolist()))
    ky = dict(zip(y_s.column("user_id").to_pylist(), table_keys(y_s).tolist()))
    today = {r["user_id"]: r for r in t_s.to_pylist()}
    same = {u for u in ky if ky[u] == kt[u]}
    c = s["counts"]
    assert c["held_back_users"] == 20 and c["changed_users"] == round(0.3 * 380)
    assert len(same) == c["unchanged_users"] == 380 - c["changed_users"]
    for r in y_s.to_pylist():
        if r["user_id"] not in same:
            assert r["history"] + [r["target"]] == today[r["user_id"]]["history"]
    for split in ("valid", "test"):
        ty = {r["user_id"]: r for r in read_split(synth_today, split).to_pylist()}
        for r in read_split(y, split).to_pylist():
            if r["user_id"] in same:
                assert r == ty[r["user_id"]]
            elif r["user_id"] in kt:
                assert len(r["history"]) == len(ty[r["user_id"]]["history"]) - 1
    validate_prepared(y)


def test_simulate_bad_config(tmp_path, synth_today, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    raw = tmp_path / "raw"
    raw.mkdir()
    for extra, needle in ((["--input", str(raw)], "not a prepared dealrec folder"),
                          (["--input", str(synth_today), "--new-user-share", "1.5"], "new_user_share=1.5"),
                          (["--input", str(synth_today), "--changed-user-share", "-0.1"], "changed_user_share=-0.1"),
                          (["--input", str(synth_today), "--split-ratio", "0.8", "0.1", "0.1"], "split_ratio")):
        assert main(["prepare", "--format", "simulate-yesterday", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        _no_leftovers(out)
    with pytest.raises(ConfigError, match="new-user-share only applies"):
        PrepareConfig(format="synthetic", out=str(out), new_user_share=0.1)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_movielens_two_cutoffs_a_week_apart(movielens_dir, tmp_path):
    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    s0 = prepare(PrepareConfig(format="recbole", input=str(movielens_dir), out=str(d0), until="1998-03-01"))
    s1 = prepare(PrepareConfig(format="recbole", input=str(movielens_dir), out=str(d1), until="1998-03-08"))
    inter = pd.read_csv(movielens_dir / "ml-100k.inter", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    for s, day_end in ((s0, 888796800), (s1, 889401600)):  # ends of 1998-03-01 and 1998-03-08, UTC
        kept = inter[(inter.timestamp < day_end) & (inter.rating >= 4)]
        assert s["counts"]["interactions_kept"] == len(kept)
        assert s["counts"]["interactions_after_until"] == int((inter.timestamp >= day_end).sum())
        assert s["until"]["last_kept_timestamp"] == kept.timestamp.max()
    assert s0["counts"]["interactions_kept"] < s1["counts"]["interactions_kept"]
    # one catalogue for both days (and the whole input): 1,447 movies rated >= 4
    assert read_items(d0).equals(read_items(d1)) and read_items(d0).num_rows == 1447
    # same user ids; keys equal exactly where (user, history, target) is equal
    a, b = read_samples(d0), read_samples(d1)
    ka = dict(zip(a.column("user_id").to_pylist(), table_keys(a).tolist()))
    kb = dict(zip(b.column("user_id").to_pylist(), table_keys(b).tolist()))
    ra = {r["user_id"]: (tuple(r["history"]), r["target"]) for r in a.to_pylist()}
    rb = {r["user_id"]: (tuple(r["history"]), r["target"]) for r in b.to_pylist()}
    both = set(ra) & set(rb)
    assert len(both) > 500
    same = {u for u in both if ra[u] == rb[u]}
    assert {u for u in both if ka[u] == kb[u]} == same
    assert 0 < len(same) < len(both)  # some users unchanged over the week, some not
    validate_prepared(d0)
