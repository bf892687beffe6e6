"""Reference PyTorch U-Net weights -> our UNet reproduce its eval-mode logits (2D and 3D)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments.torch_reference.unet import UNet as TorchUNet  # noqa: E402
from mtneuro_jax.errors import UserError  # noqa: E402
from mtneuro_jax.models import MODELS  # noqa: E402
from mtneuro_jax.models.unet_torch_import import UNetWeightsError, import_unet  # noqa: E402


def _torch_model(seed, **kw):
  """A reference U-Net with random biases, norm affines and non-trivial BN running stats."""
  torch.manual_seed(seed)
  model = TorchUNet(in_channels=1, **kw)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith("running_var"):
        t.uniform_(0.5, 2.0)
      elif name.endswith("running_mean") or name.endswith(".bias"):
        t.normal_(0.0, 0.2)
      elif "norm" in name and name.endswith(".weight"):
        t.uniform_(0.5, 1.5)
  return model.eval()


def _ours(dims, num_classes, start_filters, **kw):
  model = MODELS["unet"](
    num_classes=num_classes, dims=dims, width_multiplier=start_filters / 32, **kw
  )
  return model


@pytest.mark.parametrize(
  "dims,shape,kw",
  [
    (2, (2, 1, 24, 16), {}),
    (3, (1, 1, 8, 16, 16), {}),
    (2, (1, 1, 16, 16), {"normalization": "group2", "up_mode": "nearest", "n_blocks": 3}),
  ],
)
def test_logits_match_reference(dims, shape, kw):
  tm = _torch_model(0, out_channels=4, start_filters=4, dim=dims, **kw)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  model = _ours(dims, 4, 4, **kw)
  x_ours = np.moveaxis(x, 1, -1)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x_ours, train=False))
  # A 'module.' prefix (DataParallel checkpoints) is stripped.
  sd = {f"module.{k}": v for k, v in tm.state_dict().items()}
  variables = import_unet(sd, template=template)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_ours)["logits"]
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(want, 1, -1), atol=1e-4, rtol=0)
  assert np.abs(want).max() > 0.1  # a non-trivial comparison


def test_mismatched_state_dicts_raise_one_line_user_error():
  model = _ours(2, 4, 4)
  template = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  )
  sd = _torch_model(0, out_channels=4, start_filters=4, dim=2).state_dict()

  missing = dict(sd)
  del missing["up_blocks.1.conv2.weight"]
  with pytest.raises(UNetWeightsError, match="1 missing") as e:
    import_unet(missing, template=template)
  assert isinstance(e.value, UserError) and "\n" not in str(e.value)

  three = _torch_model(0, out_channels=3, start_filters=4, dim=2).state_dict()
  with pytest.raises(UNetWeightsError, match="mis-shaped.*head/kernel"):
    import_unet(three, template=template)

  with pytest.raises(UNetWeightsError, match="unexpected key"):
    import_unet({**sd, "down_blocks.0.extra.weight": np.zeros(3)}, template=template)

  with pytest.raises(UNetWeightsError, match="down_blocks.0.conv1.weight"):
    import_unet({"fc.weight": np.zeros((2, 2))})
