"""Embeddings of Task 3 quadrants: frozen Task 1 encoders, PCA and NMF.

Encoders (``encoder_embeddings``): any run of ``mtneuro train`` / ``mtneuro task1`` whose
model has a ``params['encoder']`` sub-tree (supervised, mixup, BYOL, MYOW, MYOW-m,
VICReg). ``encoder_workdir(run)`` finds the checkpoint: an SSL run keeps its encoder in
``<run>/pretrain`` (the probe in ``<run>`` only adds a linear head), a supervised run in
``<run>``. The run's saved ``config.json`` gives the model (``model_name``, ``model``
kwargs; the head is dropped, ``num_classes=0``) and the input it was trained on:
``data.downsample`` (area averaging) and ``data.image_mean`` / ``data.image_std``
(``(x / 255 - mean) / std``), applied here exactly as the training pipeline does
(``mtneuro_jax.data.transforms``). A quadrant is 128x128 full-resolution pixels, so at
the encoder's downsampling it has the pixel scale the encoder saw (a Task 1 SSL encoder
trains on half-tile crops = 128 full-resolution pixels: the very same field of view).
The encoder runs in inference mode (BatchNorm running statistics), one jitted function
per architecture and input size, batches of fixed size (the last one padded).

PCA / NMF (``linear_embeddings``): fitted on all rows' flattened quadrants, area
downsampled by ``downsample`` (the reference uses 64x64, i.e. 2x), intensities in
[0, 1], ``n_components`` (256) with a fixed ``random_state``. NMF starts from
``nndsvda`` (deterministic; the reference's ``init='random'`` without a seed is not
reproducible). The fit uses every row (unsupervised: no feature is seen), as the
reference does; the held-out readout therefore tests the linear map, not the embedding.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from typing import Any, Callable

import numpy as np

from mtneuro_jax.data import transforms
from mtneuro_jax.errors import UserError

LINEAR_METHODS = ("pca", "nmf")


class EmbeddingError(UserError):
  """An encoder run that cannot be embedded with."""


def encoder_workdir(run_dir: str) -> str:
  """The workdir holding ``run_dir``'s encoder: ``<run>/pretrain`` for an SSL run, else ``<run>``."""
  pre = os.path.join(run_dir, "pretrain")
  if os.path.isdir(os.path.join(pre, "checkpoints")):
    return pre
  if os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return run_dir
  raise EmbeddingError(
    f"{run_dir} holds no checkpoints/ (nor pretrain/checkpoints/); run the Task 1 "
    "training first (`mtneuro task1 ...` or `mtneuro train ...`)"
  )


def read_run_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise EmbeddingError(
      f"cannot read {path} ({e.__class__.__name__}); give the workdir of a finished run"
    ) from None


@functools.lru_cache(maxsize=None)
def _jit_encoder(model_name: str, model_kwargs: tuple) -> tuple[Any, Callable]:
  """(model, jitted apply(variables, images [B, Y, X, 1]) -> features [B, D]); one per architecture."""
  import jax

  from mtneuro_jax.models import MODELS

  model = MODELS[model_name](**dict(model_kwargs))

  @jax.jit
  def apply(variables, images):
    return model.apply(variables, images, train=False)["features"]

  return model, apply


