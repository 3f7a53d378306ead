"""Seeded synthetic recommendation data with titles, from a tiny demo set to Book scale and beyond.

The generator mimics what matters to DEALRec (see docs/method.md#samples):

* **Catalogue.** Items belong to latent categories (``"Games > Racing"``); inside a
  category items form short *series* that share a title stem and are numbered
  (``"Crimson Nitro Racer 1"``, ``"Crimson Nitro Racer 2"``). Title words depend on
  the category, so titles carry signal a text model can use. Item popularity follows
  a Zipf law (weight ``rank^-0.8``, ranks shuffled over items); the DEALRec Book
  valid/test splits (``../shared/data/book-partial``) give a fitted slope of about
  -0.5 on the head and the top 10% of items take 56% of interactions, which this
  roughly matches.
* **Users.** Sequence lengths are ``min_len + floor(lognormal)`` with the requested mean
  (heavy-tailed, like real activity; Book's mean is 60.1 per user). Each user has 1-4
  favourite categories. A sequence is a run of *segments*: at each step the user leaves
  the current category with probability 0.2 (to a favourite, or with probability 0.1
  anywhere); inside a segment the next item continues the series being read with
  probability 0.35 (the next slot of the category), else is a popularity draw from the
  category. So the next item is predictable from the recent ones: sequential
  structure a SASRec surrogate can learn.
* **Time.** One global timeline ``[0, 1)``; a user starts at a uniform time in
  ``[0, max_start)`` and is active over an exponential span (demo preset: max_start 0.5,
  mean span 0.3; book: 0.4 and 0.6, long-lived readers). The split is the paper's global 8:1:1 by time: cut points
  are the 80% / 90% quantiles of all timestamps (to 2^-16 of the timeline, from a
  streaming histogram), so most users have no valid/test items and users who start
  late have no training item (dropped and counted, as for real data).

Streaming: users are generated in fixed chunks of ``CHUNK_USERS`` with a random
generator seeded by ``(seed, chunk index)``; a first pass draws only the timestamps
(to find the cut points), the second redraws the same chunks and writes them through
:class:`engine.data.writer.PreparedWriter`. Memory is bounded by one chunk, not by the
number of interactions. The same seed gives byte-identical files (chunk size and file
layout are fixed by the config, never by the machine).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.data.layout import META_FILE
from engine.data.writer import PreparedWriter, atomic_dir
from engine.data.segments import add_counts, write_user_segments

__all__ = ["CHUNK_USERS", "SyntheticSpec", "generate_synthetic", "make_catalog"]

CHUNK_USERS = 4096
_HIST_BINS = 1 << 16

_ADJECTIVES = (
    "Crimson Silent Golden Hidden Broken Electric Frozen Burning Lost Savage Velvet Iron Hollow Lunar Scarlet "
    "Midnight Ancient Wild Shattered Emerald Silver Obsidian Radiant Forgotten Bitter Gentle Restless Copper "
    "Azure Phantom Crystal Distant Fallen Northern Secret Stormy Wandering Quiet Bright Cobalt Amber Neon "
    "Hollowed Savage Twilight Eternal Final Brave"
).split()
_NOUNS = (
    "Empire Legacy Chronicles Protocol Horizon Odyssey Saga Frontier Gambit Requiem Circuit Covenant Echo "
    "Harbor Kingdom Labyrinth Meridian Paradox Quest Rebellion Sanctuary Tides Vanguard Voyage Whisper Dominion "
    "Reckoning Awakening Crossing Dynasty Garden Lantern Mirage Oath Pilgrim Relic Summit Tempest Throne Vault "
    "Archive Beacon Cascade Citadel Drift Ember Fable"
).split()
# (top level, sub category, theme words used in titles)
_GENRES = (
    ("Games", "Racing", ("Racer", "Nitro", "Turbo", "Rally")),
    ("Games", "Space Shooter", ("Galaxy", "Star", "Nebula", "Orbit")),
    ("Games", "Fantasy RPG", ("Dragon", "Sword", "Wizard", "Rune")),
    ("Games", "Puzzle", ("Puzzle", "Block", "Tile", "Riddle")),
    ("Games", "Sports", ("Soccer", "Slam", "League", "Goal")),
    ("Games", "Strategy", ("Tactics", "Siege", "Legion", "Warfront")),
    ("Books", "Science Fiction", ("Android", "Quantum", "Colony", "Starship")),
    ("Books", "Mystery", ("Murder", "Detective", "Alibi", "Clue")),
    ("Books", "Romance", ("Heart", "Kiss", "Bride", "Summer")),
    ("Books", "History", ("Empire", "Crown", "Revolution", "War")),
    ("Books", "Cooking", ("Kitchen", "Recipe", "Bread", "Spice")),
    ("Books", "Children", ("Bunny", "Teddy", "Pirate", "Giant")),
    ("Books", "Self-Help", ("Habit", "Mindset", "Success", "Focus")),
    ("Books", "Horror", ("Ghost", "Curse", "Shadow", "Crypt")),
    ("Books", "Travel", ("Road", "Island", "Passport", "Journey")),
    ("Music", "Jazz", ("Blue", "Swing", "Saxophone", "Groove")),
    ("Music", "Rock", ("Thunder", "Guitar", "Riot", "Amp")),
    ("Music", "Classical", ("Sonata", "Symphony", "Concerto", "Prelude")),
    ("Music", "Electronic", ("Synth", "Pulse", "Bass", "Laser")),
    ("Movies", "Western", ("Outlaw", "Canyon", "Sheriff", "Saddle")),
    ("Movies", "Documentary", ("Planet", "Ocean", "Wildlife", "Earth")),
    ("Movies", "Animation", ("Robot", "Kitten", "Toy", "Cloud")),
    ("Movies", "Thriller", ("Agent", "Cipher", "Hostage", "Target")),
    ("Movies", "Comedy", ("Wedding", "Party", "Holiday", "Roommate")),
)
_PLACES = "Avalon Brightwater Caldera Dunmore Eastvale Farrow Glenhaven Highmoor Ironwood Juniper Kestrel".split()


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters (sizes from the config; shape parameters from the preset)."""

    users: int
    items: int
    interactions_per_user: float
    seed: int = 0
    zipf: float = 0.8
    p_switch: float = 0.2
    p_explore: float = 0.1
    p_series: float = 0.35
    lifetime: float = 0.15
    length_sigma: float = 0.8
    max_start: float = 0.85
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)

    @property
    def n_categories(self) -> int:
        return int(max(2, min(self.items // 2, round(0.6 * math.sqrt(self.items)))))

    @property
    def min_len(self) -> int:
        return int(max(1, min(5, int(self.interactions_per_user) // 2)))

    @property
    def max_len(self) -> int:
        return int(max(10, 30 * self.interactions_per_user))


_PRESET_SHAPE = {
    # Calibrated so that (almost) every user has a training item, as in the released data,
    # while about a third (demo) / half (book) of the users have valid items
    # (Games: 20%, Book: 57%).
    "demo": {"lifetime": 0.3, "max_start": 0.5, "length_sigma": 0.8},
    "book": {"lifetime": 0.6, "max_start": 0.4, "length_sigma": 1.1},  # long-lived, heavy-tailed readers
}


@dataclass
class Catalog:
    """Items laid out in *slots*: categories are contiguous slot ranges, series contiguous inside."""

    titles: list[str]
    categories: list[str]
    slot_item: np.ndarray  # slot -> item id
    cat_start: np.ndarray  # category -> first slot
    cat_size: np.ndarray  # category -> number of slots
    cdf: np.ndarray  # slot -> category index + within-category popularity CDF (in (c, c+1])
    cat_prob: np.ndarray  # category -> share of total popularity


def make_catalog(spec: SyntheticSpec) -> Catalog:
    """Draw categories, series, unique titles and Zipf popularity for ``spec.items`` items."""
    rng = np.random.default_rng([spec.seed, 0])
    n, k = spec.items, spec.n_categories
    # Category sizes: skewed (gamma shares), at least 1 slot each, summing to n.
    share = rng.gamma(2.0, size=k)
    size = np.maximum(1, np.floor(share / share.sum() * (n - k)).astype(np.int64) + 1)
    size[np.argmax(size)] += n - size.sum()
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    slot_cat = np.repeat(np.arange(k), size)
    slot_item = rng.permutation(n)  # item ids do not leak the slot layout
    weight = np.empty(n)
    weight[rng.permutation(n)] = (np.arange(1, n + 1, dtype=np.float64)) ** -spec.zipf  # per slot
    cat_w = np.bincount(slot_cat, weights=weight, minlength=k)
    within = np.cumsum(weight) - np.repeat(np.cumsum(cat_w) - cat_w, size)
    cdf = slot_cat + within / cat_w[slot_cat]
    cdf[np.cumsum(size) - 1] = np.arange(1, k + 1)  # exact category ends

    cat_names, cat_theme = [], []
    for c in range(k):
        top, sub, theme = _GENRES[c % len(_GENRES)]
        rep = c // len(_GENRES)
        cat_names.append(f"{top} > {sub}" + (f" {rep + 1}" if rep else ""))
        cat_theme.append(theme)
    titles = [""] * n
    slot_titles: list[str] = []
    seen: set[str] = set()
    for c in range(k):
        left = int(size[c])
        while left > 0:
            length = int(min(left, 1 + min(7, rng.geometric(0.5) - 1)))
            for attempt in range(50):
                stem = (f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} "
                        f"{cat_theme[c][rng.integers(len(cat_theme[c]))]} {_NOUNS[rng.integers(len(_NOUNS))]}")
                if attempt >= 20:
                    stem += f" of {_PLACES[rng.integers(len(_PLACES))]}"
                if attempt >= 40:
                    stem += f" {attempt}"
                if stem not in seen:
                    break
            seen.add(stem)
            slot_titles += [stem] if length == 1 else [f"{stem} {i}" for i in range(1, length + 1)]
            left -= length
    for s, item in enumerate(slot_item):
        titles[item] = slot_titles[s]
    item_cat = [""] * n
    for s, item in enumerate(slot_item):
        item_cat[item] = cat_names[slot_cat[s]]
    return Catalog(titles=titles, categories=item_cat, slot_item=slot_item.astype(np.int32),
                   cat_start=start, cat_size=size, cdf=cdf, cat_prob=cat_w / cat_w.sum())


def _timeline(spec: SyntheticSpec, chunk: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence lengths (n,) and flat, per-user sorted timestamps of one chunk of users."""
    rng = np.random.default_rng([spec.seed, 1, chunk])
    excess = max(spec.interactions_per_user - spec.min_len, 0.0) + 0.5
    mu = math.log(excess) - spec.length_sigma**2 / 2
    lengths = spec.min_len + np.floor(rng.lognormal(mu, spec.length_sigma, size=n)).astype(np.int64)
    lengths = np.minimum(lengths, spec.max_len)
    start = rng.uniform(0.0, spec.max_start, size=n)
    span = np.minimum(rng.exponential(spec.lifetime, size=n), 1.0 - start) * (1 - 1e-9)
    total = int(lengths.sum())
    gaps = rng.exponential(size=total + n)  # one extra gap per user: the last item is not at the span end
    offs = np.concatenate([[0], np.cumsum(lengths + 1)])
    first = offs[:-1]
    gaps[first] = 0.0  # the first interaction is at the start time
    cum = np.cumsum(gaps)
    user_total = cum[offs[1:] - 1] - cum[first]
    keep = np.ones(total + n, dtype=bool)
    keep[offs[1:] - 1] = False  # drop the extra gap's endpoint
    owner = np.repeat(np.arange(n), lengths + 1)
    frac = (cum - cum[first][owner]) / user_total[owner]
    t = (start[owner] + span[owner] * frac)[keep]
    return lengths, t


def _items(spec: SyntheticSpec, cat: Catalog, chunk: int, lengths: np.ndarray) -> np.ndarray:
    """Flat item ids of one chunk: category segments, series walks and popularity draws."""
    rng = np.random.default_rng([spec.seed, 2, chunk])
    n, total, k = len(lengths), int(lengths.sum()), len(cat.cat_size)
    owner = np.repeat(np.arange(n), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    n_fav = 1 + np.minimum(rng.poisson(0.8, size=n), 3)
    fav = rng.choice(k, size=(n, 4), p=cat.cat_prob)
    switch = (rng.random(total) < spec.p_switch) | (pos == 0)
    seg = np.cumsum(switch) - 1
    seg_user = owner[switch]
    n_seg = len(seg_user)
    explore = rng.random(n_seg) < spec.p_explore
    seg_cat = np.where(
        explore, rng.choice(k, size=n_seg, p=cat.cat_prob),
        fav[seg_user, np.floor(rng.random(n_seg) * n_fav[seg_user]).astype(np.int64)],
    )

    def draw(cats: np.ndarray) -> np.ndarray:
        slot = np.searchsorted(cat.cdf, cats + rng.random(len(cats)), side="left")
        return np.clip(slot, cat.cat_start[cats], cat.cat_start[cats] + cat.cat_size[cats] - 1)

    anchor = draw(seg_cat)
    walk = (rng.random(total) < spec.p_series) & ~switch
    kw = np.cumsum(walk)
    steps = kw - kw[switch][seg]
    c = seg_cat[seg]
    walk_slot = cat.cat_start[c] + (anchor[seg] - cat.cat_start[c] + steps) % cat.cat_size[c]
    slot = np.where(switch, anchor[seg], np.where(walk, walk_slot, draw(c)))
    return cat.slot_item[slot]


def _cutoffs(spec: SyntheticSpec, n_chunks: int) -> tuple[float, float]:
    hist = np.zeros(_HIST_BINS, dtype=np.int64)
    for ch in range(n_chunks):
        n = min(CHUNK_USERS, spec.users - ch * CHUNK_USERS)
        _, t = _timeline(spec, ch, n)
        hist += np.bincount(np.minimum((t * _HIST_BINS).astype(np.int64), _HIST_BINS - 1), minlength=_HIST_BINS)
    cum = np.cumsum(hist) / hist.sum()
    r = spec.split_ratio
    c1 = (np.searchsorted(cum, r[0], side="left") + 1) / _HIST_BINS
    c2 = (np.searchsorted(cum, r[0] + r[1], side="left") + 1) / _HIST_BINS
    return float(c1), float(max(c2, c1))


def generate_synthetic(
    root: str | Path,
    *,
    users: int,
    items: int,
    interactions_per_user: float,
    seed: int = 0,
    preset: str = "demo",
    rows_per_file: int = 8192,
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict:
    """Generate a synthetic data set into the (empty, temporary) folder ``root``.

    Args:
        root: the folder to write (use inside :func:`engine.data.writer.atomic_dir`).
        users: number of users generated (users without a training item are dropped).
        items: catalogue size.
        interactions_per_user: mean sequence length.
        seed: random seed; the same arguments give byte-identical files.
        preset: ``"demo"`` or ``"book"``: the shape of activity over time (see module doc).
        rows_per_file: samples per Parquet part file.
        split_ratio: train/valid/test shares of the global timeline's interactions.

    Returns:
        The meta dict written to ``meta.json`` (counts, generator parameters, cut points).
    """
    spec = SyntheticSpec(users=users, items=items, interactions_per_user=float(interactions_per_user), seed=seed,
                         split_ratio=tuple(float(r) for r in split_ratio),  # type: ignore[arg-type]
                         **_PRESET_SHAPE.get(preset, _PRESET_SHAPE["demo"]))
    cat = make_catalog(spec)
    n_chunks = math.ceil(users / CHUNK_USERS)
    c1, c2 = _cutoffs(spec, n_chunks)
    writer = PreparedWriter(Path(root), rows_per_file=rows_per_file)
    counts: dict = {}
    for ch in range(n_chunks):
        u0 = ch * CHUNK_USERS
        n = min(CHUNK_USERS, users - u0)
        lengths, t = _timeline(spec, ch, n)
        item_ids = _items(spec, cat, ch, lengths)
        owner = np.repeat(np.arange(n), lengths)
        label = (t >= c1).astype(np.int64) + (t >= c2)
        n_tr = np.bincount(owner, weights=label == 0, minlength=n).astype(np.int64)
        n_va = np.bincount(owner, weights=label == 1, minlength=n).astype(np.int64)
        n_te = lengths - n_tr - n_va
        starts = np.cumsum(lengths) - lengths
        uid = np.array([f"u{u0 + i}" for i in range(n)], dtype=object)
        add_counts(counts, write_user_segments(writer, uid, item_ids, starts, n_tr, n_va, n_te))
    counts.update(users_total=users, items=items, placeholder_titles=0)
    writer.write_items(np.arange(items, dtype=np.int32), cat.titles, cat.categories)
    meta = {
        "counts": counts,
        "synthetic": {**asdict(spec), "preset": preset, "n_categories": spec.n_categories,
                      "min_len": spec.min_len, "max_len": spec.max_len, "chunk_users": CHUNK_USERS,
                      "cut_times": [c1, c2], "split_ratio": list(spec.split_ratio)},
    }
    writer.close(meta)
    return json.loads((Path(root) / META_FILE).read_text())


def write_genre_toy(out: Path, *, users: int = 160, seed: int = 0) -> list[str]:
    """A tiny learnable prepared folder (the selection-quality benchmark's ``--dry-run-tiny``).

    60 items in 4 genres of 15 titles; each user stays within one genre: a history of 2-5 items,
    the next as the training target and the validation item, two more as test targets. Written
    once (kept when ``out/meta.json`` exists). Returns the titles, by item id.
    """
    titles = [f"{g} {w}" for g in ("Quest", "Racer", "Arena", "Puzzle") for w in
              ("Alpha", "Bravo", "Delta", "Echo", "Omega", "Nova", "Zen", "Storm", "Ridge", "Vale", "Lunar", "Prime",
               "Rogue", "Titan", "Ember")]
    out = Path(out)
    if (out / "meta.json").exists():
        return titles
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        g = int(rng.integers(0, 4))
        p = rng.permutation(np.arange(g * 15, g * 15 + 15))
        k = int(rng.integers(2, 6))
        rows.append((f"u{u}", p[:k].tolist(), int(p[k]), p[:k + 1].tolist(), p[k + 1:k + 3].tolist()))
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=64)
        w.add_samples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        w.write_items(np.arange(len(titles)), titles)
        w.write_split("valid", [r[0] for r in rows], [r[1] for r in rows], [[r[2]] for r in rows])
        w.write_split("test", [r[0] for r in rows], [r[3] for r in rows], [r[4] for r in rows])
        w.close({"source": "selection_quality tiny"})
    return titles


def write_sample_pool(data: Path, out: Path, n: int, *, seed: int) -> Path:
    """A prepared folder of a seeded draw of ``n`` of ``data``'s samples (every one if fewer), with
    the same items and validation / test periods; written once (kept when ``out/meta.json`` exists)."""
    import pyarrow as pa

    from engine.data.schema import read_items, read_samples, read_split

    out = Path(out)
    if (out / "meta.json").exists():
        return out
    s = read_samples(data)
    ids = np.sort(np.random.default_rng([n, seed]).choice(s.num_rows, size=min(n, s.num_rows), replace=False))
    s = s.take(pa.array(ids))
    items = read_items(data)
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp)
        w.add_samples(s.column("user_id").to_pylist(), s.column("history").to_pylist(), s.column("target").to_pylist())
        w.write_items(items.column("item_id").to_numpy(), items.column("title").to_pylist())
        for split in ("valid", "test"):
            t = read_split(data, split)
            w.write_split(split, t.column("user_id").to_pylist(), t.column("history").to_pylist(),
                          t.column("targets").to_pylist())
        w.close({"source": f"seeded pool of {len(ids)} samples of {data}"})
    return out
