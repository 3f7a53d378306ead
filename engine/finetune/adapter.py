"""What a fine-tune trains and exports, any backend: checksum, export, load (ZeRO-3 aware).

A LoRA backend (bigrec, textrec) trains and exports its peft adapter (:func:`lora_checksum`,
:func:`export_adapter`, :func:`load_adapter`). A backend that trains every parameter sets the
class attribute ``full_finetune = True`` and has ``save_model(model, folder)`` (TIGER): its
fine-tune exports the whole model through that method and fingerprints every trainable
parameter. :func:`trained_checksum` and :func:`export_trained` pick the one of the backend.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from engine.errors import DataError

__all__ = ["peft_module", "lora_checksum", "export_adapter", "load_adapter", "full_finetune", "unwrap",
           "trained_params", "trained_checksum", "export_trained"]


def peft_module(model: nn.Module) -> nn.Module:
    """The peft model inside ``model``: itself (BIGRec), or its first peft submodule (textrec's
    encoder), DDP / DeepSpeed wrappers removed. Adapter names and files are the peft model's own."""
    from peft import PeftModel

    m = getattr(model, "module", model)
    if isinstance(m, PeftModel):
        return m
    for sub in m.modules():
        if isinstance(sub, PeftModel):
            return sub
    raise TypeError(f"{type(m).__name__} holds no peft model: build it with the backend's build_model()")


def _lora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in peft_module(model).named_parameters() if "lora_" in n]


class _gathered:
    """Gather ZeRO-3 partitioned parameters for reading (no-op for other stages)."""

    def __init__(self, params, zero3: bool):
        self.params, self.zero3 = params, zero3
        self._ctx = None

    def __enter__(self):
        if self.zero3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def lora_checksum(model, *, zero3: bool = False) -> dict:
    """A fingerprint of the LoRA weights: ``{"sum": float64 sum, "sha256": of names + raw bytes}``.

    Args:
        model: the model (peft model or one holding it; wrappers are removed).
        zero3: gather ZeRO-3 partitions first (collective: every rank must call).
    """
    return _checksum(_lora_params(model), zero3)


def full_finetune(backend) -> bool:
    """Whether ``backend`` trains (and exports) its whole model rather than a LoRA adapter."""
    return bool(getattr(backend, "full_finetune", False))


def unwrap(model) -> nn.Module:
    """``model`` without its DDP / DeepSpeed wrapper."""
    return getattr(model, "module", model)


def trained_params(model, *, full: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a fine-tune trains: every trainable one (``full``) or the LoRA ones, by name."""
    if full:
        return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    return _lora_params(model)


def _checksum(named, zero3: bool) -> dict:
    h = hashlib.sha256()
    total = 0.0
    with _gathered([p for _, p in named], zero3):
        for n, p in sorted(named, key=lambda x: x[0]):
            t = p.detach().float().cpu().contiguous()
            h.update(n.encode())
            h.update(t.numpy().tobytes())
            total += float(t.double().sum())
    return {"sum": total, "sha256": h.hexdigest()[:16]}


def trained_checksum(backend, model, *, zero3: bool = False) -> dict:
    """:func:`lora_checksum`, or for a full fine-tune the same fingerprint over every trainable
    parameter (collective with ``zero3``)."""
    if not full_finetune(backend):
        return lora_checksum(model, zero3=zero3)
    return _checksum(trained_params(model, full=True), zero3)


def export_trained(backend, model, path: Path, *, rank: int, zero3: bool = False) -> None:
    """Write what the fine-tune trained into ``path`` (replaced) from rank 0: the peft adapter
    (:func:`export_adapter`), or for a full fine-tune the whole model through
    ``backend.save_model(model, path)`` (ZeRO-3 partitions gathered first; every rank must call)."""
    if not full_finetune(backend):
        return export_adapter(model, path, rank=rank, zero3=zero3)
    with _gathered([p for _, p in trained_params(model, full=True)], zero3):
        if rank == 0:
            path = Path(path)
            if path.exists():
                shutil.rmtree(path)
            backend.save_model(unwrap(model), path)


def export_adapter(model, path: Path, *, rank: int, zero3: bool = False) -> None:
    """Write the LoRA adapter in peft format (``save_pretrained``) from rank 0.

    Args:
        model: the model (peft model or one holding it).
        path: target folder (replaced).
        rank: only rank 0 writes; with ``zero3`` every rank must call (gather is collective).
        zero3: gather ZeRO-3 partitions first.
    """
    with _gathered([p for _, p in _lora_params(model)], zero3):
        if rank == 0:
            path = Path(path)
            if path.exists():
                shutil.rmtree(path)
            peft_module(model).save_pretrained(str(path))


def load_adapter(model, path: str | os.PathLike):
    """Load an adapter written by :func:`export_adapter` into a model built with the same LoRA config.

    Args:
        model: a fresh ``backend.build_model()`` model.
        path: the ``adapter/`` folder (peft ``save_pretrained`` format).

    Returns:
        ``model`` (updated in place, eval mode).

    Raises:
        DataError: the folder holds no adapter weights, or weights of another LoRA shape.
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    st = path / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        weights = load_file(str(st))
    elif (path / "adapter_model.bin").exists():
        weights = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise DataError("no adapter_model.safetensors/.bin; pass the adapter/ folder of a fine-tune", path=path)
    try:
        res = set_peft_model_state_dict(peft_module(model), weights)
    except RuntimeError as e:  # a shape mismatch
        raise DataError(f"adapter weights do not match the model's LoRA: {str(e)[:300]}", path=path) from None
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise DataError(f"adapter weights do not match the model's LoRA: {unexpected[:3]}", path=path)
    model.eval()
    return model
