"""Objective registry: ``OBJECTIVES[config.objective_name]`` -> base.Objective.

A plain dict on purpose: add an objective by adding one line.
"""
from mtneuro_jax.objectives.mixup import MIXUP
from mtneuro_jax.objectives.supervised import SUPERVISED

OBJECTIVES = {
    "supervised": SUPERVISED,
    "mixup": MIXUP,
}
