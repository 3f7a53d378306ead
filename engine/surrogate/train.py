"""Training of a surrogate: one loop for the local run, data-parallel ranks and streamed chunks."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from engine.errors import ConfigError, DataError, check
from engine.surrogate.batching import _slice_encoded, encode_samples, make_batches
from engine.surrogate.config import SurrogateConfig
from engine.surrogate.evaluate import evaluate_ranking
from engine.surrogate.models import BERT4Rec, SASRec, build_surrogate


class _TrainStep(nn.Module):
    """``forward(batch, generator) = model.training_loss(batch, generator)``.

    The module a data-parallel wrapper (DDP via ``ray.train.torch.prepare_model``) is given:
    DDP synchronises the gradients of what its ``forward`` computes, and the surrogates expose
    their objective as ``training_loss``. Parameters are the model's own (prefix ``model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        return self.model.training_loss(batch, generator)


def _rank_seed(seed: int, rank: int) -> int:
    """A seed derived from (seed, rank) for ranks > 0 (rank 0 keeps ``seed``'s own stream)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _dist_all_gather(obj: Any) -> list[Any]:
    """Default ``reduce_fn``: ``torch.distributed.all_gather_object`` over the default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(["world_size > 1 needs an initialised torch.distributed process group "
                           "(Ray Train creates one) or an explicit reduce_fn"], config="train_surrogate")
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _no_log(_: str) -> None:
    return None


