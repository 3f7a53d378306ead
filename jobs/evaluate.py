"""Evaluate a fine-tuned BIGRec adapter: generate, ground to items, Recall/NDCG@K.

Ray Data runs two actor pools (actors/generate.py): ``TitleEmbedder`` embeds every
distinct item title with the base model once (cached on disk, keyed by model + titles),
and ``Generator`` answers each user's BIGRec prompt by beam search (adapter on) and
embeds the answer with the base model. The driver grounds the answers to items by
chunked L2 top-K (engine.grounding) and computes multi-target Recall@K / NDCG@K over the
users with items in the period (engine.metrics). Writes ``--out`` (default
``ADAPTER/../metrics-<split>.json``) and ``generations-<split>.parquet`` beside it, and
prints a table.

On a cluster::

    ray job submit --working-dir . -- python jobs/evaluate.py --data /shared/games \\
        --adapter /shared/runs/games/ft/adapter --split test --beams 4 --workers 4 --prompt games

Tiny local variant (CPU; the base model is read from the adapter's config)::

    python jobs/evaluate.py --data /tmp/games --adapter /tmp/ft/adapter --split test \\
        --beams 2 --max-new-tokens 16 --max-users 64 --workers 1

(``dealrec evaluate ...`` takes the same arguments; ``--local`` skips Ray entirely.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import collect_problems, raise_if, versions
from engine.data.schema import read_items, read_split
from engine.errors import ConfigError, DataError, ResumeError
from engine.evaluate import EvalConfig, cached_title_embeddings, eval_requests, score_generations
from engine.grounding import index_titles
from engine.llm.bigrec.model import LLMConfig, adapter_problem, resolve_base
from engine.metrics import DEFAULT_KS, format_table
from engine.llm.bigrec.prompts import PROMPTS
from engine.rundir import atomic_write_bytes, atomic_write_with, output_errors, read_json, writable_problem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec evaluate`."""
    parser.add_argument("--data", required=True, help="prepared data folder")
    parser.add_argument("--adapter", default=None, help="peft adapter folder (OUT/adapter of dealrec finetune)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="cut-offs K")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-users", type=int, default=None, help="seeded subset of users")
    parser.add_argument("--prompt", default="generic", choices=sorted(PROMPTS))
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=4096, help="titles per grounding block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", "--llm", default=None,
                        help="base model ('tiny', 'smollm2', a folder); default: the adapter's "
                             "base_model_name_or_path, else 'tiny'")
    parser.add_argument("--cache-dir", default=".cache/dealrec", help="tiny bases and item-embedding cache")
    parser.add_argument("--llm-seed", type=int, default=0, help="seed of a tiny base built here")
    parser.add_argument("--workers", type=int, default=1, help="actors per pool")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--local", action="store_true", help="no Ray: run the models in this process")
    parser.add_argument("--out", default=None, help="metrics JSON path")
    parser.add_argument("--address", default=None, help="Ray address")


def config_from_args(args) -> tuple[EvalConfig, dict]:
    """The EvalConfig and the LLMConfig fields, validated together.

    Raises:
        ConfigError: every problem at once.
    """
    built, problems = collect_problems([
        ("evaluate", lambda: EvalConfig(
            data=str(Path(args.data).resolve()),
            adapter=str(Path(args.adapter).resolve()) if args.adapter else None, split=args.split,
            beams=args.beams, max_new_tokens=args.max_new_tokens, ks=tuple(args.k), batch_size=args.batch_size,
            max_users=args.max_users, prompt=args.prompt, cutoff_len=args.cutoff_len,
            max_history=args.max_history, chunk=args.chunk, seed=args.seed)),
    ])
    if args.workers < 1:
        problems.append(f"workers={args.workers} must be >= 1")
    if "evaluate" in built:  # the metrics file (and generations beside it) is checked before evaluating
        why = writable_problem(metrics_path(built["evaluate"], args.out), option="--out", kind="file")
        if why:
            problems.append(why)
    if args.adapter:  # a malformed adapter folder is named here, not by peft after the models loaded
        why = adapter_problem(args.adapter)
        if why:
            problems.append(why)
    raise_if(problems, config="evaluate")
    llm = {"model": args.model or _adapter_base(args.adapter) or "tiny", "adapter": built["evaluate"].adapter,
           "cache_dir": str(Path(args.cache_dir).resolve()), "seed": args.llm_seed}
    _, problems = collect_problems([("llm", lambda: LLMConfig.from_dict(llm))])
    raise_if(problems, config="evaluate")
    return built["evaluate"], llm


