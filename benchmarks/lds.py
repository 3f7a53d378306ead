"""Attribution quality of the surrogate's influence: the linear datamodeling score (LDS).

As TRAK (Park et al., ICML'23) and kronfluence measure it (maths and sign convention:
``engine/influence/lds.py``):

1. A slice of Games: a seeded pool of ``--pool`` samples (users), their validation rows, and the
   items they touch, renumbered densely (a self-contained small catalogue).
2. The full-slice surrogate (SASRec, the prune job's sampled-softmax loss, a FIXED recipe:
   ``--epochs`` epochs, no early stopping) gives every method's scores, for two targets:
   - ``train``: the mean training loss over all pool samples (what DEALRec's g_bar targets);
   - ``valid``: the mean validation-period loss of the pool's validation users (full-softmax CE
     of each validation item after the user's training history, averaged per user, then over
     users).
   attribution(s) = -influence(s) = -(1/n) grad L_s . (H + dI)^-1 g_target.
3. ``--subsets`` retrains, each on a seeded random ``--fraction`` (50%) of the pool with the
   same recipe and seed, measure both targets. One file per retrain (``retrain-<j>.json``).
4. LDS = Spearman(sum over S of attribution, measured target) over the retrains, with a
   percentile bootstrap CI over subsets. Table: method x target, and each method's wall time
   (solve + scoring pass, both targets). Under it: the default iHVP against plain alignment
   (marginal CIs apart or not, and a paired bootstrap CI of the difference).
5. Retrain noise: ``--noise-subsets K`` retrains the first K subsets with training seed + 1 and
   prints the Spearman between the two seeds' targets (how much of a target's variation over
   subsets is the subset, not the run); ``--seeds-per-subset K`` retrains every subset with K
   seeds and adds table columns against the K-seed mean target.

Methods (``--methods``, default all): ``align`` (identity solver: plain gradient alignment),
``cg-gn@D`` (Gauss-Newton CG, the default iHVP, for every D of ``--dampings``; prune's default
is D = 0.01), ``cg-hessian@D`` (CG with exact Hessian-vector products; fails where it meets
negative curvature), ``exact`` (dense Hessian solve: only when the surrogate has at most
``--exact-max-params`` parameters), ``lissa`` (the paper's LiSSA: exact Hessian, depth 5,000,
scale 25, one sample per step, damping 0.01) and ``lissa-gn`` (the same on the Gauss-Newton
matrix), ``ekfac`` (kronfluence's EK-FAC, an outside implementation: it covers the nn.Linear
layers only, i.e. not the item/position embeddings nor the LayerNorms), ``random`` (a seeded
Gaussian: the null).

Resumable: rerun the same command to continue (a larger ``--subsets`` or ``--seeds-per-subset``
only adds retrains); the retrains, the full model and each method's
scores are files under ``--out``; ``--table-only`` prints the table of what exists. A changed
slice or recipe is refused (``config.json``).

    .venv/bin/python benchmarks/lds.py --data /tmp/lds-games --out /tmp/lds-run          # Games slice
    .venv/bin/python benchmarks/lds.py --data /tmp/lds-games --out /tmp/lds-run --table-only
    .venv/bin/python benchmarks/lds.py --data /tmp/lds-games --out /tmp/lds-tiny --pool 300 --subsets 10 \\
        --epochs 3 --methods align cg-gn@0.01 random                                    # smoke run

The data folder is a prepared Games release:
``dealrec prepare --format dealrec-release --input ../shared/data/games --out /tmp/lds-games``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.errors import SolverError  # noqa: E402
from engine.influence import (  # noqa: E402
    DirectionalDerivatives,
    mean_gradient,
    solve_ihvp,
    trainable_params,
)
from engine.influence.lds import (  # noqa: E402
    attribution_from_influence,
    bootstrap_ci,
    bootstrap_diff_ci,
    ci_apart,
    predicted_targets,
    format_table,
    lds,
    subset_indices,
)
from engine.surrogate import (  # noqa: E402
    SurrogateConfig,
    build_surrogate,
    evaluate_ranking,
    make_batches,
    surrogate_loss,
    train_surrogate,
)
from engine.surrogate.batching import PAD  # noqa: E402

TARGETS = ("train", "valid")
DEFAULT_DAMPING = 0.01  # dealrec prune --damping


def log(msg: str) -> None:
    print(f"[lds {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- data


def load_slice(data: str, pool: int, seed: int) -> dict[str, Any]:
    """A seeded pool of ``pool`` samples of a prepared folder, their valid rows, dense item ids."""
    from engine.data.schema import read_samples, read_split, sample_rows

    samples = read_samples(data)
    valid = read_split(data, "valid")
    rows = sample_rows(samples.num_rows, pool, seed)
    if rows is not None:
        samples = samples.take(pa.array(rows, pa.int64()))
    users = set(samples.column("user_id").to_pylist())
    valid = valid.filter(pa.array([u in users for u in valid.column("user_id").to_pylist()]))
    hist = samples.column("history").to_pylist()
    tgt = samples.column("target").to_pylist()
    vh, vt = valid.column("history").to_pylist(), valid.column("targets").to_pylist()
    items = sorted({x for h in hist for x in h} | set(tgt) | {x for h in vh for x in h} | {x for t in vt for x in t})
    remap = {x: i for i, x in enumerate(items)}
    n = samples.num_rows
    s = pa.table({
        "sample_id": pa.array(np.arange(n), pa.int64()),
        "user_id": samples.column("user_id"),
        "history": pa.array([[remap[x] for x in h] for h in hist], pa.list_(pa.int32())),
        "target": pa.array([remap[x] for x in tgt], pa.int32()),
    })
    v = pa.table({
        "user_id": valid.column("user_id"),
        "history": pa.array([[remap[x] for x in h] for h in vh], pa.list_(pa.int32())),
        "targets": pa.array([[remap[x] for x in t] for t in vt], pa.list_(pa.int32())),
    })
    info = {"pool": n, "items": len(items), "valid_users": v.num_rows,
            "valid_interactions": int(sum(len(t) for t in vt)),
            "train_interactions": int(sum(len(h) + 1 for h in hist)),
            "pool_rows_sha1": hashlib.sha1(np.asarray(rows if rows is not None else np.arange(n)).tobytes()).hexdigest()}
    return {"samples": s, "valid": v, "n_items": len(items), "info": info}


def valid_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-user validation-period loss [B]: full-softmax CE of each validation item after the
    user's whole training history (the next-item output), averaged over the user's items."""
    h = model.encode(batch["seq"])[:, -1]
    logits = model.item_logits(h)
    t = batch["targets"]
    ok = t >= 0
    ce = (torch.logsumexp(logits, -1)[:, None] - logits.gather(1, t.clamp_min(0))) * ok
    return ce.sum(1) / ok.sum(1).clamp_min(1)


