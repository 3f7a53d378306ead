"""Deprecated: ``dealrec finetune --backend textrec`` (jobs/finetune.py) is the text-encoder fine-tune.

A thin wrapper kept for ``benchmarks/selection_quality.py`` and ``jobs/tune_textrec.py`` until they
call the generic job: :func:`TextFinetuneConfig` maps the former config (training hyper-parameters
inside ``textrec``) onto :class:`engine.finetune.FinetuneConfig` with ``backend="textrec"`` and the
former loop's settings (constant lr, no warm-up, no clipping, whole-batch steps, no validation
loss, evaluation on ``split``), so its runs train the adapter they trained before.

    python jobs/finetune.py --backend textrec --data /tmp/games --all --out /tmp/textrec --strategy local
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.finetune import FinetuneConfig, load_adapter
from engine.llm.textrec.backend import gathered_train_loss
from engine.llm.textrec.config import TextRecConfig
from jobs.finetune import (ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, PER_USER_FILE, REPORT_FILE, evaluate_adapter,
                           evaluate_splits, read_per_user)
from jobs.finetune import fit as _fit

__all__ = ["TextFinetuneConfig", "fit", "load_adapter", "evaluate_adapter", "evaluate_splits", "read_per_user",
           "sharded_train_loss", "ADAPTER_DIR", "CONFIG_FILE", "METRICS_FILE", "PER_USER_FILE", "TRAIN_FILE"]

TRAIN_FILE = REPORT_FILE
_FROM_TEXTREC = ("lr", "epochs", "batch_size", "weight_decay", "seed")


def TextFinetuneConfig(**fields) -> FinetuneConfig:  # noqa: N802 - the former class name
    """The former config's fields (or a FinetuneConfig's ``to_dict()``) -> a textrec FinetuneConfig."""
    tc = fields.get("textrec") or {}
    tc = tc.to_dict() if isinstance(tc, TextRecConfig) else dict(tc)
    defaults = TextRecConfig.__dataclass_fields__
    for k in _FROM_TEXTREC:
        fields[k] = tc.get(k, defaults[k].default)
    fields.update(backend="textrec", textrec=tc, micro_batch=None, lr_schedule="constant", warmup_steps=0,
                  val_samples=0, max_history=None)
    for k, v in (("max_grad_norm", 0.0), ("split", "test"), ("use_gpu", False)):
        fields.setdefault(k, v)
    return FinetuneConfig(**fields)


def fit(cfg: FinetuneConfig, *, overwrite: bool = False, log=print) -> dict:
    """:func:`jobs.finetune.fit`, as ``{"train": report, "metrics", "trained", "evaluated"}``."""
    rep = _fit(cfg, overwrite=overwrite, log=log)
    return {"train": rep, "metrics": rep["metrics"], "trained": rep["trained"], "evaluated": rep["evaluated"]}


def sharded_train_loss(model, batch: dict, groups, *, rank: int, world: int):
    """The textrec backend's loss of rank ``rank``'s slice (``groups``: the slice's title groups)."""
    if world == 1:
        from engine.llm.textrec import train_loss

        return train_loss(model, {**batch, "target_groups": groups})
    return gathered_train_loss(model, {**batch, "target_groups": groups}, rank=rank, world=world)


if __name__ == "__main__":  # the former command line: its --model is the encoder
    from jobs import finetune as job
    from jobs.cli import run_script

    argv = ["--backend", "textrec", "--split", "test", "--val-samples", "0"]
    sys.exit(run_script(job.add_arguments, job.run, __doc__,
                        argv + ["--textrec-model" if a == "--model" else a for a in sys.argv[1:]]))
