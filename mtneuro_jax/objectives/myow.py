"""MYOW (Azabou et al. 2021), cascaded and merged, as MTNeuro trains them: BYOL plus a mined view.

Both objectives add to BYOL (byol.py, whose pieces they reuse) a third term on a *mined* pair:
each query tile is paired with its nearest neighbour, in encoder space, from a candidate pool.

Batch layout: the incoming batch holds the query batch AND the candidate pool. The last
``pool_size`` rows are the pool (default 0 = half the batch: the reference's "one extra batch"
from a second shuffled loader over the same training set); the first rows are the queries,
which also make the BYOL views and train the online probe. So a config with B queries sets
``data.batch_size = 2 * B`` and ``optim.lr_base_batch_size = 512``, keeping the learning rate at
0.03 * B / 256 as the reference. Under jit on the ('data',) mesh the batch is one global array,
so the pool spans the global batch whatever the number of devices.

Mining (``mine_nearest``): queries = online encoder features of a third view of the queries
(with gradient); candidates = target encoder features of a view of the pool (no gradient);
k nearest by cosine distance 2 - 2 cos; with k > 1 one of the top k is picked at random (the
original MYOW's ``knn_select='random'``); MTNeuro uses k = 1. Nothing is excluded (no
threshold, no self-exclusion), as the reference. Pool rows with ``valid`` False are never mined.

* **Cascaded** (``myow``): the mined pair goes through a second projection space:
  online y_q -> projector -> projector_m -> predictor_m  vs  target y_mined -> target projector ->
  target projector_m (the target keeps an EMA of projector_m too). The mined target features
  are the candidates' (no second target pass), as the reference.
* **Merged** (``myow_merged``): the mined pair goes through the ordinary BYOL branch, both
  directions: q(online view_m) vs z'(target mined), and q(online mined) vs z'(target view_m),
  where "mined" is the mined candidate's crop (re-encoded by the online network) and its
  target features are the candidates'.

Loss: ``probe + BYOL / (1 + w) + w / (1 + w) * mined`` (merged: each direction ``0.5 w / (1 + w)``),
with the mined weight w = 0 for ``byol_warmup_epochs`` (default 0), then linear to
``myow_max_weight`` (0.1) over ``myow_rampup_epochs`` (10). Epochs become steps with
``ctx.steps_per_epoch``; when it is 0 (unknown) one epoch counts as one step. An epoch here is
one pass over the training set in batches of queries + pool, i.e. half as many steps as an
epoch of B queries: the MTNeuro configs double the epoch counts to match the reference.

Config (``config.objective``): byol.py's keys plus
  pool_size:          rows at the end of the batch that form the pool (0 = half the batch).
  knn_k:              k of the k-NN mining (1).
  myow_max_weight:    0.1;  myow_rampup_epochs: 10;  byol_warmup_epochs: 0.
  projector_m, predictor_m: {hidden: 4096, out: 256} (cascaded only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtneuro_jax.data.augment import make_view
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives import byol
from mtneuro_jax.objectives.base import Objective, weighted_mean
from mtneuro_jax.objectives.byol import cfg_get, cosine_loss


# ---------------------------------------------------------------------------
# Pure pieces.
def mine_nearest(
  queries: jax.Array,
  candidates: jax.Array,
  k: int,
  rng: jax.Array,
  candidate_valid: jax.Array | None = None,
) -> jax.Array:
  """Index of a mined neighbour per query: int32 [Q].

  Args:
    queries: [Q, D]; candidates: [P, D] (P >= k).
    k: the neighbour is one of the k nearest by cosine distance (k = 1: the nearest).
    rng: picks among the k (unused for k = 1).
    candidate_valid: optional bool [P]; invalid candidates are never picked.
  """
  q = jax.lax.stop_gradient(queries).astype(jnp.float32)
  c = jax.lax.stop_gradient(candidates).astype(jnp.float32)
  qn = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  cn = c / jnp.maximum(jnp.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
  sim = qn @ cn.T  # [Q, P]; the smallest cosine distance is the largest similarity
  if candidate_valid is not None:
    sim = jnp.where(candidate_valid[None, :], sim, -jnp.inf)
  _, top = jax.lax.top_k(sim, k)  # [Q, k]
  if k == 1:
    return top[:, 0].astype(jnp.int32)
  pick = jax.random.randint(rng, (q.shape[0],), 0, k)
  return jnp.take_along_axis(top, pick[:, None], axis=1)[:, 0].astype(jnp.int32)


def myow_weight(
  step: jax.Array | int,
  *,
  steps_per_epoch: int,
  max_weight: float,
  rampup_epochs: float,
  warmup_epochs: float = 0.0,
) -> jax.Array:
  """Mined-term weight w: float32 []; 0 for ``warmup_epochs``, then linear to ``max_weight`` over
  ``rampup_epochs`` (steps_per_epoch 0 = unknown: one step per epoch)."""
  spe = steps_per_epoch if steps_per_epoch > 0 else 1
  start, ramp = warmup_epochs * spe, rampup_epochs * spe
  s = jnp.asarray(step, jnp.float32) - start
  frac = jnp.clip(s / ramp, 0.0, 1.0) if ramp > 0 else (s >= 0).astype(jnp.float32)
  return jnp.where(s >= 0, max_weight * frac, 0.0)


def split_pool(batch: dict, config) -> tuple[dict, dict]:
  """(queries, pool): the batch's first rows and its last ``pool_size`` rows (default half)."""
  b = batch["image"].shape[0]
  pool = int(cfg_get(config, "pool_size", 0) or 0) or b // 2
  if not 0 < pool < b:
    raise ConfigError(
      f"objective.pool_size={pool} must leave queries and a pool in a batch of {b}; "
      f"set it in 1..{b - 1} (0 = half the batch)"
    )
  return {k: v[: b - pool] for k, v in batch.items()}, {k: v[b - pool :] for k, v in batch.items()}


