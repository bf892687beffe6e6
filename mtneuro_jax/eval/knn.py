"""The 'knn' evaluator: weighted k-nearest-neighbour classification in feature space.

A representation's label-free readout (InstDisc, Wu et al. 2018; the usual SSL monitor):
the features of the train split (``ctx.predict_fn(batch)['features']``, padding rows
dropped) are L2-normalised and kept as a bank; every sample of the eval split is
classified by its ``k`` most cosine-similar bank entries, each voting for its class with
weight ``exp(sim / temperature)`` ('exp', default) or 1 ('uniform'). Ties between classes
go to the smallest class id; ties between equally similar neighbours to the earlier bank
entry. The eval features are processed in chunks of ``chunk_size`` rows against the bank,
so memory is O(chunk_size x N_train) whatever the eval split's size.

eval_cfg keys: ``split`` ('test'), ``train_split`` ('train'), ``task`` (the run's),
``k`` (20), ``temperature`` (0.07), ``weighting`` ('exp' | 'uniform'), ``protocol``
('whole': one sample per tile | 'corners': the four half-size corners of each tile are
separate samples, in the bank and in the queries, as in the classification evaluator's
'corners'), ``chunk_size`` (1024), ``name``.

Returns ``classification.classification_metrics``' dict (accuracy, balanced_accuracy,
recall/*, acc_region/*, confusion, n) plus ``n_train`` and ``k`` (the k used: at most
``n_train``); writes ``<workdir>/eval/<name>_step<step>_confusion.{png,json}``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.eval.classification import classification_metrics, corner_views
from mtneuro_jax.eval.common import EvalContext, eval_name, to_host, write_confusion
from mtneuro_jax.volumes import spec

WEIGHTINGS = ("exp", "uniform")
PROTOCOLS = ("whole", "corners")


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows of ``x`` [N, D] scaled to unit L2 norm (float64; an all-zero row stays zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def knn_predict(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  features: np.ndarray,
  *,
  num_classes: int,
  k: int = 20,
  temperature: float = 0.07,
  weighting: str = "exp",
  chunk_size: int = 1024,
) -> np.ndarray:
  """Predicted class [M] of each row of ``features`` [M, D] from the bank [N, D] / [N].

  Cosine similarity (features normalised here); the top min(k, N) neighbours vote with
  weight exp(sim / temperature) ('exp') or 1 ('uniform'); argmax over classes, ties to the
  smallest class id.
  """
  if weighting not in WEIGHTINGS:
    raise ConfigError(f"knn weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
  if k < 1 or temperature <= 0 or chunk_size < 1:
    raise ConfigError(
      f"knn needs k >= 1, temperature > 0 and chunk_size >= 1; got {k}, {temperature}, {chunk_size}"
    )
  bank = l2_normalise(train_features)
  labels = np.asarray(train_labels, np.int64).reshape(-1)
  if bank.shape[0] == 0:
    raise ValueError("the kNN bank is empty (no valid rows in the train split)")
  k = min(int(k), bank.shape[0])
  queries = l2_normalise(features)
  preds = np.empty((queries.shape[0],), np.int64)
  for start in range(0, queries.shape[0], chunk_size):
    sims = queries[start : start + chunk_size] @ bank.T  # [c, N]
    # Stable sort of -sim: among equally similar entries the earlier bank row wins.
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [c, k]
    top = np.take_along_axis(sims, idx, axis=1)
    weights = np.exp(top / temperature) if weighting == "exp" else np.ones_like(top)
    votes = np.zeros((top.shape[0], num_classes), np.float64)
    np.add.at(votes, (np.arange(top.shape[0])[:, None], labels[idx]), weights)
    preds[start : start + top.shape[0]] = np.argmax(votes, axis=1)  # first max: smallest id
  return preds


def collect_features(
  predict_fn, batches: Iterable[Mapping[str, Any]], *, label_key: str, protocol: str
) -> dict[str, np.ndarray]:
  """One pass: valid rows' 'features' [N, D], labels [N], regions [N] ('corners': 4 per tile)."""
  if protocol not in PROTOCOLS:
    raise ConfigError(f"knn protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
  feats, labels, regions, valids = [], [], [], []
  for batch in batches:
    if protocol == "whole":
      f = predict_fn(batch)["features"][:, None]  # [B, 1, D]
    else:
      f = np.stack(
        [
          to_host(predict_fn({**batch, "image": v})["features"])
          for v in corner_views(batch["image"])
        ],
        axis=1,
      )  # [B, 4, D]
    feats.append(f)
    labels.append(batch[label_key])
    regions.append(batch.get("region", batch[label_key]))
    valids.append(batch.get("valid", np.ones(np.shape(batch[label_key]), bool)))
  if not feats:
    raise ValueError("the kNN evaluation received no batches")
  valid = np.concatenate([to_host(v).astype(bool) for v in valids])
  f = np.concatenate([to_host(v) for v in feats]).astype(np.float32)[valid]  # [N, V, D]
  views = f.shape[1]
  return {
    "features": f.reshape(-1, f.shape[-1]),
    "label": np.repeat(np.concatenate([to_host(v) for v in labels])[valid], views),
    "region": np.repeat(np.concatenate([to_host(v) for v in regions])[valid], views),
  }


def knn(ctx: EvalContext, *, eval_cfg, workdir: str | None, step: int) -> dict[str, Any]:
  """The registered 'knn' evaluator (contract v2, see ``common.py``; keys in the module doc)."""
  task = eval_cfg.get("task", None)
  info = ctx.dataset_info(task)
  label_key = info.get("target_key", "label")
  if label_key != "label":
    raise ConfigError(
      f"the knn evaluator classifies tiles, but task {task or 'of the run'} has targets "
      f"{label_key!r}; use it on a Task 1 dataset"
    )
  num_classes = int(info["num_classes"])
  class_names = list(info.get("class_names") or [f"class{i}" for i in range(num_classes)])
  protocol = eval_cfg.get("protocol", "whole")
  kw = dict(label_key=label_key, protocol=protocol)
  bank = collect_features(
    ctx.predict_fn, ctx.open_batches(eval_cfg.get("train_split", "train"), task), **kw
  )
  query = collect_features(
    ctx.predict_fn, ctx.open_batches(eval_cfg.get("split", "test"), task), **kw
  )
  k = int(eval_cfg.get("k", 20))
  preds = knn_predict(
    bank["features"],
    bank["label"],
    query["features"],
    num_classes=num_classes,
    k=k,
    temperature=float(eval_cfg.get("temperature", 0.07)),
    weighting=eval_cfg.get("weighting", "exp"),
    chunk_size=int(eval_cfg.get("chunk_size", 1024)),
  )
  out = classification_metrics(
    query["label"],
    preds,
    num_classes=num_classes,
    class_names=class_names,
    groups=query["region"],
    group_names=spec.REGIONS,
  )
  out["n_train"] = int(bank["label"].size)
  out["k"] = min(k, out["n_train"])
  # Unnamed: '[<task>_]<split>_knn', never the classification eval's file name.
  name = eval_name({**dict(eval_cfg), "protocol": "knn"})
  title = f"{name} step {int(step)}: kNN acc {out['accuracy']:.3f}"
  write_confusion(workdir, name, step, class_names, out, title)
  return out
