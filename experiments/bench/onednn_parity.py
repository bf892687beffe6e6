"""Whole-model gradient parity of the optional oneDNN conv backend against float64.

    python -m experiments.bench.onednn_parity                 # the default cases
    python -m experiments.bench.onednn_parity task2_segmentation:unet2d,3class,quick:4x64x64x1

Each case is ``<config module>:<get_config arg>:<input shape, NHWC or NDHWC, 'x'-separated>``.
For each, the model's parameter and input gradients of sum(sin(outputs)) (train mode, batch
statistics) are computed three ways -- float64 XLA (the reference), float32 XLA and float32
with ``conv_backend='onednn'`` -- and the largest leaf-wise error relative to the leaf's
largest reference value is printed, with the leaf. float32 XLA sits near 1e-6.

Why this exists: every single oneDNN conv matches XLA's to ~1e-6 (tests/test_onednn_conv.py),
yet in some whole models the oneDNN gradients were off by 1e-2..1e-1 when XLA ran on more
than one thread (``taskset -c 0`` gives 1e-5). ``--numpy_callbacks`` runs the same three passes
through ``jax.pure_callback`` and numpy instead (no oneDNN, no C++): the U-Net case gives the
same error, so the fault is not in the kernel (docs/speed.md).
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
  ref = jax.jit(grad())(jax.tree.map(to64, variables), x.astype(jnp.float64))
  out = {}
  for backend in ("xla", "onednn"):
    with step_lib.flax_conv(conv_backend=backend):
      got = jax.jit(grad())(variables, x)
    worst = (0.0, "")
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got), strict=True
    ):
      scale = float(jnp.max(jnp.abs(a))) or 1.0
      err = float(jnp.max(jnp.abs(a - b))) / scale
      worst = max(worst, (err, jax.tree_util.keystr(path)))
    out[backend] = worst
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
      f"{case}: max rel grad error vs float64 -- xla {r['xla'][0]:.1e} ({r['xla'][1]}), "
      f"{kernel} {r['onednn'][0]:.1e} ({r['onednn'][1]})",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
