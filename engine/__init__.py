"""dealrec engine: pure torch/arrow components (no Ray).

Stages: ``data`` (canonical Parquet + importers), ``surrogate`` (SASRec/BERT4Rec),
``influence`` (iHVP solvers + batched directional derivatives), ``llm`` / ``prompts``
(BIGRec prompts, tiny offline LLaMA, LoRA), ``effort`` (batched per-sample gradient
norms), ``selection`` (DEALRec Algorithm 2 + baselines).
"""

__version__ = "0.1.0"
