"""Evaluate an LLM recommender of any backend on the valid or test period: Recall/NDCG@K.

One evaluator (engine.evaluate.evaluate_backend) over ``backend.rank_items``: the users of the
period with items in it (history = everything before it, excluded from the ranking unless
``--keep-history``; targets = all the period's items), multi-target Recall@K / NDCG@K
(engine.metrics) and each user's values for paired bootstrap CIs.

* ``--backend bigrec`` (default): beam search with the LoRA adapter, base-model embedding of the
  answer, grounding to items (engine.llm.bigrec.generate). Title embeddings are cached on disk
  (keyed by base model + titles); on a miss a Ray Data ``TitleEmbedder`` pool fills the cache
  before the rankers start.
* ``--backend textrec``: the sentence encoder + the fine-tuned LoRA of ``--adapter`` (OUT/adapter
  of ``dealrec finetune --backend textrec``), cosine ranking over the catalogue.
* ``--backend tiger``: the fully fine-tuned T5 of ``--adapter`` (OUT/model of ``dealrec finetune
  --backend tiger``; without it ``--tiger-checkpoint`` or the seeded init) over the semantic IDs
  of ``--semantic-ids`` (default: the fine-tune's), beam search constrained to catalogue items.

Options left unset that the fine-tune recorded beside ``--adapter`` (its finetune_config.json:
bigrec prompt, cutoff length and history length; textrec encoder, prompt and text lengths; tiger
model options and semantic-ID folder) are taken from there, so an adapter is evaluated on the
text (or codes) it was trained on.

With Ray, a Ray Data pool of ``Ranker`` actors (actors/rank.py, one backend replica each) ranks
the users in batches of ``--user-batch``; ``--local`` runs the backend in this process. Writes
``--out`` (default ``ADAPTER/../metrics-<split>.json``; without an adapter
``DATA/metrics-<split>.json`` for bigrec, ``DATA/metrics-<backend>-<split>.json`` otherwise),
which records the backend, and ``<out stem>.per_user.npz`` beside it (user_ids, ranked, one array
per metric), both atomically, and prints a table. The folder's ``manifest.json`` records the
evaluation as stage ``evaluate:<file name>`` (engine.rundir.RunDir; its hash covers the config, the
backend options and the adapter's bytes): the same evaluation is not repeated, metrics of another
one at ``--out`` are refused unless ``--overwrite``.

On a cluster::

    ray job submit --working-dir . -- python jobs/evaluate.py --data /shared/games \\
        --adapter /shared/runs/games/ft/adapter --split test --beams 4 --workers 4 --prompt games
    ray job submit --working-dir . -- python jobs/evaluate.py --backend textrec --data /shared/games \\
        --adapter /shared/runs/games/ft-textrec/adapter --split test --workers 4

Tiny local variants (CPU; the BIGRec base model is read from the adapter's config)::

    python jobs/evaluate.py --data /tmp/games --adapter /tmp/ft/adapter --split test \\
        --beams 2 --max-new-tokens 16 --max-users 64 --local
    python jobs/evaluate.py --backend textrec --data /tmp/games --adapter /tmp/ft-text/adapter \\
        --max-users 64 --local

(``dealrec evaluate ...`` takes the same arguments.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io
import json
import time

import numpy as np
import pyarrow as pa

from engine.config import (STALL, STALL_TIMEOUT_S, STALL_WARN_S, collect_problems, raise_if, stable_hash, stall_ok,
                           versions)
from engine.data.schema import read_items, read_split
from engine.evaluate import EvalConfig, evaluate_backend
from engine.llm import get_backend
from engine.llm.bigrec.model import adapter_problem
from engine.llm.bigrec.prompts import PROMPTS
from engine.metrics import DEFAULT_KS, format_table
from engine.rundir import (RunDir, atomic_write_bytes, atomic_write_with, output_errors, read_json, tree_digest,
                           writable_problem)
from jobs.backend_args import add_backend_arguments, backend_record

#: the configs a fine-tune writes beside its adapter/ (jobs/finetune.py; finetune_textrec.json: runs of the removed jobs/finetune_textrec.py)
FINETUNE_RECORDS = ("finetune_config.json", "finetune_textrec.json")
#: the TextRecConfig fields an evaluation takes from that record (the model's text and LoRA shape)
TEXTREC_RECORDED = ("model", "prompt", "max_len_user", "max_len_item", "lora_r", "lora_alpha", "target_modules",
                    "encode_batch_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec evaluate`."""
    parser.add_argument("--data", required=True, help="prepared data folder")
    add_backend_arguments(parser)
    parser.add_argument("--adapter", default=None,
                        help="what the fine-tune trained: the peft adapter folder (OUT/adapter of dealrec finetune) "
                             "or, for --backend tiger, the whole model (OUT/model)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="cut-offs K")
    parser.add_argument("--max-users", type=int, default=None, help="seeded subset of users")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user subset")
    parser.add_argument("--keep-history", action="store_true",
                        help="do not exclude the users' history items from the ranking (BIGRec's original protocol)")
    parser.add_argument("--user-batch", type=int, default=64, help="users per rank_items call (one Ray batch)")
    parser.add_argument("--prompt", default=None, choices=sorted(PROMPTS),
                        help="prompt preset (default: the fine-tune's, recorded beside --adapter; else bigrec "
                             "generic, textrec games)")
    g = parser.add_argument_group("bigrec")
    g.add_argument("--beams", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    g.add_argument("--cutoff-len", type=int, default=None, help="max prompt tokens (default: the fine-tune's, else 512)")
    g.add_argument("--max-history", type=int, default=None,
                   help="newest history titles in a prompt (default: the fine-tune's, else 10)")
    g.add_argument("--chunk", type=int, default=4096, help="titles per grounding block")
    g.add_argument("--model", "--llm", default=None,
                   help="base model ('tiny', 'smollm2', a folder); default: the adapter's "
                        "base_model_name_or_path, else 'tiny'")
    g.add_argument("--cache-dir", default=".cache/dealrec", help="tiny bases and item-embedding cache")
    g.add_argument("--llm-seed", type=int, default=0, help="seed of a tiny base built here")
    parser.add_argument("--workers", type=int, default=1, help="actors per pool")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--local", action="store_true", help="no Ray: run the model in this process")
    parser.add_argument("--out", default=None, help="metrics JSON path")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace metrics at --out that another config (or another adapter) wrote")
    parser.add_argument("--address", default=None, help="Ray address")
    parser.add_argument("--stall-warn-s", type=float, default=STALL_WARN_S,
                        help="a model pool with no batch ranked and no actor working for this many seconds logs the "
                             "cluster's pending resource demands (0 = never)")
    parser.add_argument("--stall-timeout-s", type=float, default=STALL_TIMEOUT_S,
                        help="... and fails with a clear error after this many seconds (0 = wait forever); a slow "
                             "batch of a working actor is not a stall")


def _adapter_base(adapter: str | None) -> str | None:
    if not adapter:
        return None
    p = Path(adapter) / "adapter_config.json"
    if not p.exists():
        return None
    return read_json(p).get("base_model_name_or_path") or None


def _finetune_record(adapter: str | None, backend: str) -> dict:
    """The config of the ``backend`` fine-tune that wrote ``adapter`` (the JSON beside it), or {}."""
    for rec_path in ([Path(adapter).parent / f for f in FINETUNE_RECORDS] if adapter else []):
        if rec_path.is_file():
            conf = read_json(rec_path).get("config") or {}
            # the former textrec job recorded no backend; its config has a textrec section
            if conf.get("backend", "textrec" if "textrec" in conf else None) == backend:
                return conf
    return {}


def _bigrec_options(args) -> dict:
    from engine.llm.bigrec.generate import GenerationConfig
    from engine.llm.bigrec.model import LLMConfig
    from engine.llm.bigrec.prompts import get_prompt_config

    rec = _finetune_record(args.adapter, "bigrec")  # evaluate with the prompt the adapter was trained on

    def pick(flag, field, default):
        return flag if flag is not None else rec.get(field) if rec.get(field) is not None else default

    llm = LLMConfig.from_dict({"model": args.model or _adapter_base(args.adapter) or "tiny",
                               "cache_dir": str(Path(args.cache_dir).resolve()), "seed": args.llm_seed})
    gen = GenerationConfig(beams=args.beams, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           max_history=pick(args.max_history, "max_history", 10), chunk=args.chunk)
    prompt = get_prompt_config(pick(args.prompt, "prompt", "generic"),
                               cutoff_len=pick(args.cutoff_len, "cutoff_len", 512))
    return {"llm": llm.to_dict(), "prompt": prompt.to_dict(), "generation": gen.to_dict()}


def _textrec_options(args) -> dict:
    """TextRecConfig fields: those the fine-tune recorded beside ``--adapter``, then the options."""
    from engine.llm.textrec import TextRecConfig

    rec = _finetune_record(args.adapter, "textrec").get("textrec") or {}
    fields = {k: rec[k] for k in TEXTREC_RECORDED if k in rec}
    if "model" in fields and not (Path(str(fields["model"])) / "config.json").is_file():
        del fields["model"]  # recorded on another machine: the local default encoder
    if args.textrec_model:
        fields["model"] = str(Path(args.textrec_model).resolve())
    if args.prompt:
        fields["prompt"] = args.prompt
    return {"config": TextRecConfig(**fields).to_dict()}


def _tiger_options(args) -> dict:
    """``{"config": TigerConfig dict, "semantic_ids": folder}``: the TigerConfig fields and the
    semantic ids the fine-tune recorded beside ``--adapter`` (its ``model/``), then the options;
    the semantic ids checked against ``--data`` and the model folder against them.

    Raises:
        ConfigError: every problem, each naming its option.
    """
    from engine.errors import ConfigError
    from engine.llm.tiger.model import TokenLayout, checkpoint_problem
    from engine.semantic_ids import read_semantic_ids
    from jobs.backend_args import tiger_options

    rec = _finetune_record(args.adapter, "tiger")
    fields = {k: v for k, v in (rec.get("tiger") or {}).items() if k not in ("checkpoint", "device")}
    recorded = rec.get("semantic_ids")
    if recorded is not None and not Path(str(recorded)).is_dir():
        recorded = None  # recorded on another machine: give --semantic-ids
    opts, problems = tiger_options(args, args.data, defaults={**fields, "device": "auto"}, semantic_ids=recorded)
    if opts is not None and args.adapter:
        layout = TokenLayout(tuple(read_semantic_ids(opts["semantic_ids"]).level_sizes),
                             opts["config"]["n_user_tokens"])
        why = checkpoint_problem(args.adapter, layout)
        if why:
            problems.append(f"--adapter: {why}")
    if problems:
        raise ConfigError(problems, config="tiger")
    return opts


def config_from_args(args) -> tuple[EvalConfig, dict]:
    """The EvalConfig and the backend's options, validated together.

    Returns:
        ``(cfg, {"backend": name, "options": backend options, "adapter": folder or None})``.

    Raises:
        ConfigError: every problem at once.
    """
    option_builder = {"bigrec": _bigrec_options, "textrec": _textrec_options, "tiger": _tiger_options}.get(args.backend)
    builders = [
        ("evaluate", lambda: EvalConfig(
            data=str(Path(args.data).resolve()), split=args.split, ks=tuple(args.k), max_users=args.max_users,
            seed=args.seed, exclude_history=not args.keep_history, user_batch=args.user_batch)),
    ]
    if option_builder is not None:
        builders.append((args.backend, lambda: option_builder(args)))
    built, problems = collect_problems(builders)
    if option_builder is None:
        problems.append(f"--backend {args.backend!r}: this job knows the options of bigrec, textrec and tiger only")
    if args.backend != "tiger":  # TIGER options given to another backend: named
        from jobs.backend_args import tiger_config_fields

        problems.extend(tiger_config_fields(args)[1])
    if args.workers < 1:
        problems.append(f"--workers {args.workers} must be >= 1")
    for name in ("stall_warn_s", "stall_timeout_s"):
        v = getattr(args, name, 0.0)
        if not stall_ok(v):
            problems.append(f"--{name.replace('_', '-')} {v!r} must be >= 0 (0 = off)")
    if "evaluate" in built:  # the metrics file (and per-user values beside it) is checked before evaluating
        why = writable_problem(metrics_path(built["evaluate"], args.out, adapter=args.adapter, backend=args.backend),
                               option="--out", kind="file")
        if why:
            problems.append(why)
    if args.adapter and args.backend != "tiger":  # a malformed adapter folder is named here, not by peft
        why = adapter_problem(args.adapter)  # after the models loaded (tiger's model folder: _tiger_options)
        if why:
            problems.append(why)
    raise_if(problems, config="evaluate")
    return built["evaluate"], {"backend": args.backend, "options": built[args.backend],
                               "adapter": str(Path(args.adapter).resolve()) if args.adapter else None}


def metrics_path(cfg: EvalConfig, out: str | None, *, adapter: str | None = None, backend: str = "bigrec") -> Path:
    """Where the metrics JSON goes: ``out``, else ``ADAPTER/../metrics-<split>.json``, else
    ``DATA/metrics-<split>.json`` (bigrec) or ``DATA/metrics-<backend>-<split>.json``."""
    if out is not None:
        return Path(out)
    if adapter:
        return Path(adapter).resolve().parent / f"metrics-{cfg.split}.json"
    name = f"metrics-{cfg.split}.json" if backend == "bigrec" else f"metrics-{backend}-{cfg.split}.json"
    return Path(cfg.data) / name


def eval_run(outp: Path) -> tuple[RunDir, str]:
    """The run folder holding the metrics file and the file's stage in its manifest.json
    (``evaluate:<file name>``; beside a fine-tune's adapter that is the fine-tune's run folder)."""
    stage = f"evaluate:{outp.name}"
    return RunDir(outp.parent, {stage: [outp.name, per_user_path(outp).name]}, create=False), stage


def eval_hash(cfg: EvalConfig, spec: dict) -> str:
    """What an evaluation's result depends on: the config, the backend options and the adapter's bytes."""
    return stable_hash({"config": cfg.to_dict(), "backend": spec["backend"], "options": spec["options"],
                        "adapter": tree_digest(spec["adapter"])})


def per_user_path(metrics: Path) -> Path:
    """``<metrics stem>.per_user.npz`` beside the metrics JSON."""
    return metrics.with_name(f"{metrics.stem}.per_user.npz")


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


def pool_batches(ds, cls, kwargs: dict, *, workers: int, use_gpu: bool, batch_size: int,
                 stall: tuple[float, float] = STALL, name: str = "evaluate",
                 total: int | None = None) -> list[dict]:
    """The output batches of ``ds`` mapped by a pool of ``workers`` ``cls`` actors.

    Under the heartbeat watchdog of the shard runner (actors.shards.watched_batches), not Ray
    Data's no-progress guard: a block here is a quarter of a worker's users, and a slow model
    ranking it for longer than the guard's 30 min would fail a working evaluation. ``stall``:
    (warn, timeout) seconds without a batch and with no actor working (0 = off)."""
    import ray

    from actors.rank import actor_resources
    from actors.shards import Beating, heartbeat_actor, watched_batches

    warn, timeout = stall
    with heartbeat_actor(warn, timeout) as (heartbeat, beat_s):
        mapped = ds.map_batches(Beating, fn_constructor_args=(cls, (), kwargs, heartbeat, beat_s),
                                compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size,
                                batch_format="numpy", **actor_resources(use_gpu=use_gpu))
        return list(watched_batches(mapped, heartbeat=heartbeat, stall_warn_s=warn, stall_timeout_s=timeout,
                                    knobs=f"--workers {workers} / --gpu, --stall-timeout-s {timeout:g}", name=name,
                                    progress=print, total=total))


def fill_title_cache_ray(ray, spec: dict, titles_ref, missing: list[str], *, workers: int, use_gpu: bool,
                         batch_size: int = 32, stall: tuple[float, float] = STALL) -> np.ndarray:
    """Embeddings of the ``missing`` titles through a Ray Data ``TitleEmbedder`` pool (index order)."""
    from actors.rank import TitleEmbedder

    tbl = pa.table({"title_idx": np.arange(len(missing), dtype=np.int64), "title": missing})
    n_blocks = max(1, min(len(missing) // max(1, batch_size), 4 * workers))
    batches = pool_batches(ray.data.from_arrow(_blocks(tbl, n_blocks)), TitleEmbedder,
                           {"backend": spec["backend"], "titles": titles_ref, "options": spec["options"],
                            "use_gpu": use_gpu},
                           workers=workers, use_gpu=use_gpu, batch_size=batch_size, stall=stall, name="embed titles",
                           total=len(missing))
    emb = np.zeros((len(missing), batches[0]["embedding"].shape[1]), dtype=np.float32)
    for b in batches:
        emb[np.asarray(b["title_idx"], dtype=np.int64)] = b["embedding"]
    return emb


def rank_ray(ray, spec: dict, titles_ref, *, workers: int, use_gpu: bool, user_batch: int,
             stall: tuple[float, float] = STALL, ranker: type | None = None):
    """``rank(histories, exclude, k)`` through a Ray Data pool of ``Ranker`` actors (row order kept;
    ``ranker``: another class with Ranker's constructor, for tests)."""
    from actors.rank import Ranker

    def rank(histories, exclude, k):
        tbl = pa.table({"row": np.arange(len(histories), dtype=np.int64),
                        "history": pa.array(histories, pa.list_(pa.int32())),
                        "exclude": pa.array(exclude, pa.list_(pa.int32()))})
        n_blocks = max(1, min(len(histories) // max(1, user_batch), 4 * workers))
        batches = pool_batches(ray.data.from_arrow(_blocks(tbl, n_blocks)), ranker or Ranker,
                               {"backend": spec["backend"], "titles": titles_ref, "options": spec["options"],
                                "adapter": spec["adapter"], "k": k, "use_gpu": use_gpu},
                               workers=workers, use_gpu=use_gpu, batch_size=user_batch, stall=stall, name="rank",
                               total=len(histories))
        out = np.full((len(histories), k), -1, dtype=np.int64)
        for b in batches:
            out[np.asarray(b["row"], dtype=np.int64)] = b["ranked"]
        return out

    return rank


def evaluate(cfg: EvalConfig, spec: dict, *, out: str | None = None, workers: int = 1, local: bool = False,
             gpu: str = "auto", stall: tuple[float, float] = STALL) -> dict:
    """Run the evaluation end to end and write the metrics JSON and the per-user values.

    Args:
        cfg: validated EvalConfig.
        spec: ``{"backend", "options", "adapter"}`` (see :func:`config_from_args`).
        out: metrics JSON path (default: :func:`metrics_path`).
        workers: actors per Ray Data pool.
        local: run in this process without Ray.
        gpu: auto | yes | no.
        stall: (warn, timeout) seconds of the model pools' stall watchdog (:func:`pool_batches`).

    Returns:
        The report written (metrics, counts, timings, backend, config) and ``path``.
    """
    t0 = time.perf_counter()
    titles = read_items(cfg.data).column("title").to_pylist()
    split = read_split(cfg.data, cfg.split)
    spec = dict(spec)
    backend = get_backend(spec["backend"], titles, **spec["options"])
    if hasattr(backend, "base_model"):  # resolve (and build) a tiny base once, here, not in every actor
        spec["options"] = dict(spec["options"], llm=dict(spec["options"]["llm"], model=backend.base_model()))
        backend = get_backend(spec["backend"], titles, **spec["options"])
    timings: dict = {}
    cache_hit = None
    if local:
        model = backend.load_model(spec["adapter"])  # on the device its config names
        use_gpu = next(model.parameters()).device.type == "cuda"
        if hasattr(backend, "title_embeddings"):
            t = time.perf_counter()
            backend.title_embeddings(model)
            timings["title_embedding_s"] = time.perf_counter() - t
            cache_hit = backend.title_cache_hit
        rank = None
    else:
        import ray

        use_gpu = _use_gpu(ray, gpu)
        titles_ref = ray.put(titles)
        missing = backend.title_cache_missing() if hasattr(backend, "title_cache_missing") else None
        if hasattr(backend, "title_cache_missing"):
            cache_hit = missing is None
        if missing:
            t = time.perf_counter()
            backend.store_title_embeddings(fill_title_cache_ray(ray, spec, titles_ref, missing, workers=workers,
                                                                use_gpu=use_gpu, stall=stall))
            timings["title_embedding_s"] = time.perf_counter() - t
        model = None
        rank = rank_ray(ray, spec, titles_ref, workers=workers, use_gpu=use_gpu, user_batch=cfg.user_batch,
                        stall=stall)
    res = evaluate_backend(backend, model, split, ks=cfg.ks, max_users=cfg.max_users, seed=cfg.seed,
                           exclude_history=cfg.exclude_history, user_batch=cfg.user_batch, rank=rank)
    timings.update(res["timings"], total_s=time.perf_counter() - t0)
    outp = metrics_path(cfg, out, adapter=spec["adapter"], backend=spec["backend"])
    with output_errors(outp, option="--out"):
        outp.parent.mkdir(parents=True, exist_ok=True)
    pu = per_user_path(outp)
    report = {"backend": backend_record(spec["backend"], spec["options"]), "adapter": spec["adapter"],
              "split": cfg.split, "metrics": res["metrics"], "ks": list(cfg.ks), "users": len(res["user_ids"]),
              "exclude_history": cfg.exclude_history, "items": len(titles), "timings": timings, "use_gpu": use_gpu,
              "per_user": pu.name, "config": cfg.to_dict(), "versions": versions()}
    if spec["backend"] == "bigrec":
        report.update(llm=dict(spec["options"]["llm"], adapter=spec["adapter"]), title_embedding_cache_hit=cache_hit,
                      distinct_titles=len(backend.title_index.titles))

    def write_npz(tmp):
        buf = io.BytesIO()
        np.savez_compressed(buf, user_ids=np.asarray(res["user_ids"], dtype=str), ranked=res["ranked"],
                            **res["per_user"])
        tmp.write_bytes(buf.getvalue())

    atomic_write_with(pu, write_npz, option="--out")
    atomic_write_bytes(outp, json.dumps(report, indent=2, default=str).encode(), option="--out")
    report["path"] = str(outp)
    return report


def run(args) -> int:
    """Entry point of `dealrec evaluate` / `python jobs/evaluate.py`.

    Returns:
        0 on success.
    """
    cfg, spec = config_from_args(args)
    outp = metrics_path(cfg, args.out, adapter=spec["adapter"], backend=spec["backend"])
    rd, stage = eval_run(outp)
    h = eval_hash(cfg, spec)
    rd.plan({stage: h}, overwrite=args.overwrite)  # metrics of another config at --out: refused, before Ray starts
    if rd.done(stage) and rd.manifest["stages"][stage].get("config_hash") == h and outp.exists() \
            and per_user_path(outp).exists():
        print(f"metrics: {outp} (this evaluation finished before; not repeated)")
        return 0
    if not args.local:
        from jobs.ray_init import init_ray

        init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
    rd.check({stage: h}, overwrite=args.overwrite)
    rep = evaluate(cfg, spec, out=args.out, workers=args.workers, local=args.local, gpu=args.gpu,
                   stall=(args.stall_warn_s, args.stall_timeout_s))
    rd.finish(stage, rep["timings"]["total_s"], users=rep["users"], backend=spec["backend"])
    extra = ""
    if rep.get("title_embedding_cache_hit") is not None:
        extra = (f", {rep['distinct_titles']} distinct titles "
                 f"(cache {'hit' if rep['title_embedding_cache_hit'] else 'miss'})")
    print(f"{spec['backend']} {cfg.split}: {rep['users']} users{extra}, {rep['timings']['total_s']:.1f}s")
    print(format_table(rep["metrics"], ks=cfg.ks))
    print(f"metrics: {rep['path']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
