"""Importers on the real data sets in ../shared/data (skipped where absent)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from engine.data.prepare import PrepareConfig, prepare
from engine.data.safe_pickle import load_npy_object
from engine.data.schema import read_items, read_samples, read_split, validate_prepared
from engine.errors import DataError

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def games(games_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("games") / "prepared"
    t0 = time.perf_counter()
    summary = prepare(PrepareConfig(format="dealrec-release", input=str(games_dir), out=str(out)))
    summary["_wall"] = time.perf_counter() - t0
    return out, summary


def test_games_counts(games):
    out, summary = games
    assert summary["_wall"] < 20
    assert validate_prepared(out) == {"samples": 49156, "items": 17332, "valid": 9609, "test": 8696}
    c = summary["counts"]
    assert c["interactions"] == {"train": 299987, "valid": 22609, "test": 19733}
    assert c["dropped_users"] == 0 and c["placeholder_titles"] == 0
    assert c["release_placeholder_titles"] == 19  # the authors' own "title_{recid}" stand-ins
    titles = read_items(out).column("title").to_pylist()
    assert all(t and not t.startswith("<item ") for t in titles)


def test_games_matches_the_released_dicts(games, games_dir):
    """Samples/splits agree with training_dict/validation_dict/testing_dict (0-based ids)."""
    out, _ = games
    train = load_npy_object(games_dir / "training_dict.npy")
    valid = load_npy_object(games_dir / "validation_dict.npy")
    test = load_npy_object(games_dir / "testing_dict.npy")
    tmaps = load_npy_object(games_dir / "title_maps.npy")
    s = read_samples(out).to_pylist()
    for r in s[:: 97]:  # every 97th user
        u = int(r["user_id"]) - 1  # seqid (1-based) -> dict key (0-based)
        assert r["history"] + [r["target"]] == train[u]
    items = read_items(out).column("title").to_pylist()
    assert items == [tmaps["seqid2title"][str(i + 1)].strip() for i in range(len(items))]
    # recid2title (0-based) agrees too, except the authors' "title_{n}" stand-ins, numbered differently
    assert all(items[i] == t.strip() for i, t in tmaps["recid2title"].items() if not t.startswith("title_"))
    for split, d, prev in (("valid", valid, [train]), ("test", test, [train, valid])):
        rows = read_split(out, split).to_pylist()
        assert len(rows) == sum(1 for v in d.values() if v)
        for r in rows[:: 53]:
            u = int(r["user_id"]) - 1
            assert r["targets"] == d[u]
            assert r["history"] == [i for p in prev for i in p[u]]


def test_book_partial_layout_is_refused_with_the_missing_files(shared_data, tmp_path):
    src = shared_data / "book-partial"
    if not (src / "sequential_valid.txt").exists():
        pytest.skip(f"book-partial not found at {src}")
    with pytest.raises(DataError) as ei:
        prepare(PrepareConfig(format="dealrec-release", input=str(src), out=str(tmp_path / "out")))
    assert "sequential_train.txt" in str(ei.value) and "title_maps.npy" in str(ei.value)
    assert not (tmp_path / "out").exists()


def _independent_split(inter: pd.DataFrame, min_rating: float, mode: str) -> dict:
    """A plain pandas re-implementation of the split, to check the importer's counts."""
    df = inter[inter.rating >= min_rating].reset_index(drop=True)
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    if mode == "global":
        n = len(df)
        df["split"] = np.where(df.index < int(n * 0.8), 0, np.where(df.index < int(n * 0.9), 1, 2))
    else:
        df["rank"] = df.groupby("user_id").cumcount()
        size = df.groupby("user_id")["item_id"].transform("size")
        n_eval = (size * 0.1 + 1e-9).astype(int)
        df["split"] = np.where(df["rank"] < size - 2 * n_eval, 0, np.where(df["rank"] < size - n_eval, 1, 2))
    users = df.user_id.unique()
    return {
        "samples": df[df.split == 0].user_id.nunique(),
        "items": df.item_id.nunique(),
        "valid": df[df.split == 1].user_id.nunique(),
        "test": df[df.split == 2].user_id.nunique(),
        "dropped": len(users) - df[df.split == 0].user_id.nunique(),
    }


@pytest.mark.parametrize("min_rating, mode", [(4, "global"), (0, "global"), (0, "user"), (4, "user")])
def test_movielens_counts(movielens_dir, tmp_path, min_rating, mode):
    inter = pd.read_csv(movielens_dir / "ml-100k.inter", sep="\t")
    inter.columns = ["user_id", "item_id", "rating", "timestamp"]
    expect = _independent_split(inter, min_rating, mode)
    out = tmp_path / "ml"
    summary = prepare(PrepareConfig(format="recbole", input=str(movielens_dir), out=str(out),
                                    min_rating=min_rating, split=mode))
    got = validate_prepared(out)
    assert got == {k: expect[k] for k in ("samples", "items", "valid", "test")}
    assert summary["counts"]["dropped_users"] == expect["dropped"]
    assert summary["counts"]["placeholder_titles"] == 0
    if mode == "user" and min_rating == 0:
        assert got["samples"] == 943  # every MovieLens user, only without the rating filter and per-user split
    if mode == "global" and min_rating == 4:
        # the paper's protocol: fewer samples than users, many users only in the last 20% of time
        assert got["samples"] < 943 and summary["counts"]["dropped_users"] > 0


def test_games_simulated_yesterday(games, tmp_path):
    """The DEALRec release has no timestamps: a seeded simulated yesterday of it (#21 item 3)."""
    out, _ = games
    y = tmp_path / "yesterday"
    s = prepare(PrepareConfig(format="simulate-yesterday", input=str(out), out=str(y), seed=0))
    c = s["counts"]
    assert c["users_today"] == 49156 and c["held_back_users"] == 2458  # round(0.05 * 49156)
    assert c["samples"] == 49156 - 2458 - c["dropped_users"] and c["dropped_users"] > 0
    assert (out / "items.parquet").read_bytes() == (y / "items.parquet").read_bytes()
    today = {r["user_id"]: r for r in read_samples(out).to_pylist()}
    for r in read_samples(y).to_pylist()[::101]:
        assert r["history"] + [r["target"]] == today[r["user_id"]]["history"]
    validate_prepared(y)
