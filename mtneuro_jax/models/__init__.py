"""Model registry: ``MODELS[config.model_name](**config.model)`` -> a flax.linen Module.

A plain dict on purpose: add a model by adding one line.
"""
from mtneuro_jax.models.resnet import resnet18_xray

MODELS = {
    "resnet18_xray": resnet18_xray,
}
