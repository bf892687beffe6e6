"""SSL evaluation and a new SSL method in one file:

* VICReg's loss against a closed-form numpy computation; identical views: zero invariance;
* the kNN evaluator against brute force and sklearn, through a fake EvalContext;
* linear evaluation through the real loop: the frozen encoder's params and BatchNorm
  statistics stay bitwise unchanged under the 'ssl' protocol, and the 'reference' protocol
  (the reference code's bug, on purpose) does re-estimate the statistics.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mtneuro_jax.eval import knn as knn_lib
from mtneuro_jax.eval.common import EvalContext
from mtneuro_jax.models import MODELS, resnet
from mtneuro_jax.objectives import vicreg
from mtneuro_jax.train import checkpoint, loop


# ---------------------------------------------------------------------------
# VICReg loss.
def _vicreg_numpy(za, zb, gamma=1.0, eps=1e-4):
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  n, d = za.shape
  inv = np.mean((za - zb) ** 2)
  var = cov = 0.0
  for z in (za, zb):
    std = np.sqrt(z.var(axis=0, ddof=1) + eps)
    var += np.mean(np.maximum(0.0, gamma - std))
    c = np.cov(z, rowvar=False)  # 1 / (n - 1)
    cov += (np.sum(c**2) - np.sum(np.diag(c) ** 2)) / d
  return inv, var, cov


def test_vicreg_loss_matches_closed_form():
  rng = np.random.default_rng(0)
  # Columns of different scales: some below gamma (variance hinge active), some above.
  scale = np.array([0.1, 0.5, 2.0, 3.0, 0.8, 1.5])
  za = rng.normal(size=(16, 6)) * scale
  zb = za + 0.3 * rng.normal(size=(16, 6))
  inv, var, cov = _vicreg_numpy(za, zb)
  value, terms = vicreg.vicreg_loss(jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32))
  np.testing.assert_allclose(terms["invariance"], inv, rtol=1e-5)
  np.testing.assert_allclose(terms["variance"], var, rtol=1e-5)
  np.testing.assert_allclose(terms["covariance"], cov, rtol=1e-4)
  assert var > 0 and cov > 0
  np.testing.assert_allclose(value, 25 * inv + 25 * var + cov, rtol=1e-5)
  value2, _ = vicreg.vicreg_loss(za, zb, sim_coeff=1.0, std_coeff=2.0, cov_coeff=3.0, gamma=2.0)
  inv2, var2, cov2 = _vicreg_numpy(za, zb, gamma=2.0)
  np.testing.assert_allclose(value2, inv2 + 2 * var2 + 3 * cov2, rtol=1e-5)


def test_vicreg_identical_views_give_zero_invariance():
  z = jax.random.normal(jax.random.key(1), (8, 5)) * 3.0
  _, terms = vicreg.vicreg_loss(z, z)
  assert float(terms["invariance"]) == 0.0
  assert float(terms["variance"]) == 0.0  # every std above gamma = 1
  # Collapsed embeddings (all rows equal): the variance hinge is 2 * (1 - sqrt(eps)).
  _, terms = vicreg.vicreg_loss(jnp.ones((8, 5)), jnp.ones((8, 5)))
  np.testing.assert_allclose(terms["variance"], 2 * (1 - np.sqrt(1e-4)), rtol=1e-6)
  assert float(terms["covariance"]) == 0.0


# ---------------------------------------------------------------------------
# kNN.
def _knn_brute(bank, labels, queries, *, k, temperature, num_classes, uniform=False):
  preds = []
  for q in queries:
    sims = [
      float(np.dot(q, b) / (np.linalg.norm(q) * np.linalg.norm(b))) for b in bank
    ]  # cosine similarity, one by one
    order = sorted(range(len(bank)), key=lambda i: (-sims[i], i))[:k]
    votes = [0.0] * num_classes
    for i in order:
      votes[labels[i]] += 1.0 if uniform else np.exp(sims[i] / temperature)
    preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
  return np.asarray(preds)


def test_knn_predict_matches_brute_force_and_sklearn():
  rng = np.random.default_rng(0)
  bank, queries = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
  labels = rng.integers(0, 3, 60)
  for k, t in ((7, 0.1), (1, 0.07), (60, 0.5), (100, 1.0)):  # k > N: all of the bank
    got = knn_lib.knn_predict(
      bank, labels, queries, num_classes=3, k=k, temperature=t, chunk_size=4
    )
    want = _knn_brute(bank, labels, queries, k=min(k, 60), temperature=t, num_classes=3)
    np.testing.assert_array_equal(got, want)
  for k in (1, 5, 8):
    got = knn_lib.knn_predict(bank, labels, queries, num_classes=3, k=k, weighting="uniform")
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank, labels)
    np.testing.assert_array_equal(got, sk.predict(queries))
  # Class ties go to the smallest id: two neighbours of classes 2 and 1, equally similar.
  tie = knn_lib.knn_predict(
    np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([2, 1]), np.array([[1.0, 0.0]]), num_classes=3, k=2
  )
  assert tie.tolist() == [1]


def _fake_ctx(splits, num_classes=3):
  """EvalContext over {split: (tiles [N, Y, X, 1], labels [N])}; features = the flattened pixels."""

  def open_batches(split, task=None):
    feats, labels = splits[split]
    for s in range(0, len(labels), 8):
      f, y = feats[s : s + 8], labels[s : s + 8]
      pad = 8 - len(y)
      valid = np.arange(8) < len(y)
      f = np.concatenate([f, np.full((pad,) + f.shape[1:], 1e3)])  # garbage padding rows
      y = np.concatenate([y, np.full((pad,), num_classes - 1)])
      yield {"image": jnp.asarray(f), "label": jnp.asarray(y), "valid": jnp.asarray(valid)}

  def predict_fn(batch):
    return {"features": batch["image"].reshape(batch["image"].shape[0], -1)}

  info = {"class_names": ["a", "b", "c"], "num_classes": num_classes, "target_key": "label"}
  return EvalContext(predict_fn, open_batches, lambda task=None: info)


def test_knn_evaluator_through_a_fake_context(tmp_path):
  rng = np.random.default_rng(1)
  # Tiles [N, 4, 4, 1]; 'whole' features are the 16 pixels, 'corners' each 2x2 corner's 4.
  xtr, ytr = rng.normal(size=(21, 4, 4, 1)), rng.integers(0, 3, 21)
  xte, yte = rng.normal(size=(13, 4, 4, 1)), rng.integers(0, 3, 13)
  ctx = _fake_ctx({"train": (xtr, ytr), "test": (xte, yte)})
  cfg = {"name": "test_knn", "split": "test", "k": 5, "temperature": 0.2, "chunk_size": 3}
  res = knn_lib.knn(ctx, eval_cfg=cfg, workdir=str(tmp_path), step=7)
  want = _knn_brute(
    xtr.reshape(21, -1), ytr, xte.reshape(13, -1), k=5, temperature=0.2, num_classes=3
  )
  assert res["n"] == 13 and res["n_train"] == 21 and res["k"] == 5
  assert res["accuracy"] == pytest.approx(float((want == yte).mean()))
  cm = np.zeros((3, 3), int)
  np.add.at(cm, (yte, want), 1)
  assert res["confusion"] == cm.tolist()
  assert os.path.exists(tmp_path / "eval" / "test_knn_step7_confusion.png")

  def corners(x):  # [N, 4, 4, 1] -> [4N, 4] in TL, TR, BL, BR order per tile
    c = [x[:, :2, :2], x[:, :2, 2:], x[:, 2:, :2], x[:, 2:, 2:]]
    return np.stack([v.reshape(len(x), -1) for v in c], axis=1).reshape(-1, 4)

  res = knn_lib.knn(ctx, eval_cfg={**cfg, "protocol": "corners"}, workdir=None, step=0)
  want = _knn_brute(
    corners(xtr), np.repeat(ytr, 4), corners(xte), k=5, temperature=0.2, num_classes=3
  )
  assert res["n"] == 4 * 13 and res["n_train"] == 4 * 21
  assert res["accuracy"] == pytest.approx(float((want == np.repeat(yte, 4)).mean()))


# ---------------------------------------------------------------------------
# Linear evaluation through the real loop.
@pytest.fixture
def small_model(monkeypatch):
  monkeypatch.setitem(
    MODELS, "small_xray", functools.partial(resnet.ResNetXray, stage_sizes=(1, 1))
  )


def _state(workdir):
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = jax.tree.map(np.asarray, ck.read_state())
  ck.close()
  return state


def _tune(c, data_dir, cache, total_steps, **extra):
  c.unlock()
  c.data.data_dir = data_dir
  c.compilation_cache_dir = cache
  c.total_steps = total_steps
  c.checkpoint_every_steps = 0
  c.model_name = "small_xray"
  for k, v in extra.items():
    c[k] = v
  c.lock()
  return c


def test_linear_probe_keeps_the_encoder_bitwise_and_reference_does_not(
  tmp_path, tiny_data_dir, small_model
):
  from configs import task1_linear_probe, task1_supervised

  cache = str(tmp_path / "cache")
  src = str(tmp_path / "src")
  loop.train_and_evaluate(_tune(task1_supervised.get_config("tiny"), tiny_data_dir, cache, 2), src)
  pre = _state(src)
  init = ml_collections.ConfigDict(
    {"workdir": src, "step": 0, "subtree": "encoder", "model_state": True}
  )
  results = {}
  for protocol in ("ssl", "reference"):
    c = _tune(task1_linear_probe.get_config("tiny"), tiny_data_dir, cache, 3, init_from=init)
    c.objective.protocol = protocol
    dst = str(tmp_path / protocol)
    results[protocol] = loop.train_and_evaluate(c, dst)
    post = _state(dst)
    # Frozen encoder params: bitwise the source run's, whatever the protocol.
    jax.tree.map(np.testing.assert_array_equal, post["params"]["encoder"], pre["params"]["encoder"])
    assert "probe" in post["params"] and "head" not in post["params"]
    same = jax.tree.leaves(
      jax.tree.map(
        np.array_equal,
        post["model_state"]["batch_stats"]["encoder"],
        pre["model_state"]["batch_stats"]["encoder"],
      )
    )
    if protocol == "ssl":  # inference-mode BN: statistics bitwise unchanged
      assert all(same)
    else:  # the reference's bug: train-mode BN re-estimates them on un-normalised tiles
      assert not any(same)
  for res in results.values():
    assert 0.0 <= res["test_corners/accuracy"] <= 1.0 and 0.0 <= res["test_knn/accuracy"] <= 1.0
    assert res["test_knn/n"] == 4 * res["test_corners/n_tiles"]


def test_linear_probe_warns_on_a_random_encoder(caplog):
  from mtneuro_jax.objectives import linear_probe

  model = resnet.ResNetXray(num_classes=0, width_multiplier=1 / 16, stage_sizes=(1,))
  image = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.key(0), image, train=False)
  cfg = ml_collections.ConfigDict({"num_classes": 4})
  kw = dict(model=model, example_image=image, config=cfg)
  trained = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])  # as after training
  with caplog.at_level("WARNING"):
    own, _ = jax.jit(lambda v: linear_probe.init(jax.random.key(1), variables=v, **kw))(variables)
    jax.effects_barrier()
    assert "random) encoder" in caplog.text and own["probe"]["Dense_0"]["kernel"].shape == (4, 4)
    caplog.clear()
    jax.jit(lambda v: linear_probe.init(jax.random.key(1), variables=v, **kw))(
      {**variables, "batch_stats": trained}
    )
    jax.effects_barrier()
    assert "random) encoder" not in caplog.text