# ---------------------------------------------------------------------------------------------- models


def surrogate_config(args: argparse.Namespace, seed: int | None = None) -> SurrogateConfig:
    return SurrogateConfig(model="sasrec", hidden=args.hidden, n_blocks=args.blocks, n_heads=args.heads,
                           loss=args.loss, negatives=args.negatives, batch_size=args.batch_size,
                           epochs=args.epochs, weight_decay=args.weight_decay, lr=args.lr,
                           seed=args.seed if seed is None else seed, log_every=0)


def train(samples: pa.Table, idx: np.ndarray | None, n_items: int, cfg: SurrogateConfig) -> Any:
    """The fixed recipe: ``cfg.epochs`` epochs on the rows ``idx`` (all when None), no early stop."""
    sub = samples if idx is None else samples.take(pa.array(idx, pa.int64()))
    model, _ = train_surrogate(sub, n_items, cfg, valid=None, log=lambda _m: None)
    return model.eval()


@torch.no_grad()
def measure(model: Any, ctx: dict[str, Any], idx: np.ndarray | None = None) -> dict[str, float]:
    """Both targets on a model (and, given the kept rows, the loss on kept / held-out samples)."""
    losses = torch.cat([surrogate_loss(model, b) for b in ctx["train_batches"]]).double().numpy()
    per = np.empty(ctx["n"])
    per[ctx["train_order"]] = losses
    vl = torch.cat([valid_loss(model, b) for b in ctx["valid_batches"]]).double().numpy()
    out = {"train": float(per.mean()), "valid": float(vl.mean())}
    if idx is not None:
        keep = np.zeros(ctx["n"], dtype=bool)
        keep[idx] = True
        out["train_kept"], out["train_held_out"] = float(per[keep].mean()), float(per[~keep].mean())
    r = evaluate_ranking(model, ctx["valid_batches"], k=20)
    out["valid_recall@20"], out["valid_ndcg@20"] = r["recall"], r["ndcg"]
    return out