def _adapter_base(adapter: str | None) -> str | None:
    if not adapter:
        return None
    p = Path(adapter) / "adapter_config.json"
    if not p.exists():
        return None
    return read_json(p).get("base_model_name_or_path") or None


def metrics_path(cfg: EvalConfig, out: str | None) -> Path:
    """Where the metrics JSON goes: ``out``, else ``ADAPTER/../metrics-<split>.json`` (or
    ``DATA/metrics-<split>.json`` without an adapter); the generations go beside it."""
    if out is not None:
        return Path(out)
    root = Path(cfg.adapter).parent if cfg.adapter else Path(cfg.data)
    return root / f"metrics-{cfg.split}.json"


def _use_gpu(ray, choice: str) -> bool:
    if choice == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return choice == "yes"


def _blocks(tbl: pa.Table, n: int) -> list[pa.Table]:
    """``tbl`` as ``n`` contiguous slices, the blocks of ``ray.data.from_arrow``. Not
    ``.repartition(n)``: that runs as tasks that ask for CPU, which on small nodes whose CPUs
    the model actors hold may wait behind the pool (the multi-node review of issue 16)."""
    edges = np.linspace(0, tbl.num_rows, n + 1).astype(int)
    return [tbl.slice(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:]) if b > a] or [tbl]


