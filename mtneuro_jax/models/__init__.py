"""Model registry: ``MODELS[config.model_name](**config.model)`` -> a flax.linen Module.

Add a model by adding one line.
"""

from mtneuro_jax.models.multiscale import double_unet, mt_unet, res_unet, segnet, unet_encoder
from mtneuro_jax.models.resnet import resnet18_xray
from mtneuro_jax.models.seg2d import fpn, manet, pan, pspnet, unet_plusplus
from mtneuro_jax.models.seg3d import highresnet, vnet_light
from mtneuro_jax.models.unet import unet
from mtneuro_jax.registry import Registry

MODELS = Registry(
  "model",
  {
    "resnet18_xray": resnet18_xray,
    "unet": unet,
    "vnet_light": vnet_light,
    "highresnet": highresnet,
    "unet_plusplus": unet_plusplus,
    "manet": manet,
    "fpn": fpn,
    "pan": pan,
    "pspnet": pspnet,
    "double_unet": double_unet,
    "res_unet": res_unet,
    "mt_unet": mt_unet,
    "segnet": segnet,
    "unet_encoder": unet_encoder,
  },
)