# ---------------------------------------------------------------------------------------------- methods


def method_list(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return list(args.methods)
    d = [f"{x:g}" for x in args.dampings]
    return (["align", f"cg-gn@{DEFAULT_DAMPING:g}", "random", "ekfac", f"cg-gn-linear@{DEFAULT_DAMPING:g}"]
            + [f"cg-gn@{x}" for x in d if float(x) != DEFAULT_DAMPING]
            + [f"cg-hessian@{x}" for x in d] + ["lissa", "lissa-gn", "exact"])


def _every(k: int, prefix: str):
    """A CG log that prints every k-th iteration line (CG logs every 10th)."""
    def f(line: str) -> None:
        it = line.split("iteration ")[1].split(":")[0] if "iteration " in line else "0"
        if it.isdigit() and int(it) % k == 0:
            log(f"{prefix}: {line}")
    return f


def _influence(model: Any, v: torch.Tensor, ctx: dict[str, Any]) -> np.ndarray:
    """influence(s) = grad L_s . v / n, in sample order."""
    dd = DirectionalDerivatives(model, surrogate_loss, v)
    out = np.empty(ctx["n"])
    vals = torch.cat([dd(b) for b in ctx["train_batches"]]).double().numpy()
    out[ctx["train_order"]] = vals / ctx["n"]
    return out


def _linear_only(model: Any) -> Any:
    """A copy of the model whose only trainable parameters are those of its nn.Linear layers
    (what kronfluence's EK-FAC covers): the default iHVP on the same parameters as EK-FAC."""
    lin = copy.deepcopy(model).eval()
    keep = {id(q) for mod in lin.modules() if isinstance(mod, torch.nn.Linear) for q in mod.parameters()}
    for q in lin.parameters():
        q.requires_grad_(id(q) in keep)
    return lin


def _short(err: str) -> str:
    """One short table note for a solver error."""
    if "not positive definite" in err:
        return "CG met negative curvature at iteration " + err.split("at iteration ")[1].split(" ")[0]
    if "lissa diverged" in err:
        return "diverged at step " + err.split("at step ")[1].split(" ")[0]
    if "--exact-max-params" in err:
        return "skipped: " + err.split(" (")[0]
    return err.splitlines()[0][:80]


def score_method(name: str, model: Any, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """{"attribution": {target: array}, "seconds": {target: s}, "report": {target: ...}, "errors": {target: str}}."""
    res: dict[str, Any] = {"attribution": {}, "seconds": {}, "report": {}, "errors": {}}
    if name == "random":
        rng = np.random.default_rng(args.seed)
        for t in TARGETS:
            res["attribution"][t] = rng.normal(size=ctx["n"])
            res["seconds"][t] = 0.0
        return res
    if name == "ekfac":
        return score_ekfac(model, ctx, args)
    grads = ctx["g"]
    if name.startswith("cg-gn-linear@"):
        model = _linear_only(model)
        grads = {"train": mean_gradient(model, surrogate_loss, ctx["train_batches"])[0],
                 "valid": mean_gradient(model, valid_loss, ctx["valid_batches"])[0]}
    m = sum(p.numel() for p in trainable_params(model).values())
    for t in TARGETS:
        g = grads[t]
        t0 = time.perf_counter()
        try:
            if name == "align":
                v, rep = solve_ihvp(model, surrogate_loss, [], g, solver="identity")
            elif name.startswith(("cg-gn@", "cg-hessian@", "cg-gn-linear@")):
                d = float(name.split("@")[1])
                v, rep = solve_ihvp(model, surrogate_loss, ctx["hessian_batches"], g, solver="cg", damping=d,
                                    gauss_newton=not name.startswith("cg-hessian"), tol=args.tol,
                                    max_iter=args.max_iter, log=_every(50, f"{name} {t}"))
            elif name in ("lissa", "lissa-gn"):
                v, rep = solve_ihvp(model, surrogate_loss, ctx["hessian_batches"], g, solver="lissa",
                                    damping=DEFAULT_DAMPING, gauss_newton=name == "lissa-gn", depth=5000, scale=25.0,
                                    hessian_batch_size=1, seed=args.seed)
            elif name == "exact":
                if m > args.exact_max_params:
                    raise SolverError(f"{m:,} parameters > --exact-max-params {args.exact_max_params:,} (a dense "
                                      f"Hessian would be {m * m * 8 / 2**40:.1f} TiB)")
                v, rep = solve_ihvp(model, surrogate_loss, ctx["hessian_batches"], g, solver="exact",
                                    damping=DEFAULT_DAMPING, max_params=args.exact_max_params)
            else:
                raise ValueError(f"unknown method {name!r}")
        except SolverError as e:
            res["errors"][t] = str(e)
            res["seconds"][t] = time.perf_counter() - t0
            log(f"{name} {t}: {e}")
            continue
        res["attribution"][t] = attribution_from_influence(_influence(model, v, ctx))
        res["seconds"][t] = time.perf_counter() - t0
        res["report"][t] = {k: rep.to_dict()[k] for k in ("rel_residual", "iterations", "hvps", "converged")}
        res["report"][t]["params"] = m
        log(f"{name} {t}: {res['report'][t]} ({res['seconds'][t]:.0f} s)")
    return res


def score_ekfac(model: Any, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """kronfluence EK-FAC pairwise scores, query gradients aggregated (one query: the target)."""
    import logging
    import warnings

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from engine.surrogate.batching import encode_samples
    from engine.surrogate.models import _sasrec_position_logits

    class Rows(torch.utils.data.Dataset):
        def __init__(self, table: pa.Table, max_len: int):
            self.enc = encode_samples(table, max_len=max_len)

        def __len__(self) -> int:
            return len(self.enc["sample_id"])

        def __getitem__(self, i: int) -> dict[str, np.ndarray]:
            return {k: v[i] for k, v in self.enc.items()}

    def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        b = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        used = (b["seq"] != PAD).any(0)
        first = int(torch.argmax(used.int())) if bool(used.any()) else b["seq"].shape[1] - 1
        b["seq"], b["labels"] = b["seq"][:, first:], b["labels"][:, first:]
        return b

    class SurrogateTask(Task):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
            if not sample:
                return surrogate_loss(model, batch).sum()
            # the true Fisher: labels drawn from the model's own softmax at every position
            z = _sasrec_position_logits(model, batch)
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=z.detach()).sample()
            ce = F.cross_entropy(z, y, reduction="none")
            labels = batch["labels"][:, -batch["seq"].shape[1]:]
            idx = (labels.reshape(-1) >= 0).nonzero().squeeze(1)
            row = idx // labels.shape[1]
            cnt = (labels >= 0).sum(1).clamp_min(1).to(ce.dtype)
            return (torch.zeros(labels.shape[0], dtype=ce.dtype).index_add(0, row, ce) / cnt).sum()

        def compute_measurement(self, batch: Any, model: Any) -> torch.Tensor:
            return (valid_loss(model, batch) if "targets" in batch else surrogate_loss(model, batch)).sum()

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["seq"] != PAD

    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    res: dict[str, Any] = {"attribution": {}, "seconds": {}, "report": {}, "errors": {}}
    t0 = time.perf_counter()
    km = prepare_model(copy.deepcopy(model).eval(), SurrogateTask())
    kdir = Path(args.out) / "kronfluence"
    analyzer = Analyzer("lds", km, SurrogateTask(), cpu=True, disable_tqdm=True, output_dir=str(kdir),
                        log_level=logging.WARNING)
    dl = DataLoaderKwargs(collate_fn=collate, num_workers=0)
    train_ds = Rows(ctx["samples"], model.cfg.max_len)
    analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=128, dataloader_kwargs=dl,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    fit = time.perf_counter() - t0
    n_linear = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear) for p in mod.parameters())
    for t in TARGETS:
        t1 = time.perf_counter()
        query = train_ds if t == "train" else Rows(ctx["valid"], model.cfg.max_len)
        sargs = ScoreArguments(damping_factor=None, aggregate_query_gradients=True)
        analyzer.compute_pairwise_scores(f"{t}", "ekfac", query, train_ds, per_device_query_batch_size=128,
                                         per_device_train_batch_size=128, dataloader_kwargs=dl, score_args=sargs,
                                         overwrite_output_dir=True)
        sc = analyzer.load_pairwise_scores(f"{t}")["all_modules"].double().numpy()
        # kronfluence: positive = helpful (up-weighting lowers the measurement) = our influence's sign
        res["attribution"][t] = attribution_from_influence(sc.sum(0) / (ctx["n"] * len(query)))
        res["seconds"][t] = fit / len(TARGETS) + time.perf_counter() - t1
        res["report"][t] = {"factor_fit_seconds": fit, "query_rows": len(query), "score_shape": list(sc.shape),
                            "linear_params": n_linear, "damping": "kronfluence heuristic: 0.1 x mean eigenvalue"}
        log(f"ekfac {t}: {res['report'][t]} ({res['seconds'][t]:.0f} s)")
    return res


