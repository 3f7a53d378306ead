"""TIGER effort throughput: the batched per-sample gradient norm over ALL parameters
(:func:`engine.effort.per_sample_grad_norms`: Linear, Embedding, T5LayerNorm, relative-position
bias, one backward) vs a one-forward+backward-per-sample loop vs a plain batched
forward+backward, on the same model and batch, after a warm-up round, minimum over interleaved
rounds (robust to other load on a shared machine).

Model: the paper's TIGER (T5, 4 + 4 layers, 6 heads, d_model 128, MLP 1024), seeded init, over a
Games-shaped vocabulary (17,332 items, 3 x 256 codes + a de-duplication token, 2,000 user
tokens); batch of 32 samples, histories of 1..20 items (right-padded), target = one item tuple.

Run::

    .venv/bin/python benchmarks/effort_tiger.py                      # CPU, ~1-3 min on 2 cores
    .venv/bin/python benchmarks/effort_tiger.py --device cuda
    .venv/bin/python benchmarks/effort_tiger.py --batch 8 --repeats 1 --items 500   # smoke run

The last lines are ``effort_speedup_vs_loop: <x>`` and ``effort_cost_vs_fwd_bwd: <x>``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop  # noqa: E402


def synthetic_semantic_ids(n_items: int, levels: int, codes: int, seed: int = 0):
    """Unique random code tuples with a de-duplication token (Games-shaped; no encoder needed)."""
    from engine.semantic_ids import SemanticIds, dedup_codes

    rng = np.random.default_rng(seed)
    c, size, _ = dedup_codes(rng.integers(0, codes, (n_items, levels)))
    return SemanticIds(codes=c, level_sizes=[codes] * levels + [size])


def build(args):
    from engine.llm.tiger.backend import TigerBackend

    sids = synthetic_semantic_ids(args.items, args.levels, args.codes)
    be = TigerBackend([""] * args.items, config={"device": args.device, "seed": 0}, semantic_ids=sids)
    model = be.build_model()
    rng = np.random.default_rng(1)
    hist = [rng.integers(0, args.items, rng.integers(1, args.max_items + 1)).tolist() for _ in range(args.batch)]
    tgt = rng.integers(0, args.items, args.batch).tolist()
    batch = {k: v.to(args.device) for k, v in be.encode_samples(range(args.batch), hist, tgt).items()}
    return be, model, batch


def timed(fns: dict, repeats: int, device: str) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--items", type=int, default=17332)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--max-items", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    be, model, batch = build(args)
    loss = be.per_sample_loss
    n_params = sum(p.numel() for p in model.parameters())
    kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
    print(f"TIGER: {n_params:,} parameters, all trainable ({', '.join(kinds)}); vocab {be.layout.vocab_size:,}; "
          f"batch {args.batch} x {batch['input_ids'].shape[1]} encoder tokens (padded), "
          f"{batch['labels'].shape[1]} target tokens; device {args.device}; torch threads {torch.get_num_threads()}")

    def effort():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no parameter in the fallback
            return per_sample_grad_norms(model, loss, batch)

    def loop():
        return per_sample_grad_norms_loop(model, loss, batch)

    def fwd_bwd():
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss(model, batch).sum(), params)
        return grads

    a, b = effort(), loop()  # warm-up round, and the exactness check
    rel = float(((a.cpu() - b.cpu()).abs() / b.cpu().abs()).max())
    fwd_bwd()
    best = timed({"effort": effort, "loop": loop, "fwd_bwd": fwd_bwd}, args.repeats, args.device)
    for k, v in best.items():
        print(f"{k:8s} {v * 1000:9.1f} ms   {args.batch / v:8.1f} samples/s")
    print(f"max_rel_err_effort_vs_loop: {rel:.2e}")
    print(f"effort_speedup_vs_loop: {best['loop'] / best['effort']:.2f}")
    print(f"effort_cost_vs_fwd_bwd: {best['effort'] / best['fwd_bwd']:.2f}")


if __name__ == "__main__":
    main()