# ---------------------------------------------------------------------------
# The objectives.
def _make_init(merged: bool):
  heads = ("projector", "predictor") + (() if merged else ("projector_m", "predictor_m"))
  target_heads = ("projector",) if merged else ("projector", "projector_m")

  def init(rng, *, model, variables, example_image, config):
    return byol.init_ssl(
      rng,
      model=model,
      variables=variables,
      example_image=example_image,
      config=config,
      heads=heads,
      target_heads=target_heads,
    )

  return init


def _make_loss(merged: bool):
  def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
    query, pool = split_pool(batch, config)
    images = query["image"]
    valid = query.get("valid", jnp.ones(images.shape[:1], bool))
    pool_valid = pool.get("valid", jnp.ones(pool["image"].shape[:1], bool))
    vcfg = byol.view_config(config)
    k1, k2, km, kp, kf, kk, ke = jax.random.split(rng, 7)
    v1, v2 = make_view(images, k1, vcfg), make_view(images, k2, vcfg)
    carry = byol.carry_from(model_state, aux)
    byol_value, y1, carry = byol.byol_pair(config, model, params, carry, v1, v2, valid, kf)

    # Mining: online features of a third view of the queries vs target features of the pool.
    e1, e2, e3, e4 = jax.random.split(ke, 4)
    view_m = make_view(images, km, vcfg)
    pool_view = make_view(pool["image"], kp, vcfg)
    y_m, carry = byol.encode_online(model, params, carry, view_m, e1)
    y_pool, carry = byol.encode_target(model, carry, pool_view, e2)
    idx = mine_nearest(y_m, y_pool, int(cfg_get(config, "knn_k", 1)), kk, pool_valid)
    y_mined = y_pool[idx]  # [Q, D], no gradient

    if merged:
      q_m, carry = byol.online_heads(config, params, carry, y_m, ("projector", "predictor"))
      z_mined, carry = byol.target_heads(config, carry, y_mined, ("projector",))
      y_on_mined, carry = byol.encode_online(model, params, carry, pool_view[idx], e3)
      q_mined, carry = byol.online_heads(
        config, params, carry, y_on_mined, ("projector", "predictor")
      )
      t_m, carry = byol.encode_target(model, carry, view_m, e4)
      z_m, carry = byol.target_heads(config, carry, t_m, ("projector",))
      mined = 0.5 * cosine_loss(q_m, z_mined, valid) + 0.5 * cosine_loss(q_mined, z_m, valid)
    else:
      q_m, carry = byol.online_heads(
        config, params, carry, y_m, ("projector", "projector_m", "predictor_m")
      )
      z_mined, carry = byol.target_heads(config, carry, y_mined, ("projector", "projector_m"))
      mined = cosine_loss(q_m, z_mined, valid)

    w = myow_weight(
      ctx.step,
      steps_per_epoch=ctx.steps_per_epoch,
      max_weight=float(cfg_get(config, "myow_max_weight", 0.1)),
      rampup_epochs=float(cfg_get(config, "myow_rampup_epochs", 10.0)),
      warmup_epochs=float(cfg_get(config, "byol_warmup_epochs", 0.0)),
    )
    probe, metrics = byol.probe_loss(config, params, y1, query["label"], valid)
    ssl = (byol_value + w * mined) / (1.0 + w)
    total = ssl + probe
    same_label = (query["label"] == pool["label"][idx]).astype(jnp.float32)
    metrics.update(
      {
        "train/loss": total,
        "train/byol_loss": byol_value,
        "train/myow_loss": mined,
        "train/myow_weight": w,
        # How often the mined neighbour shares the query's class (labels are only logged).
        "train/mined_same_label": weighted_mean(same_label, valid),
        "train/ema_momentum": byol.ema_momentum(
          ctx.step, ctx.total_steps, cfg_get(config, "ema_base", byol.DEFAULT_EMA_BASE)
        ),
        "train/feature_std": byol.feature_std(y1),
      }
    )
    return total, (metrics, carry.model_state, byol.aux_from(carry, aux))

  return loss


MYOW = Objective(
  name="myow",
  init=_make_init(merged=False),
  loss=_make_loss(merged=False),
  update=byol.update,
  predict=byol.predict,
)
MYOW_MERGED = Objective(
  name="myow_merged",
  init=_make_init(merged=True),
  loss=_make_loss(merged=True),
  update=byol.update,
  predict=byol.predict,
)