# ---------------------------------------------------------------------------------------------- table


def _retrain_file(out: Path, j: int, seed_offset: int) -> Path:
    return out / (f"retrain-{j:03d}.json" if not seed_offset else f"retrain-{j:03d}-seed{seed_offset}.json")


def measured_targets(out: Path, args: argparse.Namespace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{column: (masks [M, n], measured [M])}: per target, the seed-``--seed`` retrains, and with
    ``--seeds-per-subset K`` > 1 the mean over K training seeds of the subsets that have all K."""
    n = args.pool_n
    by: dict[int, dict[int, dict[str, Any]]] = {}
    for f in sorted(out.glob("retrain-*.json")):
        r = json.loads(f.read_text())
        if r.get("fraction") == args.fraction:
            by.setdefault(int(r["subset"]), {})[int(r["train_seed"]) - args.seed] = r
    cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    k = args.seeds_per_subset
    for label, need in (("", [0]), (f", {k}-seed mean", list(range(k)))):
        if label and k < 2:
            continue
        js = sorted(j for j, seeds in by.items() if all(o in seeds for o in need))
        if len(js) < 3:
            continue
        masks = np.zeros((len(js), n), dtype=bool)
        for i, j in enumerate(js):
            masks[i, subset_indices(n, j, fraction=args.fraction, seed=args.seed)] = True
        for t in TARGETS:
            cols[t + label] = (masks, np.array([np.mean([by[j][o]["targets"][t] for o in need]) for j in js]))
    return cols


def build_table(out: Path, methods: list[str], args: argparse.Namespace) -> tuple[str, list[dict[str, Any]], dict]:
    cols = measured_targets(out, args)
    rows: list[dict[str, Any]] = []
    if not cols:
        return "(fewer than 3 retrains: no table yet)", rows, cols
    for name in methods:
        f = out / "scores" / f"{name}.json"
        if not f.exists():
            continue
        meta = json.loads(f.read_text())
        arr = np.load(out / "scores" / f"{name}.npz") if (out / "scores" / f"{name}.npz").exists() else {}
        row: dict[str, Any] = {"method": name, "seconds": float(sum(meta["seconds"].values())), "_pred": {}}
        for c, (masks, measured) in cols.items():
            t = c.split(",")[0]
            if t in arr:
                row[c] = lds(arr[t], masks, measured, n_boot=args.n_boot, seed=args.seed)
                row["_pred"][c] = predicted_targets(arr[t], masks)
        notes = []
        for t in TARGETS:
            if t in meta.get("errors", {}):
                notes.append(f"{t}: {_short(meta['errors'][t])}")
            rep = meta.get("report", {}).get(t, {})
            if rep.get("converged") is False or (isinstance(rep.get("rel_residual"), float)
                                                 and rep["rel_residual"] > 10 * args.tol):
                notes.append(f"{t}: residual {rep['rel_residual']:.1e} after {rep['iterations']} it.")
        if name == f"cg-gn@{DEFAULT_DAMPING:g}":
            notes.insert(0, "the default iHVP (prune --damping 0.01)")
        if name == "ekfac":
            notes.insert(0, "kronfluence; nn.Linear layers only")
        if name.startswith("cg-gn-linear@"):
            notes.insert(0, "the default iHVP on EK-FAC's parameters (nn.Linear only)")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return format_table(rows, list(cols)), rows, cols


def summary(out: Path, methods: list[str], args: argparse.Namespace, sl: dict[str, Any], n: int,
            t_start: float) -> None:
    """Print the table and its reading; write table.md and table.json."""
    from engine.influence.lds import spearman

    table, rows, cols = build_table(out, methods, args)
    by = {r["method"]: r for r in rows}
    sizes = ", ".join(f"{c}: {len(m)}" for c, (_, m) in cols.items())
    lines = [f"LDS on {args.fraction:.0%} subsets of a {n}-sample Games slice ({sl['info']['items']} items, "
             f"{sl['info']['valid_users']} validation users); retrained subsets per column: {sizes}", "", table, ""]
    d, a = by.get(f"cg-gn@{DEFAULT_DAMPING:g}"), by.get("align")
    if d and a:
        for c, (_, measured) in cols.items():
            if d.get(c) and a.get(c):
                pd_ = bootstrap_diff_ci(d["_pred"][c], a["_pred"][c], measured, n_boot=args.n_boot, seed=args.seed)
                d[c]["minus_align"] = pd_
                lines.append(f"- {c} target: default iHVP {d[c]['spearman']:+.3f} vs alignment {a[c]['spearman']:+.3f}: "
                             f"CIs {'apart' if ci_apart(d[c], a[c]) else 'overlap'}; paired bootstrap of the "
                             f"difference {pd_['diff']:+.3f} [{pd_['ci_low']:+.3f}, {pd_['ci_high']:+.3f}]")
    pairs = []
    for f0 in sorted(out.glob("retrain-???.json")):
        f1 = f0.with_name(f0.stem + "-seed1.json")
        if f1.exists():
            pairs.append((json.loads(f0.read_text()), json.loads(f1.read_text())))
    if len(pairs) >= 3:
        for t in TARGETS:
            x = np.array([p0["targets"][t] for p0, _ in pairs])
            y = np.array([p1["targets"][t] for _, p1 in pairs])
            rho = spearman(x, y)
            lo, hi = bootstrap_ci(x, y, n_boot=args.n_boot, seed=args.seed)
            lines.append(f"- retrain noise, {t} target: Spearman between the seed {args.seed} and seed {args.seed + 1} "
                         f"retrains of the same {len(pairs)} subsets = {rho:+.3f} [{lo:+.3f}, {hi:+.3f}]; std of the "
                         f"target over subsets {x.std():.4f}, mean |seed difference| {np.abs(x - y).mean():.4f}")
    secs = [json.loads(q.read_text())["seconds"] for q in sorted(out.glob("retrain-*.json"))] or [0.0]
    lines.append(f"- retrains: {len(secs)} files, {np.mean(secs):.1f} s each on average ({sum(secs) / 60:.1f} min "
                 f"in all); this invocation {(time.perf_counter() - t_start) / 60:.1f} min")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    _write_json(out / "table.json", {"rows": [{k: v for k, v in r.items() if k != "_pred"} for r in rows],
                                     "subsets_per_column": {c: len(m) for c, (_, m) in cols.items()}})
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/lds-games", help="a prepared Games folder")
    p.add_argument("--out", default="/tmp/lds-run")
    p.add_argument("--pool", type=int, default=2000, help="samples in the slice (seeded random)")
    p.add_argument("--subsets", type=int, default=50, help="retrains M")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="pool, subsets, surrogate init/shuffle, bootstrap")
    p.add_argument("--epochs", type=int, default=10, help="fixed epochs of every training (no early stopping)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--loss", default="sampled", choices=("sampled", "full"))
    p.add_argument("--negatives", type=int, default=128)
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument("--methods", nargs="*", default=None, help="default: all (see the docstring)")
    p.add_argument("--tol", type=float, default=1e-3, help="cg relative residual (prune's)")
    p.add_argument("--max-iter", type=int, default=150, help="cg iterations (prune's --ihvp-max-iter)")
    p.add_argument("--exact-max-params", type=int, default=20000)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--retrains-after", default=f"cg-gn@{DEFAULT_DAMPING:g}",
                   help="score the methods up to this one first, then retrain, then score the rest")
    p.add_argument("--noise-subsets", type=int, default=0,
                   help="retrain the first K subsets again with seed+1 (the retrain noise: how well one retrain's "
                        "target predicts another's of the same subset)")
    p.add_argument("--seeds-per-subset", type=int, default=1,
                   help="retrain every subset with training seeds seed..seed+K-1; the table adds columns against "
                        "the K-seed mean target (less retrain noise)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    recipe = {k: getattr(args, k) for k in ("data", "pool", "seed", "epochs", "batch_size", "lr", "weight_decay",
                                            "hidden", "blocks", "heads", "loss", "negatives")}
    recipe["data"] = str(Path(args.data).resolve())
    cfg_file = out / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old["recipe"] != recipe:
            diff = {k: (old["recipe"].get(k), v) for k, v in recipe.items() if old["recipe"].get(k) != v}
            sys.exit(f"{out} holds a run of another slice or recipe (changed: {diff}); use another --out")
    sl = load_slice(args.data, args.pool, args.seed)
    samples, n_items = sl["samples"], sl["n_items"]
    args.pool_n = n = samples.num_rows
    cfg = surrogate_config(args)
    if not args.table_only:
        _write_json(cfg_file, {"recipe": recipe, "slice": sl["info"], "surrogate": cfg.to_dict(),
                               "command": " ".join(sys.argv)})
    methods = method_list(args)
    for f in sorted(out.glob("noise-*.json")):  # the earlier name of the seed+1 retrains
        os.replace(f, _retrain_file(out, int(f.stem.split("-")[1]), 1))
    if args.table_only:
        summary(out, methods, args, sl, n, t_start)
        return
    log(f"slice: {sl['info']}; threads {torch.get_num_threads()}")

    ctx: dict[str, Any] = {"n": n, "samples": samples, "valid": sl["valid"]}
    ctx["train_batches"] = make_batches(samples, batch_size=256, max_len=cfg.max_len, order="length")
    ctx["train_order"] = np.concatenate([b["sample_id"].numpy() for b in ctx["train_batches"]])
    ctx["hessian_batches"] = ctx["train_batches"]  # H over every pool sample (prune: 4,096 >= the pool)
    ctx["valid_batches"] = make_batches(sl["valid"], batch_size=512, max_len=cfg.max_len)

    full_dir = out / "full"
    full_dir.mkdir(exist_ok=True)
    if (full_dir / "model.pt").exists():
        model = build_surrogate(n_items, cfg)
        model.load_state_dict(torch.load(full_dir / "model.pt"))
        model.eval()
    else:
        t0 = time.perf_counter()
        model = train(samples, None, n_items, cfg)
        sec = time.perf_counter() - t0
        torch.save(model.state_dict(), full_dir / "model.pt")
        _write_json(full_dir / "metrics.json", {"seconds": sec, "params": sum(q.numel() for q in model.parameters()),
                                                "targets": measure(model, ctx)})
    log(f"full-slice model: {json.loads((full_dir / 'metrics.json').read_text())}")
    ctx["g"] = {"train": mean_gradient(model, surrogate_loss, ctx["train_batches"])[0],
                "valid": mean_gradient(model, valid_loss, ctx["valid_batches"])[0]}

    def score(names: list[str]) -> None:
        for name in names:
            f = out / "scores" / f"{name}.json"
            if f.exists():
                continue
            log(f"scoring {name}")
            try:
                r = score_method(name, model, ctx, args)
            except Exception as e:  # an outside library (kronfluence) failing: its row says why
                if name != "ekfac":
                    raise
                import traceback

                traceback.print_exc()
                r = {"attribution": {}, "seconds": {}, "report": {}, "errors": {t: f"{type(e).__name__}: {e}"
                                                                                for t in TARGETS}}
            if r["attribution"]:
                np.savez(out / "scores" / f"{name}.npz", **r["attribution"])
            _write_json(f, {k: r[k] for k in ("seconds", "report", "errors")})

    first = methods[: methods.index(args.retrains_after) + 1] if args.retrains_after in methods else methods
    score(first)

    def retrain(j: int, seed_offset: int = 0) -> None:
        f = _retrain_file(out, j, seed_offset)
        if f.exists():
            return
        idx = subset_indices(n, j, fraction=args.fraction, seed=args.seed)
        t0 = time.perf_counter()
        c = surrogate_config(args, seed=args.seed + seed_offset)
        mdl = train(samples, idx, n_items, c)
        mdl.cfg = dataclasses.replace(mdl.cfg, seed=args.seed)  # the targets' fixed negatives: seed's
        rec = {"subset": j, "fraction": args.fraction, "kept": int(len(idx)), "train_seed": c.seed,
               "subset_sha1": hashlib.sha1(idx.tobytes()).hexdigest(), "targets": measure(mdl, ctx, idx),
               "seconds": time.perf_counter() - t0}
        _write_json(f, rec)
        log(f"{f.name}: {rec['targets']} ({rec['seconds']:.0f} s)")

    for j in range(args.subsets):
        retrain(j)
    for j in range(args.noise_subsets):
        retrain(j, seed_offset=1)
    for k in range(1, args.seeds_per_subset):
        for j in range(args.subsets):
            retrain(j, seed_offset=k)
    score(methods)

    summary(out, methods, args, sl, n, t_start)

if __name__ == "__main__":
    main()
