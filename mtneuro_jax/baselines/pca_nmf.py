"""Task 1 PCA and NMF baselines: 256-d linear embeddings of the tiles + a linear classifier.

The paper's Table 1 lists PCA and NMF "256-d embeddings + linear layer"; the
reference code has them only for Task 3. Here:

1. The training tiles come from the same pipeline as the networks
   (``pipeline.eval_batches(data_cfg, 'train')``: one unshuffled pass, the
   configured downsampling and normalisation, padding rows dropped) and are
   flattened to [N, Y*X].
2. ``sklearn.decomposition.PCA`` or ``NMF`` with ``n_components`` (256;
   fewer only when there are fewer tiles or pixels, recorded in the results)
   and ``random_state = config.seed`` is fitted on them. NMF needs
   non-negative input, so it sees the un-normalised intensities
   ``x * image_std + image_mean`` (the tile in [0, 1]); PCA centres anyway.
3. The embeddings are standardised and a multinomial logistic regression
   (L2, ``C``) is fitted on the training labels: the "linear layer".
4. Each ``config.evals.<name>`` is scored by the *same* evaluator as the
   networks (``EVALUATORS['classification']``), with the fitted pipeline as
   ``predict_fn`` (logits = the classifier's decision function; the split is
   embedded in one call, see ``eval_context``). So metrics,
   padding handling, confusion plots and result keys are identical. Only the
   'whole' protocol applies: the embedding is fitted at the tile's size.

Results: ``{'<eval name>/<metric>': value, ..., 'baseline/...': fit facts, 'step': 0}``,
also written to ``<workdir>/results.json`` (the loop's format), plus ``config.json``.

Run:
  python -m mtneuro_jax.baselines.pca_nmf --config configs/task1_pca_nmf.py:nmf,quick --workdir out/runs/nmf
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from mtneuro_jax.eval.common import EvalContext
from mtneuro_jax.eval.registry import run_evals

METHODS = ("pca", "nmf")


def _default_data_module():
  from mtneuro_jax.data import pipeline

  return pipeline


def _mesh():
  from mtneuro_jax import sharding

  return sharding.make_mesh(1)  # sklearn runs on the host; one device is enough to feed it


def load_split(
  data, data_cfg, split: str, *, task: str | None = None, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """All valid tiles of a split as (images float32 [N, Y, X], labels int64 [N])."""
  images, labels = [], []
  for batch in data.eval_batches(
    data_cfg,
    split,
    mesh=_mesh(),
    global_batch_size=int(batch_size or data_cfg["eval_batch_size"]),
    task=task,
  ):
    valid = np.asarray(batch["valid"]).astype(bool)
    images.append(np.asarray(batch["image"])[valid][..., 0])
    labels.append(np.asarray(batch["label"])[valid])
  if not images:
    raise ValueError(f"split {split!r} of {task or data_cfg.task} is empty")
  return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int64)


def nmf_transform(
  x: np.ndarray, components: np.ndarray, *, max_iter: int = 200, tol: float = 1e-4, block: int = 256
) -> np.ndarray:
  """Non-negative codes W [N, K] >= 0 minimising ||x - W @ components||_F for fixed components [K, F].

  The same algorithm as ``sklearn.decomposition.NMF(solver='cd').transform``
  (cyclic coordinate descent from W = 0, stopping when the projected-gradient
  violation of a sweep falls below ``tol`` times the first sweep's, or after
  ``max_iter`` sweeps), but with ``x @ components.T`` and ``components @
  components.T`` computed once instead of every sweep, and rows processed in
  blocks that stay in cache. Rows are independent problems, so each block
  stops on its own violation. sklearn's version costs O(sweeps * N * F * K)
  and took minutes for the 2800 ROI-C2 test tiles; this takes seconds.
  """
  h = np.asarray(components, np.float64)
  gram = h @ h.T  # [K, K]
  diag = np.diag(gram).copy()
  out = []
  for s in range(0, len(x), block):
    b = np.asarray(x[s : s + block], np.float64) @ h.T  # [n, K]
    w = np.zeros(b.shape, order="F")  # columns contiguous: one coordinate = one column
    v0 = None
    for _ in range(max_iter):
      violation = 0.0
      for j in range(len(diag)):
        if diag[j] <= 0:
          continue
        g = w @ gram[:, j] - b[:, j]
        col = w[:, j]
        violation += float(np.abs(np.where(col > 0, g, np.minimum(g, 0.0))).sum())
        w[:, j] = np.maximum(col - g / diag[j], 0.0)
      v0 = violation if v0 is None else v0
      if v0 == 0 or violation / v0 <= tol:
        break
    out.append(w)
  return np.concatenate(out) if out else np.zeros((0, len(diag)))


class LinearEmbeddingClassifier:
  """PCA/NMF embedding -> standardise -> logistic regression, on flattened tiles.

  ``fit(images [N, Y, X], labels [N])``; ``logits(images [M, Y, X]) -> [M, C]``
  (the decision function; columns ordered by class id 0..C-1 -- every class must
  occur in the training labels).
  """

  def __init__(
    self,
    method: str,
    *,
    n_components: int = 256,
    seed: int = 0,
    image_mean: float = 0.0,
    image_std: float = 1.0,
    nmf_max_iter: int = 400,
    nmf_init: str = "nndsvda",
    classifier_c: float = 1.0,
    classifier_max_iter: int = 2000,
    num_classes: int | None = None,
  ):
    if method not in METHODS:
      raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    self.method = method
    self.n_components = int(n_components)
    self.seed = int(seed)
    self.image_mean, self.image_std = float(image_mean), float(image_std)
    self.nmf_max_iter, self.nmf_init = int(nmf_max_iter), nmf_init
    self.classifier_c, self.classifier_max_iter = float(classifier_c), int(classifier_max_iter)
    self.num_classes = num_classes
    self.info: dict[str, Any] = {}

  def _flat(self, images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    if self.method == "nmf":
      # Undo the pipeline's normalisation: NMF factorises non-negative intensities.
      x = np.maximum(x * self.image_std + self.image_mean, 0.0)
    return x

  def fit(self, images: np.ndarray, labels: np.ndarray) -> "LinearEmbeddingClassifier":
    from sklearn.decomposition import NMF, PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = self._flat(images)
    labels = np.asarray(labels, np.int64)
    k = min(self.n_components, x.shape[0], x.shape[1])
    t0 = time.perf_counter()
    if self.method == "pca":
      self.embed = PCA(n_components=k, random_state=self.seed)
    else:
      self.embed = NMF(
        n_components=k, init=self.nmf_init, max_iter=self.nmf_max_iter, random_state=self.seed
      )
    with warnings.catch_warnings():
      # Non-convergence within nmf_max_iter is recorded in info instead of warned per call.
      warnings.filterwarnings("ignore", category=ConvergenceWarning)
      z = self.embed.fit_transform(x)
    fit_s = time.perf_counter() - t0
    self.scaler = StandardScaler().fit(z)
    self.clf = LogisticRegression(C=self.classifier_c, max_iter=self.classifier_max_iter)
    self.clf.fit(self.scaler.transform(z), labels)
    num_classes = self.num_classes or int(labels.max()) + 1
    if list(self.clf.classes_) != list(range(num_classes)):
      raise ValueError(
        f"training labels cover classes {list(self.clf.classes_)}, need all of 0..{num_classes - 1}"
      )
    self.info = {
      "method": self.method,
      "n_components": int(k),
      "n_train": int(len(labels)),
      "n_features": int(x.shape[1]),
      "embed_fit_s": fit_s,
      "train_accuracy": float(self.clf.score(self.scaler.transform(z), labels)),
    }
    if self.method == "pca":
      self.info["explained_variance"] = float(self.embed.explained_variance_ratio_.sum())
    else:
      self.info["reconstruction_err"] = float(self.embed.reconstruction_err_)
      self.info["nmf_iterations"] = int(self.embed.n_iter_)
      self.info["nmf_converged"] = bool(self.embed.n_iter_ < self.nmf_max_iter)
    return self

  def logits(self, images: np.ndarray) -> np.ndarray:
    if self.method == "nmf":
      z = nmf_transform(
        self._flat(images), self.embed.components_, max_iter=self.nmf_max_iter, tol=self.embed.tol
      )
    else:
      z = self.embed.transform(self._flat(images))
    return self.clf.decision_function(self.scaler.transform(z)).astype(np.float32)

  def predict_fn(self) -> Callable[[dict], dict]:
    """A ``predict_fn`` for the evaluators: batch {'image': [B, Y, X, 1], ...} -> {'logits': [B, C]}."""

    def fn(batch):
      return {"logits": self.logits(np.asarray(batch["image"])[..., 0])}

    return fn


def with_precomputed_logits(model: LinearEmbeddingClassifier, batches) -> list[dict]:
  """Embeds a whole split in one call; returns its batches (numpy) each carrying its '_logits' [B, C].

  NMF's ``transform`` solves for every call from scratch with a per-call cost
  of O(iterations * pixels * components^2), so per-batch calls cost ~20x more
  than one call on the split (minutes vs seconds for ROI-C2's 2800 test tiles).
  """
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
  if not batches:
    return []
  logits = model.logits(np.concatenate([b["image"][..., 0] for b in batches]))
  chunks = np.split(logits, np.cumsum([len(b["image"]) for b in batches])[:-1])
  return [{**b, "_logits": z} for b, z in zip(batches, chunks, strict=True)]


def eval_context(model: LinearEmbeddingClassifier, data, config) -> EvalContext:
  """The evaluators' view of a fitted baseline: every opened split is embedded in one call and
  ``predict_fn`` reads the batch's precomputed logits, so the networks' evaluators score it alike."""

  def open_batches(split: str, task: str | None = None):
    return iter(
      with_precomputed_logits(
        model,
        data.eval_batches(
          config.data,
          split,
          mesh=_mesh(),
          global_batch_size=int(config.data.eval_batch_size),
          task=task,
        ),
      )
    )

  return EvalContext(
    predict_fn=lambda batch: {"logits": batch["_logits"]},
    open_batches=open_batches,
    dataset_info=lambda task=None: data.dataset_info(config.data, task),
  )


def fit_and_evaluate(config, workdir: str | None, *, data=None) -> dict[str, Any]:
  """Fits the baseline of ``config.method`` and runs ``config.evals``.

  Args:
    config: ConfigDict with seed, method ('pca' | 'nmf'), data (pipeline data_cfg),
      baseline {n_components, nmf_max_iter, nmf_init, classifier_c, classifier_max_iter},
      evals.<name> {kind, split, protocol ('whole'), optional task}.
    workdir: output directory (results.json, config.json, eval/ plots); None writes nothing.
    data: data module with ``eval_batches`` (default ``mtneuro_jax.data.pipeline``).

  Returns:
    {'<eval name>/<metric>': value, 'baseline/<fact>': value, 'step': 0}.
  """
  data = data or _default_data_module()
  t0 = time.perf_counter()
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  b = config.baseline
  images, labels = load_split(data, config.data, "train")
  model = LinearEmbeddingClassifier(
    config.method,
    n_components=b.n_components,
    seed=config.seed,
    image_mean=config.data.image_mean,
    image_std=config.data.image_std,
    nmf_max_iter=b.get("nmf_max_iter", 400),
    nmf_init=b.get("nmf_init", "nndsvda"),
    classifier_c=b.get("classifier_c", 1.0),
    classifier_max_iter=b.get("classifier_max_iter", 2000),
    num_classes=config.get("num_classes", None),
  ).fit(images, labels)
  del images
  results: dict[str, Any] = {f"baseline/{k}": v for k, v in model.info.items()}
  for name, ecfg in config.evals.items():
    if ecfg.get("protocol", "whole") != "whole":
      raise ValueError(
        f"evals.{name}: PCA/NMF embeddings are fitted on whole tiles; use protocol 'whole'"
      )
  results.update(
    run_evals(config.evals, eval_context(model, data, config), workdir=workdir, step=0)
  )
  results["baseline/total_s"] = time.perf_counter() - t0
  results["step"] = 0
  if workdir:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  return results


def main(argv=None) -> int:
  """CLI: ``python -m mtneuro_jax.baselines.pca_nmf --config FILE[:ARG] --workdir DIR``."""
  from mtneuro_jax.train.loop import parse_config_cli

  args = parse_config_cli(argv, workdir_help="output directory (results.json, config.json, eval/)")
  if args is None:
    return 0
  res = fit_and_evaluate(args["config"], args["workdir"])
  print(
    json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1, sort_keys=True)
  )
  return 0


if __name__ == "__main__":
  import sys

  from mtneuro_jax.errors import run_cli

  sys.exit(run_cli(main, ["python -m mtneuro_jax.baselines.pca_nmf", *sys.argv[1:]]))
