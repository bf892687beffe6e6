"""Whole-model gradient parity of the optional oneDNN conv backend, beside the gradient's own
sensitivity to rounding.

    python -m experiments.bench.onednn_parity                 # the default cases
    python -m experiments.bench.onednn_parity task2_segmentation:unet2d,3class,quick:4x64x64x1

Each case is ``<config module>:<get_config arg>:<input shape, NHWC or NDHWC, 'x'-separated>``.
For each, the model's parameter and input gradients of sum(sin(outputs)) (train mode, batch
statistics) are computed as float64 XLA (the reference), float32 XLA and float32 with
``conv_backend='onednn'``; each line prints the largest leaf-wise difference to the reference,
relative to the leaf's largest reference value. It also prints the *floor*: the same measure
between the float64 gradient at x and the float64 gradient at x perturbed by 1e-6 relative
noise (about float32's rounding after a few layers). ReLU kinks, max-pool near-ties and
BatchNorm over small batches make these gradients jump under such perturbations, so two
correct float32 implementations that round differently can differ by up to about the floor.
float32 XLA happens to land within ~1e-6 of float64 on these cases (it takes the same side of
every kink; why is not established); oneDNN, or ``--numpy_callbacks`` (the three passes as
``jax.pure_callback`` + numpy, no C++), need not. A backend is consistent when its difference
is at most about the floor (docs/speed.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

DEFAULT_CASES = (
  "task1_supervised:quick:8x64x64x1",
  "task1_supervised::4x64x64x1",
  "task2_segmentation:unet2d,3class,quick:4x64x64x1",
  "task2_segmentation:unet3d,4class,quick:2x8x64x64x1",
)


def _numpy_pass(pass_name, out_shape, a, b, strides, pads):
  """One conv pass in numpy (2D, NHWC / HWIO), by kernel offsets: no XLA, no oneDNN."""
  import numpy as np

  (lo_h, hi_h), (lo_w, hi_w) = pads
  sh, sw = strides

  def windows(n_out_h, n_out_w, i, j):
    return (slice(None), slice(i, i + sh * n_out_h, sh), slice(j, j + sw * n_out_w, sw))

  if pass_name == "fwd":  # a = x, b = w
    x = np.pad(a, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    y = np.zeros(out_shape, np.float32)
    for i in range(b.shape[0]):
      for j in range(b.shape[1]):
        y += x[windows(out_shape[1], out_shape[2], i, j)] @ b[i, j]
    return y
  if pass_name == "bwd_data":  # a = dy, b = w; out = x's shape
    n, h, w_, c = out_shape
    dx = np.zeros((n, h + lo_h + hi_h, w_ + lo_w + hi_w, c), np.float32)
    for i in range(b.shape[0]):
      for j in range(b.shape[1]):
        dx[windows(a.shape[1], a.shape[2], i, j)] += a @ b[i, j].T
    return dx[:, lo_h : lo_h + h, lo_w : lo_w + w_]
  x = np.pad(a, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))  # a = x, b = dy
  dw = np.zeros(out_shape, np.float32)
  for i in range(out_shape[0]):
    for j in range(out_shape[1]):
      xs = x[windows(b.shape[1], b.shape[2], i, j)]
      dw[i, j] = xs.reshape(-1, xs.shape[-1]).T @ b.reshape(-1, b.shape[-1])
  return dw


def use_numpy_callbacks() -> None:
  """Route the backend's three passes to ``jax.pure_callback`` + numpy (2D only) instead of
  the oneDNN FFI calls: the same JAX wiring with no C++ at all."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mtneuro_jax.kernels import onednn

  def call(pass_name, out_shape, a, b, attrs):
    strides = tuple(int(v) for v in attrs["strides"])
    pads = tuple(zip(attrs["pad_lo"].tolist(), attrs["pad_hi"].tolist(), strict=True))
    out = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    host = lambda a, b: _numpy_pass(  # noqa: E731
      pass_name, tuple(out_shape), np.asarray(a), np.asarray(b), strides, pads
    )
    return jax.pure_callback(host, out, a, b)

  onednn._call = call


def parity(case: str) -> dict:
  """{'xla': (max rel err, leaf), 'onednn': (...)} for one case (see the module doc)."""
  import jax

  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp
  import numpy as np

  from mtneuro_jax.models import MODELS
  from mtneuro_jax.train import step as step_lib

  module, arg, shape_text = case.split(":")
  config = importlib.import_module(f"configs.{module}").get_config(arg or None)
  model = MODELS[config.model_name](**dict(config.model))
  shape = tuple(int(s) for s in shape_text.split("x"))
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
  variables = model.init(
    {"params": jax.random.key(0), "dropout": jax.random.key(0)}, x, train=False
  )

  def loss(v, x):
    out = model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )[0]
    leaves = [o for o in jax.tree.leaves(out) if jnp.issubdtype(o.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.sin(o)) for o in leaves)

  # A fresh grad function per backend: jit caches traces by function, and the conv swap
  # happens at trace time.
  grad = lambda: jax.grad(loss, argnums=(0, 1))  # noqa: E731
  to64 = lambda t: t.astype(jnp.float64) if t.dtype == jnp.float32 else t  # noqa: E731
  variables64 = jax.tree.map(to64, variables)
  ref = jax.jit(grad())(variables64, x.astype(jnp.float64))

  def worst(got):
    w = (0.0, "")
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got), strict=True
    ):
      scale = float(jnp.max(jnp.abs(a))) or 1.0
      w = max(w, (float(jnp.max(jnp.abs(a - b))) / scale, jax.tree_util.keystr(path)))
    return w

  noise = np.random.default_rng(1).normal(size=shape)
  x_near = x.astype(jnp.float64) * (1 + 1e-6 * jnp.asarray(noise))
  out = {"floor": worst(jax.jit(grad())(variables64, x_near))}
  for backend in ("xla", "onednn"):
    with step_lib.flax_conv(conv_backend=backend):
      out[backend] = worst(jax.jit(grad())(variables, x))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.bench.onednn_parity", description=__doc__)
  p.add_argument("cases", nargs="*", default=list(DEFAULT_CASES))
  p.add_argument(
    "--numpy_callbacks",
    action="store_true",
    help="run the convs as jax.pure_callback + numpy instead of oneDNN (2D cases only)",
  )
  args = p.parse_args(argv)
  from mtneuro_jax.kernels import onednn

  if args.numpy_callbacks:
    use_numpy_callbacks()
  if not onednn.available():
    print(f"oneDNN conv kernel unavailable: {onednn.why_unavailable()}", file=sys.stderr)
    return 1
  print(
    f"cores visible: {len(os.sched_getaffinity(0))}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}"
  )
  kernel = "numpy callbacks" if args.numpy_callbacks else "onednn"
  for case in args.cases:
    r = parity(case)
    print(
      f"{case}: max rel grad difference to float64 -- xla {r['xla'][0]:.1e}, "
      f"{kernel} {r['onednn'][0]:.1e} ({r['onednn'][1]}); floor (float64 at x(1+1e-6 noise)) "
      f"{r['floor'][0]:.1e} ({r['floor'][1]})",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
