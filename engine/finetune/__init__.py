"""Few-shot fine-tuning (LoRA, or every parameter for TIGER) of any LLM backend: ONE loop, local or on data-parallel ranks (no Ray here).

The loop (:func:`train`) touches the model only through the backend protocol
(:class:`engine.llm.protocol.LLMBackend`: ``build_model``, ``encode_train``, ``train_loss``,
``encode_samples`` + ``per_sample_loss`` for the validation loss); jobs/finetune.py runs it in
process (``strategy="local"``) or as the per-worker function of a Ray Train ``TorchTrainer``
(DDP through a ``wrap_model``, or DeepSpeed ZeRO 0-3), as engine.surrogate's ``train_surrogate``
serves both the local and the Ray Train surrogate.

Layout:

- :mod:`engine.finetune.config`   -- :class:`FinetuneConfig` (every knob, validated as a whole)
- :mod:`engine.finetune.steppers` -- one micro-batch step on a plain / DDP module or a DeepSpeed
  engine, the LR schedule, :func:`deepspeed_config`
- :mod:`engine.finetune.loop`     -- :func:`train`, :func:`run_epoch`, the validation loss, the
  resumable state (epoch checkpoints, early stopping)
- :mod:`engine.finetune.adapter`  -- what a run trains: the LoRA adapter (checksum, export, load), or
  the whole model of a ``full_finetune`` backend (TIGER, through its ``save_model``); ZeRO-3 aware
"""

from engine.finetune.adapter import (export_adapter, export_trained, full_finetune, load_adapter, lora_checksum,
                                     peft_module, trained_checksum)
from engine.finetune.config import EVAL_FIELDS, RESUME_FREE_FIELDS, STRATEGIES, FinetuneConfig
from engine.finetune.loop import (
    BEST_ADAPTER_DIR,
    STATE_FILE,
    copy_tree,
    encode_examples,
    epoch_shard,
    mean_loss,
    new_state,
    read_state,
    run_epoch,
    samples_per_second,
    steps_per_epoch,
    train,
    train_epoch,
    update_state,
    validation_loss,
    write_state,
)
from engine.finetune.steppers import (
    DeepSpeedStepper,
    TorchStepper,
    build_stepper,
    causal_lm_loss,
    deepspeed_config,
    lr_lambda,
    make_scheduler,
)

__all__ = [
    "FinetuneConfig",
    "train",
    "run_epoch",
    "build_stepper",
    "DeepSpeedStepper",
    "TorchStepper",
    "deepspeed_config",
    "lr_lambda",
    "make_scheduler",
    "steps_per_epoch",
    "epoch_shard",
    "encode_examples",
    "train_epoch",
    "validation_loss",
    "mean_loss",
    "lora_checksum",
    "export_adapter",
    "trained_checksum",
    "export_trained",
    "full_finetune",
    "load_adapter",
    "STATE_FILE",
    "BEST_ADAPTER_DIR",
]