def _buffer_groups(order: Sequence[int], chunk: Callable[[int], dict[str, np.ndarray]],
                   buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """Encoded chunks in ``order``, concatenated until each group holds >= ``buffer`` rows
    (whole chunks; the last group may be smaller)."""
    parts: list[dict[str, np.ndarray]] = []
    rows = 0
    for i, ci in enumerate(order):
        parts.append(chunk(int(ci)))
        rows += len(parts[-1]["sample_id"])
        if rows >= buffer or i == len(order) - 1:
            g = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            parts, rows = [], 0
            yield g
            del g  # one buffer alive at a time (the caller drops its reference before the next)


def train_surrogate(
    samples: pa.Table | Mapping[str, np.ndarray] | Sequence[Callable[[], Any]],
    n_items: int,
    cfg: SurrogateConfig,
    *,
    valid: pa.Table | Mapping[str, np.ndarray] | None = None,
    log: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    reduce_fn: Callable[[Any], list[Any]] | None = None,
    init_state: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
) -> tuple[SASRec | BERT4Rec, list[dict[str, float]]]:
    """Train a surrogate on all samples; a pure function (no Ray), also the loop of one data-parallel rank.

    Objective: J(theta) = mean_s L_s(theta) + (weight_decay/2)||theta||^2 (Adam with coupled
    L2), dropout on. Early stopping on validation Recall@K (full ranking, seen items masked);
    the best checkpoint is returned. Without ``valid`` the last epoch is returned.

    Data parallel (``world_size`` > 1; jobs/surrogate_train.py runs it under Ray Train): every
    rank draws the same seeded epoch permutation, pads it cyclically to a multiple of
    ``world_size`` (as torch's DistributedSampler does, so every rank runs the same number of
    steps) and takes ``perm[rank::world_size]`` in batches of ``cfg.batch_size // world_size``;
    with DDP's gradient averaging one step equals a local step on ``cfg.batch_size`` samples.
    Rank 0 runs the validation; its Recall/NDCG, the summed train loss and the time-box flag
    reach every rank through ``reduce_fn``, so every rank takes the same early-stopping
    decision, keeps the same best state and returns the same (unwrapped) model. Dropout (and
    BERT4Rec's training masks) use a per-(seed, rank) stream; rank 0's is the local one, so
    ``world_size=1`` gives exactly the local result. Only rank 0 logs.

    Streaming (bounded memory): ``samples`` may be a list of loaders, each a callable that
    returns one chunk (a Table or dict of numpy; e.g. one samples Parquet file). Every epoch
    reads the chunks in a seeded random order into a shuffle buffer of at least
    ``cfg.shuffle_buffer`` samples (whole chunks) and trains on a seeded random permutation of
    the buffer, then refills it. A shuffle within one file at a time is not enough: prepared
    files are often sorted (Games' are by user id, i.e. by time: later files have newer items and
    shorter histories), and training on them one after the other let each file undo the last
    (Games: validation Recall@20 fell from 0.025 to 0.015 over 3 epochs, against 0.044 for the
    same data in memory). Data-parallel ranks all read each buffer and take their stride of it
    (cyclic padding per buffer). One chunk (an in-memory table) gives exactly the in-memory result.

    Args:
        samples: canonical samples (Table or dict of numpy), or a list of chunk loaders.
        n_items: catalogue size.
        cfg: validated :class:`SurrogateConfig`.
        valid: optional valid table (history, targets) for early stopping; read on rank 0 only
            (other ranks may pass None).
        log: receives one progress/metrics line at a time.
        rank: this process's data-parallel rank (0..world_size-1).
        world_size: number of data-parallel ranks; ``cfg.batch_size`` must be a multiple of it.
        wrap_model: applied once to the module whose ``forward(batch, generator)`` returns the
            training loss, e.g. ``ray.train.torch.prepare_model`` (DDP; may also move it to the
            rank's device; batches follow the parameters' device). None = no wrapper.
        reduce_fn: an all-gather of one picklable object per rank: ``reduce_fn(obj)`` returns
            the list of every rank's object in rank order, the same on every rank. Called once
            per epoch (and once per batch when ``cfg.max_minutes`` is set). None = ``torch.distributed.
            all_gather_object`` when ``world_size`` > 1 (needs an initialised process group).
        init_state: a state dict of the same architecture to start from instead of the seeded
            initialisation (a warm start: ``dealrec prune --update`` continues yesterday's
            surrogate). The optimizer starts afresh.
        max_steps: stop after this many optimizer steps (the last epoch may be partial; it is
            validated like a full one). None = no bound besides ``cfg.epochs``.

    Returns:
        (model in eval mode, list of per-epoch metric dicts: epoch, train_loss, recall, ndcg, seconds).
        With ``world_size`` > 1, ``train_loss`` is the mean over all ranks' samples.

    Raises:
        ConfigError: bad config, n_items, rank/world_size. DataError: malformed samples or item ids >= n_items.
    """
    cfg.validate()
    bad_rank: list[str] = []
    check(bad_rank, isinstance(world_size, int) and world_size >= 1, f"world_size={world_size!r}: must be an int >= 1")
    check(bad_rank, isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < max(world_size, 1),
          f"rank={rank!r}: must be in 0..world_size-1 (world_size={world_size!r})")
    if not bad_rank:
        check(bad_rank, cfg.batch_size % world_size == 0,
              f"batch_size={cfg.batch_size} is not a multiple of world_size={world_size} "
              f"(per-rank batch = batch_size // world_size)")
    if bad_rank:
        raise ConfigError(bad_rank, config="train_surrogate")
    distributed = world_size > 1
    if distributed and reduce_fn is None:
        reduce_fn = _dist_all_gather
    if rank != 0:
        log = _no_log
    model = build_surrogate(n_items, cfg)  # seeds the global RNG with cfg.seed: same init on every rank
    if init_state is not None:
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
                               for k, v in init_state.items()})
    if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
        raise ConfigError([f"max_steps={max_steps!r}: must be an int >= 1 or None"], config="train_surrogate")
    steps = 0
    if rank > 0:
        torch.manual_seed(_rank_seed(cfg.seed, rank))  # dropout stream of this rank
    in_memory = not (isinstance(samples, Sequence) and all(callable(c) for c in samples))
    if not in_memory and not samples:
        raise DataError("no sample chunks to train on", field="samples", value=0)
    loaders: list[Callable[[], Any]] = [lambda: samples] if in_memory else list(samples)

    def load(i: int) -> dict[str, np.ndarray]:
        enc = encode_samples(loaders[i](), max_len=cfg.max_len)
        if enc["labels"].max(initial=-1) >= n_items:
            raise DataError(f"item id >= n_items={n_items}", field="history/target", value=int(enc["labels"].max()))
        return enc

    if in_memory:  # encoded once and kept; streamed chunks are re-read every epoch
        whole = load(0)
        chunk: Callable[[int], dict[str, np.ndarray]] = lambda i: whole  # noqa: E731
    else:
        chunk = load
    step: nn.Module = _TrainStep(model)
    if wrap_model is not None:
        step = wrap_model(step)
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"

    def to_device(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return b if on_cpu else {k: v.to(device, non_blocking=True) for k, v in b.items()}

    valid_batches = None
    if valid is not None and rank == 0:
        from engine.data.schema import sample_rows, take_rows

        keep = sample_rows(valid.num_rows if hasattr(valid, "num_rows") else len(valid["history"]),
                           cfg.valid_users, cfg.seed)
        if keep is not None:  # (read_split(max_rows=valid_users, seed=seed) already gives this subset)
            valid = take_rows(valid, keep)
        valid_batches = [to_device(b) for b in make_batches(valid, batch_size=512, max_len=cfg.max_len)]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed if rank == 0 else _rank_seed(cfg.seed, rank))
    history: list[dict[str, float]] = []
    best, best_state, bad = -1.0, None, 0
    t_start = time.perf_counter()
    batch = cfg.batch_size // world_size
    n_params = sum(p.numel() for p in model.parameters())
    if in_memory:
        n = len(whole["sample_id"])
        per_rank = -(-n // world_size)  # samples per rank and epoch (after cyclic padding)
        n_batches: int | str = math.ceil(per_rank / batch)
        log(f"[surrogate] {cfg.model}: {n_params:,} parameters, {n:,} samples, {n_items:,} items, "
            f"{n_batches} batches/epoch"
            + (f" per rank ({world_size} ranks x {batch} samples, {per_rank * world_size - n} padded)"
               if distributed else ""))
    else:
        n_batches = "?"
        log(f"[surrogate] {cfg.model}: {n_params:,} parameters, {len(loaders)} sample chunks streamed "
            f"through a shuffle buffer of >= {cfg.shuffle_buffer:,} samples (whole chunks), {n_items:,} items"
            + (f", {world_size} ranks x {batch} samples per step" if distributed else ""))
    for epoch in range(1, cfg.epochs + 1):
        step.train()
        t0 = time.perf_counter()
        tot, seen, bi = 0.0, 0, 0
        timed_out = False
        order = rng.permutation(len(loaders)) if len(loaders) > 1 else [0]
        for enc in _buffer_groups(order, chunk, cfg.shuffle_buffer):
            n_c = len(enc["sample_id"])
            perm = rng.permutation(n_c)
            if distributed:
                perm = np.resize(perm, -(-n_c // world_size) * world_size)[rank::world_size]
            for s in range(0, len(perm), batch):
                b = to_device(_slice_encoded(enc, perm[s:s + batch]))
                loss = step(b, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                tot += float(loss.detach()) * len(b["sample_id"])
                seen += len(b["sample_id"])
                bi += 1
                if cfg.log_every and bi % cfg.log_every == 0:
                    log(f"[surrogate] epoch {epoch} batch {bi}/{n_batches} loss {tot / seen:.4f} "
                        f"({time.perf_counter() - t0:.0f}s)")
                if max_steps is not None and steps >= max_steps:  # the same step on every rank
                    timed_out = True
                    break
                if cfg.max_minutes is not None:
                    over = time.perf_counter() - t_start > cfg.max_minutes * 60
                    if distributed:
                        over = any(reduce_fn(over))  # every rank stops after the same batch
                    if over:
                        timed_out = True
                        break
            del enc
            if timed_out:
                break
        if not in_memory and epoch == 1 and not timed_out:
            n_batches = bi
        val = evaluate_ranking(model, valid_batches, k=cfg.eval_k) if valid_batches is not None else None
        if distributed:
            parts = reduce_fn({"loss_sum": tot, "seen": seen, "timed_out": timed_out,
                               "valid": None if val is None else {"recall": val["recall"], "ndcg": val["ndcg"]}})
            tot = float(sum(p["loss_sum"] for p in parts))
            seen = int(sum(p["seen"] for p in parts))
            timed_out = any(p["timed_out"] for p in parts)
            val = parts[0]["valid"]
        m: dict[str, float] = {"epoch": float(epoch), "train_loss": tot / max(seen, 1)}
        if val is not None:
            m.update(recall=val["recall"], ndcg=val["ndcg"])
        m["seconds"] = time.perf_counter() - t0
        history.append(m)
        bounded = max_steps is not None and steps >= max_steps
        log(f"[surrogate] epoch {epoch}/{cfg.epochs} " + " ".join(
            f"{k}={v:.4f}" for k, v in m.items() if k != "epoch")
            + (f" (step bound {max_steps} reached)" if bounded else " (time box reached)" if timed_out else ""))
        if val is not None:
            if m["recall"] > best:
                best, bad = m["recall"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    log(f"[surrogate] early stop: no better Recall@{cfg.eval_k} for {cfg.patience} epochs "
                        f"(best {best:.4f})")
                    break
        if timed_out:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history
