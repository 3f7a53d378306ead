"""Generate a Book-scale synthetic data set and print wall time, peak RSS and counts.

Book scale = 88,263 users, 86,272 items, ~5.3M interactions (DEALRec's Amazon Books).
The generator streams users in chunks, so peak memory should not grow with the number
of interactions; compare with ``--scale 2`` to check.

Commands::

    .venv/bin/python benchmarks/synthetic_scale.py                  # Book scale, temp folder
    .venv/bin/python benchmarks/synthetic_scale.py --scale 2 --out /tmp/synth2x
    .venv/bin/python benchmarks/synthetic_scale.py --scale 0.05     # tiny CPU variant (seconds)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.prepare import PRESETS, PrepareConfig, prepare  # noqa: E402
from engine.data.schema import validate_prepared  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply Book's users and items by this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary folder, removed after)")
    ap.add_argument("--validate", action="store_true", help="also run validate_prepared (reads everything back)")
    args = ap.parse_args(argv)
    book = PRESETS["book"]
    users, items = max(1, round(book["users"] * args.scale)), max(2, round(book["items"] * args.scale))
    with tempfile.TemporaryDirectory(prefix="dealrec-synth-") as tmp:
        out = args.out or str(Path(tmp) / "book")
        cfg = PrepareConfig(format="synthetic", out=out, overwrite=True, preset="book", users=users, items=items,
                            seed=args.seed)
        t0 = time.perf_counter()
        summary = prepare(cfg)
        wall = time.perf_counter() - t0
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        n_files = len(list((Path(out) / "samples").glob("*.parquet")))
        size_mib = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
        c = summary["counts"]
        total = sum(c["interactions"].values())
        print(f"synthetic book x{args.scale}: users {users:,} items {items:,} seed {args.seed}")
        print(f"  wall {wall:.1f}s   peak RSS {rss_mib:.0f} MiB   output {size_mib:.0f} MiB in {n_files} sample files")
        print(f"  interactions {total:,} (train {c['interactions']['train']:,}, valid {c['interactions']['valid']:,}, "
              f"test {c['interactions']['test']:,}); mean per user {total / users:.2f}")
        print(f"  samples {c['samples']:,}  dropped users {c['dropped_users']:,}  valid users {c['valid']:,}  "
              f"test users {c['test']:,}")
        if args.validate:
            t1 = time.perf_counter()
            print("  validate_prepared:", json.dumps(validate_prepared(out)), f"({time.perf_counter() - t1:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
