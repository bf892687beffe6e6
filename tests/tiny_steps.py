"""A tiny ResNet18-xray train step shared by the speed-option tests (test_bf16,
test_onednn_conv): same model, optimizer, state and batch, step options passed through; and
the plain SGD optimizer config it uses (``optim_cfg``, also test_train_step's)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtneuro_jax import sharding
from mtneuro_jax.models import resnet
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.train import optim
from mtneuro_jax.train import step as step_lib
from mtneuro_jax.train.state import create_train_state


def optim_cfg(**kw):
  """SGD lr 0.05, momentum 0.9, weight decay 5e-4, constant schedule, nothing frozen;
  ``kw`` overrides fields."""
  c = ml_collections.ConfigDict(
    dict(
      name="sgd",
      learning_rate=0.05,
      momentum=0.9,
      weight_decay=5e-4,
      schedule="constant",
      warmup_epochs=0.0,
      freeze=(),
    )
  )
  c.update(kw)
  return c


def resnet_step(mesh=None, batch_size=8, **step_kw):
  """(state, jitted train step, sharded batch) of a width-1/16 ResNet on 16x16 images.

  ``mesh``: default one device; ``step_kw``: ``jit_train_step`` options (compute_dtype,
  conv_dw_groups, conv_backend). The batch's images are [batch_size, 16, 16, 1] float32
  with the label added, so the step has something to learn.
  """
  mesh = sharding.make_mesh(1) if mesh is None else mesh
  model = resnet.ResNetXray(num_classes=4, width_multiplier=1 / 16, dropout=0.0, stage_sizes=(1, 1))
  objective = OBJECTIVES["supervised"]
  obj_cfg = ml_collections.ConfigDict({"label_smoothing": 0.0})
  tx, _ = optim.make_optimizer(optim_cfg(), steps_per_epoch=10, total_steps=100, batch_size=8)
  example = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  state = jax.jit(
    lambda: create_train_state(model, objective, tx, example, seed=0, objective_config=obj_cfg)
  )()
  step = step_lib.jit_train_step(
    mesh,
    model=model,
    objective=objective,
    optimizer=tx,
    config=obj_cfg,
    total_steps=100,
    donate=False,
    **step_kw,
  )
  rng = np.random.default_rng(0)
  label = np.arange(batch_size, dtype=np.int32) % 4
  image = rng.normal(size=(batch_size, 16, 16, 1)).astype(np.float32) + label[:, None, None, None]
  batch = sharding.shard_batch(
    {"image": image, "label": label, "valid": np.ones(batch_size, bool)}, mesh
  )
  return state, step, batch
