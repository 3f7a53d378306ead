"""Prune Amazon Book-style data with the authors' Book settings (lambda=1.0, K=50, budget 1024).

Same job as jobs/prune.py (see its docstring for stages and outputs; ``--backend bigrec|textrec``
and ``--textrec-model`` as there); only the defaults differ: the Book prompt preset (with
``--backend textrec``, the wording of the user text), lam=1.0, K=50, budget 1024.

Commands:
    # on a Ray cluster (the user's entry point):
    ray job submit --working-dir . -- python jobs/prune_book.py --data /data/book --out /runs/book
    # the embedded demo (`make demo` does exactly this on a local cluster it starts):
    ray job submit --working-dir . -- python jobs/prune_book.py --data $PWD/runs/demo-data --out $PWD/runs/demo --budget 128
    # tiny local variant without a cluster:
    python jobs/prune_book.py --data /tmp/demo-data --out /tmp/demo-run --budget 128
    python jobs/prune_book.py --data /tmp/demo-data --out /tmp/demo-text --budget 128 --backend textrec
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.prune import main

BOOK_DEFAULTS = {"lam": 1.0, "groups": 50, "budget": 1024, "prompt": "book"}

if __name__ == "__main__":
    sys.exit(main(defaults=BOOK_DEFAULTS, description=__doc__.splitlines()[0]))
