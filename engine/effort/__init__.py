"""Effort score (DEALRec eq. 12): the L2 norm of each sample's loss gradient w.r.t. the LLM's
trainable (LoRA) parameters, at the pretrained model, computed for a whole batch in one pass.

Method (exact, no per-sample loop), :func:`per_sample_grad_norms` (:mod:`engine.effort.norms`):
  * forward hooks on every ``nn.Linear`` whose weight/bias is trainable record the layer input
    ``a`` [B, T, d_in] and output ``z`` (LoRA's ``lora_A``/``lora_B`` are such Linears);
  * ONE backward of the SUM of the per-sample losses gives ``g = dL/dz`` [B, T, d_out]; since
    sample i's loss depends only on row i, ``g[i]`` is sample i's own output gradient;
  * per-sample weight gradient ``G_i = sum_t g[i,t] a[i,t]^T``; its squared norm is taken either
    materialised (``einsum('bto,bti->boi')``, cost B*T*d_in*d_out) or as a ghost norm
    (``sum_{t,s} (a_t.a_s)(g_t.g_s)``, cost B*T^2*(d_in+d_out)), whichever is cheaper for that
    layer; LoRA layers (d_out or d_in = r) always materialise. Bias: ``sum_t g[i,t]``.
  * the backward asks autograd for output gradients only (``torch.autograd.grad`` w.r.t. the
    recorded outputs), so no weight gradients are formed and ``.grad`` is never touched.

Other module types (embeddings, normalisation layers, T5 relative-position biases, tied weights;
all parameters of a fully fine-tuned model, e.g. TIGER's T5) get exact per-sample gradients from
the same single backward: :mod:`engine.effort.hooks`. What neither path covers takes the
fallback of :mod:`engine.effort.fallback` (vmap over the backward), with a warning naming it.
Models whose trainable parameters are all Linear (LoRA) run exactly the Linear path (no extra
hooks, same backward).

Assumptions: dim 0 of every hooked Linear input is the batch (true for HF models; a layer that
breaks it is moved to the fallback); no activation checkpointing (recomputed forwards would
fire hooks twice). The model is put in eval mode while scoring (restored after), so LoRA
dropout is OFF and scores are deterministic and batch-independent.

Modules: :mod:`~engine.effort.norms` (per-sample gradient norms and their per-sample-loop
reference), :mod:`~engine.effort.dots` (per-sample gradient dot products with one vector, the
LLM-side influence), :mod:`~engine.effort.hooks` (the per-module-type hook machinery),
:mod:`~engine.effort.fallback` (the vmap / per-sample-backward fallback).
"""

from engine.effort.dots import per_sample_grad_dots, per_sample_grad_dots_loop
from engine.effort.norms import per_sample_grad_norms, per_sample_grad_norms_loop

__all__ = ["per_sample_grad_norms", "per_sample_grad_norms_loop", "per_sample_grad_dots", "per_sample_grad_dots_loop"]
