"""Influence engine: speed of the batched per-sample pass, and a real Games run.

Speed (default): on one SASRec surrogate (64-d, 2 blocks, 2 heads, max_len 50, 17,332 items
like Games) and one batch of 256 samples, after warm-up, in one run:
  - the all-sample batched pass grad L_s . v (forward-mode JVP; also the finite-difference
    alternative) vs a per-sample backward loop (goal >= 10x) and vs a plain forward (goal <= 3x).
  - the JVP pass eager, and compiled by torch.compile as the actors run it with the prune job's
    --influence-compile (micro-batches padded to a few shapes; compiled against a forward
    compiled and padded the same way, and against the eager forward).
The LAST two lines are ``influence_speedup_vs_loop: <x>`` and ``influence_cost_vs_forward: <x>``:
for the compiled JVP pass, against the faster of the two forwards (``--no-compile`` or ``--loss
full``: the eager JVP pass against the eager forward). The surrogate loss is the prune job's
default, sampled softmax (``--loss full`` for the exact softmax, which does not compile).

    .venv/bin/python benchmarks/influence.py                  # ~2-4 min on 2 cores (incl. compiling)
    .venv/bin/python benchmarks/influence.py --batch 64 --items 2000   # tiny CPU variant
    .venv/bin/python benchmarks/influence.py --loss full --no-compile  # the exact full-softmax loss

Games (``games``): train SASRec on the DEALRec Games release (49,156 samples, 17,332 items)
time-boxed, report validation Recall@20 / NDCG@20, solve v by CG (residual, HVPs), LiSSA with
the paper's settings (depth 5000, scale 25, batch 1; residual or divergence), and the Spearman
correlation between influence (CG v) and plain gradient alignment g_bar . grad L_s.

    .venv/bin/python benchmarks/influence.py games --train-minutes 8
    .venv/bin/python benchmarks/influence.py games --subset 5000 --train-minutes 2   # small variant
    .venv/bin/python benchmarks/influence.py games --from-run runs/games   # a prune run's surrogate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from engine.errors import SolverError
from engine.influence import (
    InfluenceConfig,
    DirectionalDerivatives,
    directional_derivatives,
    hessian_rows,
    split_direction,
    flatten_params,
    mean_gradient,
    solve_ihvp,
    trainable_params,
)
from engine.surrogate import (
    SurrogateConfig,
    build_surrogate,
    evaluate_ranking,
    make_batches,
    pad_to_bucket,
    surrogate_loss,
    train_surrogate,
)

GAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "games"


def load_games(folder: Path = GAMES) -> tuple[pa.Table, pa.Table, int]:
    """Samples (history = training items but the last, target = last) and valid rows, 0-based ids."""

    def read(name: str) -> dict[int, list[int]]:
        out = {}
        for line in (folder / name).read_text().splitlines():
            parts = line.split()
            if parts:
                out[int(parts[0])] = [int(x) - 1 for x in parts[1:]]
        return out

    train, valid = read("sequential_train.txt"), read("sequential_valid.txt")
    users = sorted(u for u, s in train.items() if s)
    hist = [train[u][:-1] for u in users]
    tgt = [train[u][-1] for u in users]
    samples = pa.table({
        "sample_id": pa.array(np.arange(len(users)), pa.int64()),
        "user_id": [str(u) for u in users],
        "history": pa.array(hist, pa.list_(pa.int32())),
        "target": pa.array(tgt, pa.int32()),
    })
    vu = [u for u in users if valid.get(u)]
    vt = pa.table({"user_id": [str(u) for u in vu], "history": pa.array([train[u] for u in vu], pa.list_(pa.int32())),
                   "targets": pa.array([valid[u] for u in vu], pa.list_(pa.int32()))})
    n_items = 1 + max(max((max(s) for s in train.values() if s)), max((max(s) for s in valid.values() if s)))
    return samples, vt, max(n_items, 17332)


def _timeit(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if GAMES.exists() and args.items == 17332:
        samples, _, n_items = load_games()
        samples = samples.slice(0, args.batch)
        src = "Games (first samples)"
    else:
        n_items = args.items
        lens = np.minimum(rng.geometric(1 / 9, args.batch), 80)
        samples = pa.table({"sample_id": np.arange(args.batch),
                            "history": pa.array([rng.integers(0, n_items, k).tolist() for k in lens],
                                                pa.list_(pa.int32())),
                            "target": rng.integers(0, n_items, args.batch).astype(np.int32)})
        src = "synthetic"
    model = build_surrogate(n_items, SurrogateConfig(loss=args.loss, negatives=args.negatives)).eval()
    batch = make_batches(samples, batch_size=args.batch, max_len=50)[0]
    params = trainable_params(model)
    m = sum(p.numel() for p in params.values())
    v = torch.randn(m) / m ** 0.5
    print(f"data: {src}; batch {args.batch}, T={batch['seq'].shape[1]}, "
          f"{int((batch['labels'] >= 0).sum())} positions; {n_items} items; loss {args.loss}"
          f"{f' ({args.negatives} negatives)' if args.loss == 'sampled' else ''}; {m:,} parameters; "
          f"torch threads {torch.get_num_threads()}")

    # the batched paths score the 256 samples as the actors do: length-sorted micro-batches
    micro = make_batches(samples, batch_size=args.micro_batch, max_len=50, order="length")
    print(f"batched paths: {len(micro)} length-sorted micro-batches of {args.micro_batch} "
          f"(T = {[int(b['seq'].shape[1]) for b in micro]})")

    def fwd():
        with torch.no_grad():
            for b in micro:
                surrogate_loss(model, b)

    vs = split_direction(model, v)  # once, as the actors do
    eager = DirectionalDerivatives(model, surrogate_loss, vs)

    def jvp_pass():
        for b in micro:
            eager(b)

    def fd_pass():
        for b in micro:
            directional_derivatives(model, surrogate_loss, b, vs, method="fd")

    plist = list(params.values())
    n_loop = min(args.loop_samples, args.batch)

    def loop_pass():
        for i in range(n_loop):
            b = {k: t[i:i + 1] for k, t in batch.items()}
            gs = torch.autograd.grad(surrogate_loss(model, b).sum(), plist)
            flatten_params(gs) @ v

    # accuracy of jvp / fd against the loop on the first samples
    ref = []
    for i in range(8):
        b = {k: t[i:i + 1] for k, t in batch.items()}
        ref.append(float(flatten_params(torch.autograd.grad(surrogate_loss(model, b).sum(), plist)) @ v))
    ref = np.array(ref)
    jv = directional_derivatives(model, surrogate_loss, batch, v).numpy()[:8]
    fd = directional_derivatives(model, surrogate_loss, batch, v, method="fd").numpy()[:8]
    print(f"max rel error vs per-sample grads: jvp {np.max(np.abs(jv - ref)) / np.max(np.abs(ref)):.2e}, "
          f"fd {np.max(np.abs(fd - ref)) / np.max(np.abs(ref)):.2e}")

    compiled = None
    if args.compile and args.loss == "sampled":
        # the actors' compiled path (--influence-compile): micro-batches padded to (micro, bucket
        # length), one graph per bucket; the forward it is compared with is compiled the same way
        padded = [pad_to_bucket(b, args.micro_batch, 50) for b in micro]
        rows = [len(b["sample_id"]) for b in micro]
        t0 = time.perf_counter()
        compiled = DirectionalDerivatives(model, surrogate_loss, vs, compile=True)
        got = torch.cat([compiled(p)[:r] for p, r in zip(padded, rows)])
        t_compile = time.perf_counter() - t0
        want = torch.cat([eager(b) for b in micro])
        print(f"compiled jvp: {len({tuple(p['seq'].shape) for p in padded})} shapes "
              f"{sorted({tuple(p['seq'].shape) for p in padded})}, compile + first pass {t_compile:.1f} s, "
              f"max rel diff vs eager {float((got - want).abs().max() / want.abs().max()):.1e}")
        fwd_c = torch.compile(lambda b: surrogate_loss(model, b), dynamic=False, fullgraph=True)

        def fwd_compiled():
            with torch.no_grad():
                for b in padded:
                    fwd_c(b)

        def jvp_compiled():
            for b in padded:
                compiled(b)
    elif args.compile:
        print("compiled jvp: skipped (--loss full gathers positions by data-dependent shapes; it does not "
              "compile as one graph)")

    t_fwd = _timeit(fwd, args.reps)
    t_jvp = _timeit(jvp_pass, args.reps)
    t_fd = _timeit(fd_pass, args.reps)
    t_loop = _timeit(loop_pass, 1) * args.batch / n_loop
    print(f"forward (per-sample losses, no grad): {t_fwd * 1e3:.1f} ms/batch")
    print(f"jvp all-sample pass (eager):          {t_jvp * 1e3:.1f} ms/batch")
    print(f"fd  all-sample pass (2 forwards):     {t_fd * 1e3:.1f} ms/batch")
    print(f"per-sample backward loop:             {t_loop * 1e3:.1f} ms/batch "
          f"(timed on {n_loop} samples, scaled to {args.batch})")
    print(f"fd_speedup_vs_loop: {t_loop / t_fd:.2f}")
    print(f"fd_cost_vs_forward: {t_fd / t_fwd:.2f}")
    if compiled is None:
        print(f"influence_speedup_vs_loop: {t_loop / t_jvp:.2f}")
        print(f"influence_cost_vs_forward: {t_jvp / t_fwd:.2f}")
        return
    t_fwd_c = _timeit(fwd_compiled, args.reps)
    t_jvp_c = _timeit(jvp_compiled, args.reps)
    print(f"forward, compiled, padded batches:    {t_fwd_c * 1e3:.1f} ms/batch")
    print(f"jvp all-sample pass, compiled:        {t_jvp_c * 1e3:.1f} ms/batch")
    print(f"eager_jvp_speedup_vs_loop: {t_loop / t_jvp:.2f}")
    print(f"eager_jvp_cost_vs_forward: {t_jvp / t_fwd:.2f}")
    print(f"compiled_jvp_cost_vs_eager_forward: {t_jvp_c / t_fwd:.2f}")
    print(f"compiled_jvp_cost_vs_compiled_forward: {t_jvp_c / t_fwd_c:.2f}")
    # the headline: the compiled pass (--influence-compile) against the FASTER of the two forwards
    print(f"influence_speedup_vs_loop: {t_loop / t_jvp_c:.2f}")
    print(f"influence_cost_vs_forward: {t_jvp_c / min(t_fwd, t_fwd_c):.2f}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def games(args: argparse.Namespace) -> None:
    res: dict = {}
    if args.from_run:
        # the surrogate (and v) of a finished prune run: no retraining
        from engine.data.schema import read_samples, read_split
        from engine.surrogate import load_surrogate

        run = Path(args.from_run)
        man = json.loads((run / "manifest.json").read_text())
        data = man["config"]["data"]
        samples, valid = read_samples(data), read_split(data, "valid")
        model = load_surrogate(run / "surrogate")
        n_items, cfg = model.n_items, model.cfg
        res["from_run"] = str(run)
        print(f"[games] surrogate of {run} ({cfg.loss} loss), {samples.num_rows} samples, {n_items} items")
    else:
        samples, valid, n_items = load_games()
        if args.subset:
            samples = samples.slice(0, args.subset)
            keep = set(samples.column("user_id").to_pylist())
            valid = valid.filter(pa.array([u in keep for u in valid.column("user_id").to_pylist()]))
        print(f"[games] {samples.num_rows} samples, {n_items} items, {valid.num_rows} valid users")
        cfg = SurrogateConfig(epochs=args.epochs, max_minutes=args.train_minutes, weight_decay=args.weight_decay,
                              log_every=50, patience=2, loss=args.loss, negatives=args.negatives)
        t0 = time.perf_counter()
        model, hist = train_surrogate(samples, n_items, cfg, valid=valid)
        res["train_seconds"] = time.perf_counter() - t0
        res["epochs"] = len(hist)
    res["loss"] = cfg.loss
    vb = make_batches(valid, batch_size=512, max_len=cfg.max_len)
    r = evaluate_ranking(model, vb, k=20)
    res["valid_recall@20"], res["valid_ndcg@20"] = r["recall"], r["ndcg"]
    print(f"[games] valid Recall@20 {r['recall']:.4f} NDCG@20 {r['ndcg']:.4f}")
    # as the prune job: H on a seeded random subset, every batch length-sorted
    batches = make_batches(samples, batch_size=256, max_len=cfg.max_len, order="length")
    rows = hessian_rows(samples.num_rows, InfluenceConfig(hessian_samples=args.hessian_samples or None))
    hsub = make_batches(samples if rows is None else samples.take(pa.array(rows)), batch_size=256,
                        max_len=cfg.max_len, order="length")
    t0 = time.perf_counter()
    g, n = mean_gradient(model, surrogate_loss, batches)
    res["g_bar_seconds"], res["g_bar_norm"] = time.perf_counter() - t0, float(g.norm())
    print(f"[games] g_bar: ||g|| {float(g.norm()):.3e} ({res['g_bar_seconds']:.0f}s)")
    damping = args.damping if args.damping is not None else cfg.weight_decay
    res["damping"], res["hessian_samples"] = damping, sum(len(b["sample_id"]) for b in hsub)
    v = None
    for gn in (False, True):
        name = "cg_ggn" if gn else "cg_hessian"
        try:
            vv, rep = solve_ihvp(model, surrogate_loss, hsub, g, solver="cg", damping=damping, gauss_newton=gn,
                                 tol=args.tol, max_iter=args.cg_iters, log=print)
            res[name] = {k: rep.to_dict()[k] for k in ("rel_residual", "iterations", "hvps", "seconds", "converged")}
            if v is None or gn:
                v, res["v_from"] = vv, name
        except SolverError as e:
            res[name] = {"error": str(e)}
        print(f"[games] {name}: {res[name]}")
    t0 = time.perf_counter()
    try:
        _, rep = solve_ihvp(model, surrogate_loss, hsub, g, solver="lissa", damping=damping, depth=5000,
                            scale=25.0, hessian_batch_size=1, log=print)
        res["lissa_paper"] = {k: rep.to_dict()[k] for k in ("rel_residual", "iterations", "hvps", "seconds")}
    except SolverError as e:
        res["lissa_paper"] = {"error": str(e), "seconds": time.perf_counter() - t0}
    print(f"[games] lissa (depth 5000, scale 25, batch 1, damping {damping}): {res['lissa_paper']}")
    if v is not None:
        t0 = time.perf_counter()
        sb = batches[: -(-args.score_samples // 256)] if args.score_samples else batches
        res["score_samples"] = sum(len(b["sample_id"]) for b in sb)
        inf = torch.cat([directional_derivatives(model, surrogate_loss, b, v) for b in sb]).numpy() / n
        ali = torch.cat([directional_derivatives(model, surrogate_loss, b, g) for b in sb]).numpy() / n
        res["score_seconds"] = time.perf_counter() - t0
        res["spearman_influence_vs_alignment"] = _spearman(inf, ali)
        res["influence_positive_fraction"] = float((inf > 0).mean())
        print(f"[games] Spearman(influence, g_bar . grad L_s) = {res['spearman_influence_vs_alignment']:.4f}")
    print(json.dumps(res, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="speed", choices=("speed", "games"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--items", type=int, default=17332)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loss", default="sampled", choices=("full", "sampled"),
                   help="surrogate per-sample loss (default: the prune job's, sampled)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled jvp pass (--influence-compile of the prune job)")
    p.add_argument("--negatives", type=int, default=128, help="negatives per sample for --loss sampled")
    p.add_argument("--loop-samples", type=int, default=64, help="samples timed in the per-sample loop")
    p.add_argument("--micro-batch", type=int, default=64,
                   help="batched paths: length-sorted micro-batches of this size (256 = one padded batch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--subset", type=int, default=0, help="games: first N samples only (0 = all)")
    p.add_argument("--from-run", default=None, help="games: use the surrogate of this finished prune run (no training)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-minutes", type=float, default=8.0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--damping", type=float, default=None, help="default: the weight decay")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--cg-iters", type=int, default=50)
    p.add_argument("--score-samples", type=int, default=0, help="samples for the Spearman (0 = all; else the shortest ones)")
    p.add_argument("--hessian-samples", type=int, default=4096, help="samples used for H (0 = all)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (games if args.mode == "games" else speed)(args)


if __name__ == "__main__":
    main()