class Encoder:
  """A frozen Task 1 encoder loaded from a run's workdir (see the module docstring).

  ``embed(images uint8 [N, 128, 128]) -> float32 [N, D]``.
  Attributes: ``workdir``, ``step`` (checkpoint used), ``downsample``, ``image_mean``,
  ``image_std``, ``model_name``, ``model_kwargs``.
  """

  def __init__(self, workdir: str, *, quadrant: int = 128, step: int = 0):
    import jax
    import jax.numpy as jnp

    from mtneuro_jax.train import checkpoint

    self.workdir = workdir
    cfg = read_run_config(workdir)
    try:
      data = cfg["data"]
      self.downsample = int(data["downsample"])
      self.image_mean = float(data["image_mean"])
      self.image_std = float(data["image_std"])
      self.model_name = str(cfg["model_name"])
      kwargs = dict(cfg.get("model") or {})
    except (KeyError, TypeError, ValueError) as e:
      raise EmbeddingError(
        f"{workdir}/config.json lacks {e} (data.downsample, data.image_mean, data.image_std, "
        "model_name, model); give the workdir of a training run"
      ) from None
    if quadrant % self.downsample:
      raise EmbeddingError(
        f"the encoder in {workdir} was trained at {self.downsample}x downsampling, which does "
        f"not divide the {quadrant}-pixel quadrants; use a run at 1x, 2x or 4x"
      )
    kwargs["num_classes"] = 0  # the encoder alone
    kwargs.pop("dropout", None)  # head-only option
    self.model_kwargs = kwargs
    self.model, self._apply = _jit_encoder(self.model_name, tuple(sorted(kwargs.items())))
    side = quadrant // self.downsample
    fresh = jax.eval_shape(
      lambda: self.model.init(jax.random.key(0), jnp.zeros((1, side, side, 1)), train=False)
    )
    loaded = checkpoint.load_pretrained(
      {"workdir": workdir, "step": step, "subtree": "encoder", "model_state": True}, fresh
    )
    missing = [c for c in fresh if c not in loaded]
    if missing:
      raise EmbeddingError(f"{workdir}: the checkpoint has no {missing} for the encoder")
    self.variables = jax.tree.map(jnp.asarray, loaded)
    self.step = _latest_step(workdir) if not step else int(step)

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, Y, X] -> float32 [N, Y/d, X/d, 1], downsampled and normalised like training."""
    x = transforms.area_downsample(images, self.downsample)
    return transforms.normalize(x, self.image_mean, self.image_std)[..., None]

  def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Features float32 [N, D] of uint8 quadrants [N, Y, X] (inference mode)."""
    images = np.asarray(images)
    out = []
    for s in range(0, len(images), batch_size):
      x = self.preprocess(images[s : s + batch_size])
      n = len(x)
      if n < batch_size:  # fixed batch shape: one compilation
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      out.append(np.asarray(self._apply(self.variables, x))[:n])
    return np.concatenate(out).astype(np.float32)


def _latest_step(workdir: str) -> int:
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  return max(steps) if steps else 0


def encoder_embeddings(run_dir: str, images: np.ndarray, *, batch_size: int = 256) -> tuple:
  """(features float32 [N, D], info dict) of a Task 1 run's encoder on uint8 quadrants [N, Y, X]."""
  t0 = time.perf_counter()
  enc = Encoder(encoder_workdir(run_dir), quadrant=int(np.asarray(images).shape[-1]))
  z = enc.embed(images, batch_size=batch_size)
  info = {
    "kind": "encoder",
    "workdir": enc.workdir,
    "step": enc.step,
    "model_name": enc.model_name,
    "model": enc.model_kwargs,
    "downsample": enc.downsample,
    "image_mean": enc.image_mean,
    "image_std": enc.image_std,
    "dim": int(z.shape[1]),
    "seconds": time.perf_counter() - t0,
  }
  if not np.all(np.isfinite(z)):
    raise EmbeddingError(f"the encoder in {enc.workdir} gives non-finite features; retrain it")
  return z, info


def linear_embeddings(
  images: np.ndarray,
  method: str,
  *,
  n_components: int = 256,
  seed: int = 0,
  downsample: int = 2,
  nmf_max_iter: int = 400,
) -> tuple[np.ndarray, dict]:
  """(embedding float32 [N, K], info) of PCA or NMF fitted on all quadrants uint8 [N, Y, X].

  K = min(n_components, N, pixels). Input: area-downsampled intensities in [0, 1].
  """
  from sklearn.decomposition import NMF, PCA
  from sklearn.exceptions import ConvergenceWarning

  if method not in LINEAR_METHODS:
    raise EmbeddingError(f"unknown linear embedding {method!r}; use one of {LINEAR_METHODS}")
  t0 = time.perf_counter()
  x = transforms.area_downsample(np.asarray(images), downsample) / np.float32(255.0)
  x = x.reshape(len(x), -1)
  k = min(int(n_components), x.shape[0], x.shape[1])
  info: dict = {"kind": method, "n_components": k, "downsample": downsample, "seed": int(seed)}
  if method == "pca":
    model = PCA(n_components=k, random_state=int(seed))
    z = model.fit_transform(x)
    info["explained_variance"] = float(model.explained_variance_ratio_.sum())
  else:
    model = NMF(n_components=k, init="nndsvda", max_iter=int(nmf_max_iter), random_state=int(seed))
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", category=ConvergenceWarning)  # recorded in info
      z = model.fit_transform(x)
    info.update(
      nmf_iterations=int(model.n_iter_),
      nmf_converged=bool(model.n_iter_ < int(nmf_max_iter)),
      reconstruction_err=float(model.reconstruction_err_),
    )
  info["seconds"] = time.perf_counter() - t0
  info["dim"] = int(z.shape[1])
  return np.asarray(z, np.float32), info
