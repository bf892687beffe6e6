"""The pure train step and its jit binding (shardings come from ``sharding.py``)."""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mtneuro_jax import sharding
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives.base import StepContext
from mtneuro_jax.train.state import TrainState

# ``config.compute_dtype``: the dtype the model's convolutions and dots run in. Params,
# optimizer state, BatchNorm statistics, the loss and the gradients stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(compute_dtype: str) -> str:
  """Returns ``compute_dtype`` if known, else raises ConfigError."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(
      f"config.compute_dtype={compute_dtype!r} is not one of {COMPUTE_DTYPES}; "
      "use --config.compute_dtype=float32 (the default) or bfloat16"
    )
  return compute_dtype


def check_conv_dw_groups(groups) -> int:
  """Returns ``groups`` if it is a positive int, else raises ConfigError."""
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
    raise ConfigError(
      f"config.conv_dw_groups={groups!r} must be a positive integer; use 1 (XLA's own weight "
      "gradient, the default) or e.g. 2"
    )
  return groups


# ``config.conv_backend``: who runs the convolutions of every flax Conv. 'onednn' needs the
# optional oneDNN kernel (mtneuro_jax/kernels/onednn.py: libdnnl-dev + a C++ compiler).
CONV_BACKENDS = ("xla", "onednn")


def check_conv_backend(backend: str) -> str:
  """Returns ``backend`` if known and usable here, else raises ConfigError (one line)."""
  if backend not in CONV_BACKENDS:
    raise ConfigError(
      f"config.conv_backend={backend!r} is not one of {CONV_BACKENDS}; use "
      "--config.conv_backend=xla (the default) or onednn"
    )
  if backend == "onednn":
    from mtneuro_jax.kernels import onednn

    if not onednn.available():
      raise ConfigError(
        "config.conv_backend='onednn' but the oneDNN conv kernel is unavailable "
        f"({onednn.why_unavailable() or 'not built'}); install it with `apt-get install "
        "libdnnl-dev g++` and build it with `python -m mtneuro_jax.kernels.onednn build` "
        "(or `bash scripts/build_onednn.sh`), or use --config.conv_backend=xla"
      )
  return backend


def _cast_floating(tree, dtype):
  """``tree`` with every floating array leaf cast to ``dtype`` (other leaves unchanged)."""

  def cast(x):
    if isinstance(x, (jax.Array, jnp.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


class MixedPrecisionModel:
  """A Linen model run in a lower precision, with float32 master weights.

  ``apply(variables, *args, **kwargs)`` casts the floating leaves of ``variables['params']``
  and of the positional inputs (e.g. the image ``[B, (Z,) Y, X, C]``) to ``compute_dtype``,
  so every Linen layer whose ``dtype`` is None computes in it (flax promotes to the inputs'
  and params' dtype; BatchNorm still reduces its statistics in float32), and casts every
  floating output (outputs and mutated collections) back to float32, so losses, metrics,
  BatchNorm running statistics and gradients w.r.t. the float32 params are float32.
  Everything else (``init``, attributes) is the wrapped model's. Works for every model
  without editing the model files.
  """

  def __init__(self, model, compute_dtype: str):
    self.model = model
    self.compute_dtype = jnp.dtype(check_compute_dtype(compute_dtype))

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables)
    if "params" in variables:
      variables["params"] = _cast_floating(variables["params"], self.compute_dtype)
    out = self.model.apply(variables, *_cast_floating(args, self.compute_dtype), **kwargs)
    return _cast_floating(out, jnp.float32)

  def __getattr__(self, name):
    return getattr(self.model, name)


def with_compute_dtype(model, compute_dtype: str = "float32"):
  """``model`` itself for float32 (the default path is untouched), else a MixedPrecisionModel."""
  if check_compute_dtype(compute_dtype) == "float32":
    return model
  return MixedPrecisionModel(model, compute_dtype)


def split_weight_grad_conv(groups: int) -> Callable:
  """A drop-in for ``lax.conv_general_dilated`` whose weight gradient is the sum of
  ``groups`` weight-gradient convs over batch slices (same maths, summed in another order).

  Why: XLA:CPU's weight-gradient ("backward filter") convolution uses the cores poorly
  (see docs/speed.md); independent convs on batch slices run concurrently in XLA:CPU's
  thunk executor. Forward and input gradient are XLA's own. Falls back to lax for grouped,
  batch-grouped or lhs-dilated convs and for batches not divisible by ``groups``.
  """
  import jax.lax as lax

  def conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ):
    kw = dict(
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    b_in, b_out = dn.lhs_spec[0], dn.out_spec[0]
    plain = (
      feature_group_count == 1
      and batch_group_count == 1
      and all(d in (None, 1) for d in (lhs_dilation or (None,)))
      and lhs.shape[b_in] % groups == 0
      and groups > 1
    )
    if not plain:
      return lax.conv_general_dilated(lhs, rhs, **kw)

    def f(x, w):
      return lax.conv_general_dilated(x, w, **kw)

    @jax.custom_vjp
    def split(x, w):
      return f(x, w)

    def fwd(x, w):
      return f(x, w), (x, w)

    def bwd(res, dy):
      x, w = res
      dx = jax.vjp(lambda x_: f(x_, w), x)[1](dy)[0]
      k = x.shape[b_in] // groups
      dw = None
      for g in range(groups):
        xg = lax.slice_in_dim(x, g * k, (g + 1) * k, axis=b_in)
        dyg = lax.slice_in_dim(dy, g * k, (g + 1) * k, axis=b_out)
        part = jax.vjp(lambda w_, xg=xg: f(xg, w_), w)[1](dyg)[0]
        dw = part if dw is None else dw + part
      return dx, dw

    split.defvjp(fwd, bwd)
    return split(lhs, rhs)

  return conv


def flax_conv_fn(conv_dw_groups: int = 1, conv_backend: str = "xla") -> Callable | None:
  """The ``lax.conv_general_dilated`` replacement for these options (None = lax's own).

  'onednn': oneDNN's forward, input and weight gradient for the convs it supports
  (``kernels.onednn.supported``); the others go to ``split_weight_grad_conv(conv_dw_groups)``
  when ``conv_dw_groups`` > 1, else to lax.
  """
  split = split_weight_grad_conv(conv_dw_groups) if conv_dw_groups > 1 else None
  if conv_backend == "onednn":
    import jax.lax as lax

    from mtneuro_jax.kernels import onednn

    return onednn.make_conv_general_dilated(split or lax.conv_general_dilated)
  return split


@contextlib.contextmanager
def flax_conv(conv_dw_groups: int = 1, conv_backend: str = "xla"):
  """While active, every ``flax.linen.Conv`` traced uses ``flax_conv_fn(...)``.

  flax's Conv looks ``lax.conv_general_dilated`` up in its module at call time when the
  layer sets no ``conv_general_dilated`` of its own, so swapping that name while the step is
  traced changes every model's convs without editing the model files. Defaults = no-op.
  """
  import flax.linen.linear as flax_linear

  fn = flax_conv_fn(conv_dw_groups, conv_backend)
  if fn is None:
    yield
    return
  saved = flax_linear.lax
  names = {k: getattr(saved, k) for k in dir(saved) if not k.startswith("__")}
  names["conv_general_dilated"] = fn
  flax_linear.lax = types.SimpleNamespace(**names)
  try:
    yield
  finally:
    flax_linear.lax = saved


def conv_weight_grad_split(groups: int):
  """``flax_conv(groups)``: every flax Conv's weight gradient split over ``groups`` batch
  slices while active (``split_weight_grad_conv``); ``groups`` 1 = no-op."""
  return flax_conv(conv_dw_groups=groups)


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over all leaves (float32)."""
  leaves = jax.tree.leaves(tree)
  return (
    jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    if leaves
    else jnp.zeros(())
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  objective,
  optimizer,
  config,
  total_steps: int,
  steps_per_epoch: int = 0,
  compute_dtype: str = "float32",
  conv_dw_groups: int = 1,
  conv_backend: str = "xla",
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the TrainState (step counts updates done so far).
    batch: dict of [B, ...] arrays (see objectives/base.py).
    model, objective, optimizer: bound with functools.partial (static).
    config: the objective's ConfigDict (``config.objective``).
    total_steps, steps_per_epoch: the run's length and epoch size (static), for the
      objective's StepContext (steps_per_epoch 0 = unknown).
    compute_dtype: 'float32' (default) or 'bfloat16': the model runs in it with float32
      params, loss, gradients and optimizer state (see MixedPrecisionModel).
    conv_dw_groups: > 1 computes every flax Conv's weight gradient as that many convs over
      batch slices (``split_weight_grad_conv``); 1 (default) = XLA's own.
    conv_backend: 'xla' (default) or 'onednn': every supported flax Conv (float32, no
      dilation/groups) runs forward and both gradients in oneDNN (``kernels/onednn.py``);
      ``conv_dw_groups`` then applies only to the convs oneDNN does not take.

  Returns:
    (new state, metrics: dict of float32 scalars). Metrics are the objective's
    plus 'train/grad_norm'; 'train/loss' is the scalar loss if the objective did
    not name it (the loop's NaN guard reads both).
  """
  model = with_compute_dtype(model, compute_dtype)
  rng = state.step_rng()
  ctx = StepContext(
    step=state.step, total_steps=int(total_steps), steps_per_epoch=int(steps_per_epoch)
  )

  def loss_fn(params):
    return objective.loss(
      params, state.model_state, state.aux, batch, rng, ctx=ctx, model=model, config=config
    )

  with flax_conv(conv_dw_groups, conv_backend):
    (loss, (metrics, model_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux = objective.update(aux, params, ctx=ctx, config=config)
  metrics = dict(metrics)
  metrics.setdefault("train/loss", loss)
  metrics["train/grad_norm"] = global_norm(grads)
  new_state = state.replace(
    step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, aux=aux
  )
  return new_state, metrics


def jit_train_step(
  mesh: Mesh,
  *,
  model,
  objective,
  optimizer,
  config,
  total_steps: int,
  steps_per_epoch: int = 0,
  donate: bool = True,
  compute_dtype: str = "float32",
  conv_dw_groups: int = 1,
  conv_backend: str = "xla",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``train_step`` bound to its statics and jitted for ``mesh``.

  State in/out replicated, batch split on 'data' (P('data') on the leading axis),
  metrics replicated. The state is donated: never reuse the state you pass in.
  Under jit, BatchNorm statistics are over the global batch, so the result does
  not depend on the number of devices. ``compute_dtype``, ``conv_dw_groups``,
  ``conv_backend``: see ``train_step``.
  """
  check_compute_dtype(compute_dtype)
  check_conv_dw_groups(conv_dw_groups)
  check_conv_backend(conv_backend)
  fn = functools.partial(
    train_step,
    model=model,
    objective=objective,
    optimizer=optimizer,
    config=config,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    compute_dtype=compute_dtype,
    conv_dw_groups=conv_dw_groups,
    conv_backend=conv_backend,
  )
  rep, data = sharding.replicated_sharding(mesh), sharding.data_sharding(mesh)
  return jax.jit(
    fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,) if donate else ()
  )


def jit_predict(*, model, objective, config) -> Callable[[TrainState, dict], dict[str, Any]]:
  """Jitted ``objective.predict`` taking (state, batch).

  No explicit shardings: the state is already replicated and eval batches arrive
  sharded on 'data' (also slices of them, e.g. the corners protocol), so the
  outputs stay batch-sharded and evaluators gather what they need.
  """

  @jax.jit
  def predict(state: TrainState, batch: dict[str, jax.Array]):
    return objective.predict(
      state.params, state.model_state, state.aux, batch, model=model, config=config
    )

  return predict
