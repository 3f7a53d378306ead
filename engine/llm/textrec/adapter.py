"""The LoRA shape a text-encoder adapter folder records, so that
:meth:`engine.llm.textrec.backend.TextEncoderBackend.load_model` builds the encoder with the
adapter's rank, alpha and target modules before loading its weights
(:func:`engine.finetune.adapter.load_adapter`), instead of failing on a shape mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["adapter_lora_fields"]


def adapter_lora_fields(path: str | os.PathLike) -> dict:
    """``{"lora_r", "lora_alpha", "target_modules"}`` of a peft adapter folder (those it records).

    Raises:
        DataError: ``adapter_config.json`` missing or corrupt.
    """
    from engine.rundir import read_json

    conf = read_json(Path(path) / "adapter_config.json",
                     hint="; pass the adapter/ folder of a text-encoder fine-tune")
    out: dict = {}
    if isinstance(conf.get("r"), int):
        out["lora_r"] = conf["r"]
    if isinstance(conf.get("lora_alpha"), (int, float)):
        out["lora_alpha"] = conf["lora_alpha"]
    tm = conf.get("target_modules")
    if isinstance(tm, (list, tuple)) and tm:
        out["target_modules"] = tuple(sorted(str(t) for t in tm))
    return out
