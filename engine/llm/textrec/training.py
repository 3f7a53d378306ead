"""In-process fine-tuning of the LoRA (:func:`train`) and the validation loss (:func:`mean_loss`)."""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.llm.textrec.config import TextRecConfig
from engine.llm.textrec.losses import collate_effort, collate_train, per_sample_loss, train_loss
from engine.llm.textrec.model import TextRecModel
from engine.llm.textrec.text import _as_catalogue, _columns, _to


def mean_loss(model: TextRecModel, samples, titles, *, batch_size: int = 64) -> float:
    """Mean :func:`per_sample_loss` (fixed negatives, eval mode, no grad): a validation loss.

    Args:
        model: a :class:`TextRecModel`.
        samples: samples Table (``sample_id``, ``history``, ``target``) or dict of those columns.
        titles: :class:`Catalogue` or the item titles.
        batch_size: samples per forward (the result does not depend on it).

    Returns:
        The mean loss (nan for no samples).
    """
    cat = _as_catalogue(titles)
    sid, hist, tgt = _columns(samples)
    if len(tgt) == 0:
        return float("nan")
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    tot = 0.0
    with torch.no_grad():
        for s in range(0, len(tgt), batch_size):
            b = collate_effort(model.tokenizer, cat, sid[s:s + batch_size], hist[s:s + batch_size],
                               tgt[s:s + batch_size], model.cfg)
            tot += float(per_sample_loss(model, _to(b, dev)).double().sum())
    model.train(was)
    return tot / len(tgt)


def train(model: TextRecModel, samples, cfg: TextRecConfig | None = None, *, titles, val_samples=None,
          log_every: int = 0) -> list[dict]:
    """Fine-tune the LoRA in process: AdamW on the in-batch softmax, seeded shuffling.

    Args:
        model: from :func:`build_model` (updated in place; left in eval mode).
        samples: training samples (samples Table or dict of ``history``/``target`` columns).
        cfg: lr, weight_decay, epochs, batch_size, seed (default: ``model.cfg``).
        titles: :class:`Catalogue` or the item titles.
        val_samples: optional samples whose :func:`mean_loss` is recorded before training and after
            each epoch.
        log_every: print the running loss every this many steps (0: quiet).

    Returns:
        One dict per epoch (``epoch`` 0 = before training when ``val_samples`` is given):
        ``train_loss``, ``steps``, ``seconds``, ``seconds_per_step``, ``val_loss``.
    """
    cfg = cfg or model.cfg
    cat = _as_catalogue(titles)
    _, hist, tgt = _columns(samples)
    n = len(tgt)
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    history: list[dict] = []
    if val_samples is not None:
        history.append({"epoch": 0, "train_loss": None, "steps": 0, "seconds": 0.0, "seconds_per_step": None,
                        "val_loss": mean_loss(model, val_samples, cat)})
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        model.train()
        # A last batch of one sample has no in-batch negative: it is dropped for this epoch.
        for s in range(0, n - 1, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            batch = _to(collate_train(model.tokenizer, cat, [hist[i] for i in idx], tgt[idx], cfg), dev)
            loss = train_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if log_every and step % log_every == 0:
                print(f"  step {step}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        model.eval()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "steps": len(losses), "seconds": dt, "seconds_per_step": dt / max(1, len(losses))}
        if val_samples is not None:
            rec["val_loss"] = mean_loss(model, val_samples, cat)
        history.append(rec)
    return history
