"""A trained surrogate as plain data (``ray.put`` payloads) and on disk (state dict + config.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import DataError
from engine.surrogate.config import SurrogateConfig
from engine.surrogate.models import BERT4Rec, SASRec, build_surrogate


def surrogate_to_payload(model: SASRec | BERT4Rec) -> dict[str, Any]:
    """Plain-data form (config dict, n_items, state dict of numpy arrays) for ``ray.put``."""
    return {
        "config": model.cfg.to_dict(),
        "n_items": int(model.n_items),
        "state": {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()},
    }


def surrogate_payload(src: SASRec | BERT4Rec | str | os.PathLike) -> dict[str, Any]:
    """:func:`surrogate_to_payload` of a model or of a folder written by :func:`save_surrogate`."""
    if isinstance(src, nn.Module):
        return surrogate_to_payload(src)
    return surrogate_to_payload(load_surrogate(src))


def surrogate_from_payload(payload: Mapping[str, Any]) -> SASRec | BERT4Rec:
    """Rebuild a surrogate (eval mode) from :func:`surrogate_to_payload` output."""
    cfg = SurrogateConfig.from_dict(payload["config"])
    model = build_surrogate(int(payload["n_items"]), cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in payload["state"].items()})
    return model.eval()


def save_surrogate(model: SASRec | BERT4Rec, cfg: SurrogateConfig | None, path: str | os.PathLike) -> Path:
    """Write ``model.pt`` (state dict only, loadable with weights_only=True) and ``config.json``.

    Args:
        model: a surrogate.
        cfg: its config (None = ``model.cfg``).
        path: output folder (created).

    Returns:
        the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / "model.pt")
    (path / "config.json").write_text(
        json.dumps({"config": (cfg or model.cfg).to_dict(), "n_items": int(model.n_items)}, indent=2, sort_keys=True))
    return path


def load_surrogate(path: str | os.PathLike) -> SASRec | BERT4Rec:
    """Load a surrogate saved by :func:`save_surrogate` (eval mode; never unpickles objects).

    Raises:
        DataError: the folder lacks ``model.pt`` or ``config.json``.
    """
    path = Path(path)
    for f in ("model.pt", "config.json"):
        if not (path / f).exists():
            raise DataError("not a saved surrogate (expected model.pt and config.json)", path=path / f)
    meta = json.loads((path / "config.json").read_text())
    cfg = SurrogateConfig.from_dict(meta["config"])
    model = build_surrogate(int(meta["n_items"]), cfg)
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True, map_location="cpu"))
    return model.eval()
