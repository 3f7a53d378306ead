"""Influence scores on empirical risk (DEALRec eq. 9-11), solved once, applied in one pass.

Objective and sign convention (the one every function here refers to)::

    R(theta) = (1/n) sum_i L_i(theta)                 mean per-sample training loss
    J(theta) = R(theta) + (damping/2) ||theta||^2     the objective whose Hessian is used
    g_bar    = grad R(theta_hat),   H = hess R(theta_hat),   v = (H + damping I)^-1 g_bar
    influence(s) = (1/n) * grad L_s(theta_hat) . v

Removing sample s = dropping its (1/n) L_s term from J (penalty unchanged) and retraining;
first order: theta_{-s} - theta_hat ~= (1/n) (H + damping I)^-1 grad L_s, so the change of
R (still over all n samples) is ~= influence(s). Positive = removing s raises the training
loss (s is helpful). ``damping`` is exactly the weight-decay coefficient of the objective:
use the surrogate's ``weight_decay`` for a surrogate trained with coupled L2. At an exact
minimiser of an unregularised mean loss g_bar = 0 and every score is 0; with L2, g_bar =
-damping * theta_hat != 0.

Parameters are every ``requires_grad`` parameter of the model. The model runs in eval mode
(no dropout) for every quantity here; its previous mode is restored afterwards.

``loss_fn(model, batch) -> Tensor[B]`` returns per-sample losses that must not depend on
the other samples of the batch. Batches are dicts whose tensors carry the sample
dimension first (other values pass through unchanged when LiSSA slices mini-batches).

Layout (one module per stage; every public name is importable from ``engine.influence``):

- :mod:`engine.influence.params`      -- the parameters influence is taken over, flat <-> named
- :mod:`engine.influence.hvp`         -- g_bar and Hessian-vector products (exact or Gauss-Newton)
- :mod:`engine.influence.solvers`     -- v = (H + damping I)^-1 g_bar: CG, LiSSA, exact; :class:`SolveReport`
- :mod:`engine.influence.directional` -- grad L_s . v for a whole batch in one pass (JVP or finite differences)
- :mod:`engine.influence.baselines`   -- GraNd and EL2N, the selection baselines on the same surrogate
- :mod:`engine.influence.target`      -- the validation target (``InfluenceConfig(target="valid")``):
  g_bar = the mean gradient of the validation period's loss
- :mod:`engine.influence.pipeline`    -- :func:`influence_scores` end to end, and the surrogate's
  pipeline: :class:`InfluenceConfig`, the streamed iHVP, :func:`score_surrogate_batch`
- :mod:`engine.influence.llm`         -- the LLM-side influence: one vector u (the mean LoRA gradient
  of the validation loss) and each sample's LoRA gradient dotted with it, for any backend
"""

from engine.influence.params import flatten_params, trainable_params, unflatten
from engine.influence.hvp import hessian_vector_product, mean_gradient
from engine.influence.solvers import SOLVERS, SolveReport, dense_hessian, solve_ihvp
from engine.influence.directional import DirectionalDerivatives, directional_derivatives, split_direction
from engine.influence.baselines import el2n_scores, grand_scores
from engine.influence.target import TARGETS, read_target_rows, surrogate_valid_loss, valid_mean_gradient
from engine.influence.pipeline import (
    InfluenceConfig,
    compute_ihvp_for_samples,
    compute_ihvp_streaming,
    hessian_rows,
    influence_scores,
    score_surrogate_batch,
)

__all__ = [
    "DirectionalDerivatives",
    "InfluenceConfig",
    "SolveReport",
    "TARGETS",
    "compute_ihvp_for_samples",
    "compute_ihvp_streaming",
    "dense_hessian",
    "directional_derivatives",
    "el2n_scores",
    "flatten_params",
    "grand_scores",
    "hessian_rows",
    "hessian_vector_product",
    "influence_scores",
    "mean_gradient",
    "read_target_rows",
    "score_surrogate_batch",
    "solve_ihvp",
    "split_direction",
    "surrogate_valid_loss",
    "trainable_params",
    "unflatten",
    "valid_mean_gradient",
]