def embed_titles_ray(ray, llm: dict, titles: list[str], *, workers: int, use_gpu: bool, batch_size: int = 32):
    """Base-model embeddings of ``titles`` through a Ray Data ``TitleEmbedder`` pool."""
    from actors.generate import TitleEmbedder, actor_resources

    tbl = pa.table({"title_idx": np.arange(len(titles), dtype=np.int64), "title": titles})
    n_blocks = max(1, min(len(titles) // max(1, batch_size), 4 * workers))
    ds = ray.data.from_arrow(_blocks(tbl, n_blocks)).map_batches(
        TitleEmbedder, fn_constructor_kwargs={"llm": llm, "batch_size": batch_size, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size, batch_format="numpy",
        **actor_resources(use_gpu=use_gpu))
    rows = ds.take_all()
    emb = np.zeros((len(titles), len(rows[0]["embedding"])), dtype=np.float32)
    for r in rows:
        emb[int(r["title_idx"])] = r["embedding"]
    return emb


def generate_ray(ray, llm: dict, titles: list[str], histories: list[list[int]], cfg: EvalConfig, *, workers: int,
                 use_gpu: bool) -> tuple[list[str], np.ndarray]:
    """Generations and their embeddings through a Ray Data ``Generator`` pool (row order kept)."""
    from actors.generate import Generator, actor_resources

    tbl = pa.table({"row": np.arange(len(histories), dtype=np.int64),
                    "history": pa.array(histories, pa.list_(pa.int32()))})
    n_blocks = max(1, min(len(histories) // max(1, cfg.batch_size), 4 * workers))
    ds = ray.data.from_arrow(_blocks(tbl, n_blocks)).map_batches(
        Generator,
        fn_constructor_kwargs={"llm": llm, "titles": ray.put(titles), "prompt": cfg.prompt,
                               "cutoff_len": cfg.cutoff_len, "beams": cfg.beams,
                               "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                               "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=cfg.batch_size, batch_format="numpy",
        **actor_resources(use_gpu=use_gpu))
    rows = ds.take_all()
    texts = [""] * len(histories)
    emb = None
    for r in rows:
        i = int(r["row"])
        if emb is None:
            emb = np.zeros((len(histories), len(r["embedding"])), dtype=np.float32)
        texts[i] = str(r["generated"])
        emb[i] = r["embedding"]
    return texts, (emb if emb is not None else np.zeros((0, 0), dtype=np.float32))


def evaluate(cfg: EvalConfig, llm: dict, *, out: str | None = None, workers: int = 1, local: bool = False,
             gpu: str = "auto") -> dict:
    """Run the evaluation end to end and write the metrics JSON.

    Args:
        cfg: validated EvalConfig.
        llm: LLMConfig fields (``model`` base, ``adapter``).
        out: metrics JSON path (default ``ADAPTER/../metrics-<split>.json`` or
            ``DATA/metrics-<split>.json`` without adapter).
        workers: actors per Ray Data pool.
        local: run in this process without Ray.
        gpu: auto | yes | no.

    Returns:
        The report written (metrics, counts, timings, config).
    """
    t0 = time.perf_counter()
    items = read_items(cfg.data)
    titles = items.column("title").to_pylist()
    index = index_titles(titles)
    split = read_split(cfg.data, cfg.split)
    req = eval_requests(split, titles, max_history=cfg.max_history, max_users=cfg.max_users, seed=cfg.seed)
    llm = dict(llm)
    base = resolve_base(LLMConfig.from_dict(dict(llm, adapter=None)), titles)
    llm["model"] = str(Path(base).resolve()) if Path(base).exists() else base
    timings = {}
    if local:
        from engine.evaluate import embed_texts, generate_texts
        from engine.llm.bigrec.model import load_llm

        model, tok = load_llm(LLMConfig.from_dict(llm), trainable=False)
        t = time.perf_counter()
        title_emb, hit = cached_title_embeddings(
            llm["cache_dir"], llm["model"], index.titles,
            lambda ts: embed_texts(model, tok, list(ts), batch_size=32, base=True))
        timings["title_embedding_s"] = time.perf_counter() - t
        t = time.perf_counter()
        texts = generate_texts(model, tok, req["history_titles"], cfg.prompt_config(), beams=cfg.beams,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        q = embed_texts(model, tok, texts, batch_size=cfg.batch_size, base=True)
        timings["generation_s"] = time.perf_counter() - t
        use_gpu = False
    else:
        import ray

        use_gpu = _use_gpu(ray, gpu)
        t = time.perf_counter()
        title_emb, hit = cached_title_embeddings(
            llm["cache_dir"], llm["model"], index.titles,
            lambda ts: embed_titles_ray(ray, llm, list(ts), workers=workers, use_gpu=use_gpu))
        timings["title_embedding_s"] = time.perf_counter() - t
        t = time.perf_counter()
        texts, q = generate_ray(ray, llm, titles, req["history"], cfg, workers=workers, use_gpu=use_gpu)
        timings["generation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics, ranked = score_generations(q, title_emb, index, req["targets"], ks=cfg.ks, chunk=cfg.chunk)
    timings["grounding_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    outp = metrics_path(cfg, out)
    with output_errors(outp, option="--out"):
        outp.parent.mkdir(parents=True, exist_ok=True)
    report = {"split": cfg.split, "metrics": metrics, "ks": list(cfg.ks), "users": len(req["user_id"]),
              "title_embedding_cache_hit": hit, "distinct_titles": len(index.titles), "items": index.n_items,
              "timings": timings, "use_gpu": use_gpu, "config": cfg.to_dict(), "llm": llm, "versions": versions()}
    k = max(cfg.ks)
    gen_tbl = pa.table({
        "user_id": req["user_id"], "generated": texts,
        "targets": pa.array(req["targets"], pa.list_(pa.int32())),
        f"top{k}": pa.array(ranked.tolist(), pa.list_(pa.int64())),
    })
    atomic_write_with(outp.with_name(f"generations-{cfg.split}.parquet"), lambda tmp: pq.write_table(gen_tbl, tmp),
                      option="--out")
    atomic_write_bytes(outp, json.dumps(report, indent=2, default=str).encode(), option="--out")
    report["path"] = str(outp)
    return report


def run(args) -> int:
    """Entry point of `dealrec evaluate` / `python jobs/evaluate.py`.

    Returns:
        0 on success.
    """
    cfg, llm = config_from_args(args)
    if not args.local:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
    rep = evaluate(cfg, llm, out=args.out, workers=args.workers, local=args.local, gpu=args.gpu)
    print(f"{cfg.split}: {rep['users']} users, {rep['distinct_titles']} distinct titles "
          f"(cache {'hit' if rep['title_embedding_cache_hit'] else 'miss'}), {rep['timings']['total_s']:.1f}s")
    print(format_table(rep["metrics"], ks=cfg.ks))
    print(f"metrics: {rep['path']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
