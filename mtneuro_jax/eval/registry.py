"""Evaluators by ``kind`` (a plain dict, like the model and objective registries).

Every evaluator has the signature
``fn(predict_fn, batches, *, eval_cfg, workdir, step) -> dict`` and sees only
eval-mode predictions, never the optimizer. ``config.evals.<name>.kind`` picks one.
"""
from __future__ import annotations

from mtneuro_jax.eval.classification import evaluate_classification

EVALUATORS = {
    "classification": evaluate_classification,
}
