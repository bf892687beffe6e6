"""The one config library: arg parsing, size presets and sub-configs for every ``configs/*.py``.

A config file is ``get_config(arg) -> locked ConfigDict`` and imports only this
module (and ml_collections), never another config file. Its ``arg`` is a
comma-separated list of words, each of one kind:

  recipe  what is trained, e.g. ``paper`` (the paper's protocol; the default, the
          first recipe a config lists) or ``ref`` (the reference code's script).
  size    ``quick`` or ``tiny`` (``QUICK`` / ``TINY`` below); none = the recipe's full size.
  method  for configs that offer several, e.g. ``pca`` | ``nmf`` (default: the first).
  setting for configs that offer several, e.g. Task 2's ``3class`` | ``4class`` (default:
          the first).

At most one word of each kind; an unknown word is a ValueError that lists the
known ones. Whatever order the words come in, the recipe is applied first and
the size preset after it (``apply_size``), so ``ref,tiny`` is the reference
recipe at test size. ``--config.x=y`` overrides come after both.

Size presets (defined here only; every config and experiments/task1_tables.py use them):

  quick  a CPU smoke run of about half a minute per training run on 2 cores: 4x
         downsampling (64x64 tiles), ResNet width 1/8, 96 steps at batch 32 (about 3
         epochs of ROI-C1; ``num_epochs`` 3 only matters if ``total_steps`` is set
         back to 0), eval batch 128, a log line every 8 steps, a checkpoint only at the
         end, weight decay capped at 5e-4, NMF at most 50 iterations. It is exactly
         what the Task 1 tables' ``quick`` preset runs.
  tiny   seconds on CPU (tests): 4x downsampling, width 1/16, 2 steps at batch 8,
         eval batch 16, log and checkpoint every step, no progress bar, weight decay
         capped at 5e-4.

Task 2 (segmentation) has its own ``quick`` (``TASK2_SIZES``; ``tiny`` is the same TINY):

  quick  ``TASK2_QUICK``: 4x downsampling (64x64 tiles, 8x64x64 windows in 3D), width
         1/4 (U-Net start filters 8), batch 8 (inside the paper's batch grid {2..10}),
         TASK2_QUICK_STEPS steps, eval batch 32, a log line every 25 steps, a checkpoint
         only at the end. Task 1's width 1/8 at batch 32 would leave the U-Net 4 filters
         wide and a batch outside the grid.

The weight decay cap exists because the paper's coupled decay 0.3 keeps shrinking
the head in short runs and leaves the BatchNorm running statistics behind the
weights (eval accuracy lags train accuracy badly).

Values are set plainly. Nothing here derives one field from another (steps per
epoch, warmup steps, total steps): the loop does that, so CLI overrides never
leave a stale derived value behind. The one exception is the size presets'
weight decay *cap*, applied once to the recipe's value when the config is built.

This module imports only ml_collections, the standard library and mtneuro_jax/errors.py
(configs must load without JAX).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import ml_collections

from mtneuro_jax.errors import ConfigError

# Dataset facts shared by every task: the X-ray volume's intensity statistics on [0, 1].
XRAY_MEAN = 0.4894
XRAY_STD = 0.1238
DEFAULT_DATA_DIR = "out/data/phantom-seed0"  # `mtneuro export --source phantom` writes here
DEFAULT_CACHE_DIR = "~/.cache/mtneuro_jax/jax_cache"  # the loop's default too


# ---------------------------------------------------------------------------
# Size presets.
@dataclasses.dataclass(frozen=True)
class Size:
  """A size preset: the values ``apply_size`` sets after the recipe. None = keep the recipe's."""

  name: str
  downsample: int  # data.downsample
  batch_size: int  # data.batch_size
  eval_batch_size: int  # data.eval_batch_size
  width_multiplier: float  # model.width_multiplier (networks)
  weight_decay_cap: float  # optim.weight_decay = min(recipe's, cap)
  total_steps: int  # loop configs
  num_epochs: float | None
  log_every_steps: int
  checkpoint_every_steps: int  # 0 = only at the end
  progress: bool | None
  nmf_max_iter: int | None  # baseline configs (baseline.nmf_max_iter)


# 96 steps: 32 left the supervised nets undertrained (eval-mode BN collapsed to one class on
# ROI-C3); 96 (~30 s per run at width 1/8 on 2 cores) train to val 1.0 on the phantom.
# NMF at 200+ iterations dominated the quick tables; 50 keeps it under half a minute.
QUICK = Size(
  name="quick",
  downsample=4,
  batch_size=32,
  eval_batch_size=128,
  width_multiplier=0.125,
  weight_decay_cap=5e-4,
  total_steps=96,
  num_epochs=3.0,
  log_every_steps=8,
  checkpoint_every_steps=0,
  progress=None,
  nmf_max_iter=50,
)
TINY = Size(
  name="tiny",
  downsample=4,
  batch_size=8,
  eval_batch_size=16,
  width_multiplier=1 / 16,
  weight_decay_cap=5e-4,
  total_steps=2,
  num_epochs=None,
  log_every_steps=1,
  checkpoint_every_steps=1,
  progress=False,
  nmf_max_iter=None,
)
SIZES = {"quick": QUICK, "tiny": TINY}
TASK2_QUICK_STEPS = 150
TASK2_QUICK = Size(
  name="quick",
  downsample=4,
  batch_size=8,
  eval_batch_size=32,
  width_multiplier=0.25,
  weight_decay_cap=5e-4,
  total_steps=TASK2_QUICK_STEPS,
  num_epochs=None,
  log_every_steps=25,
  checkpoint_every_steps=0,
  progress=None,
  nmf_max_iter=None,
)
TASK2_SIZES = {"quick": TASK2_QUICK, "tiny": TINY}


# ---------------------------------------------------------------------------
# arg parsing.
class ConfigArgError(ConfigError):
  """A config ``arg`` with an unknown word or two words of one kind (CLIs print it as one line)."""


@dataclasses.dataclass(frozen=True)
class Arg:
  """A parsed config ``arg``: recipe, size preset (None = full size), method and setting (None
  if the config has none)."""

  recipe: str
  size: Size | None
  method: str | None
  setting: str | None = None


def parse_arg(
  arg: str | None,
  *,
  recipes: Sequence[str] = ("paper", "ref"),
  methods: Sequence[str] = (),
  settings: Sequence[str] = (),
  sizes: Mapping[str, Size] = SIZES,
) -> Arg:
  """Parses ``arg`` (e.g. ``'ref,tiny'``, ``'nmf,quick'``, ``'unet3d,4class,quick'``).

  Defaults: the first recipe, the first method, the first setting, full size. ``sizes``
  maps the size words to presets (``SIZES``; Task 2 passes ``TASK2_SIZES``).

  Raises:
    ConfigArgError (a ValueError): an unknown word (the message lists the known ones), or
      two words of one kind.
  """
  kinds = {w: "recipe" for w in recipes}
  kinds.update({w: "size" for w in sizes})
  kinds.update({w: "method" for w in methods})
  kinds.update({w: "setting" for w in settings})
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  unknown = [w for w in words if w not in kinds]
  if unknown:
    known = [f"recipes {', '.join(recipes)}", f"sizes {', '.join(sizes)}"]
    if methods:
      known.append(f"methods {', '.join(methods)}")
    if settings:
      known.append(f"settings {', '.join(settings)}")
    raise ConfigArgError(
      f"unknown config arg word(s) {unknown} in {arg!r}; known: "
      f"{'; '.join(known)} (comma-separated, at most one of each kind)"
    )
  picked: dict[str, list[str]] = {}
  for w in words:
    if w not in picked.setdefault(kinds[w], []):
      picked[kinds[w]].append(w)
  for kind, ws in picked.items():
    if len(ws) > 1:
      raise ConfigArgError(f"config arg {arg!r} names more than one {kind}: {ws}; pick one")
  size = picked.get("size", [None])[0]
  return Arg(
    recipe=picked.get("recipe", [recipes[0]])[0],
    size=sizes[size] if size else None,
    method=picked.get("method", [methods[0] if methods else None])[0],
    setting=picked.get("setting", [settings[0] if settings else None])[0],
  )


# ---------------------------------------------------------------------------
# Sub-configs.
def data_config(
  task: str,
  *,
  downsample: int,
  batch_size: int,
  eval_batch_size: int,
  image_mean: float = XRAY_MEAN,
  image_std: float = XRAY_STD,
  random_crop: int = 0,
  data_dir: str = DEFAULT_DATA_DIR,
) -> ml_collections.ConfigDict:
  """``config.data``: the pipeline's data_cfg (docs/CONTRACTS.md, "Pipeline API")."""
  return ml_collections.ConfigDict(
    {
      "data_dir": data_dir,
      "task": task,
      "downsample": downsample,
      "image_mean": image_mean,
      "image_std": image_std,
      "random_crop": random_crop,  # 0 = off
      "batch_size": batch_size,
      "eval_batch_size": eval_batch_size,
    }
  )


def optim_config(
  *,
  learning_rate: float,
  name: str = "sgd",
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mode: str = "coupled",
  decay_bias_and_norm: bool = True,
  schedule: str = "cosine",
  warmup_epochs: float = 0.0,
  grad_clip_norm: float = 0.0,
  lr_base_batch_size: int = 0,
  freeze: Sequence[str] = (),
) -> ml_collections.ConfigDict:
  """``config.optim``: every key ``mtneuro_jax/train/optim.py`` reads, in one place.

  ``weight_decay_mode`` 'coupled' = torch.optim.SGD(weight_decay=...) semantics;
  ``freeze``: regexes of '/'-joined param paths that get no update (e.g. '^encoder/').
  """
  c = ml_collections.ConfigDict()
  c.name = name
  c.learning_rate = learning_rate
  c.momentum = momentum
  c.nesterov = nesterov
  c.weight_decay = weight_decay
  c.weight_decay_mode = weight_decay_mode
  c.decay_bias_and_norm = decay_bias_and_norm
  c.schedule = schedule
  c.warmup_epochs = warmup_epochs
  c.grad_clip_norm = grad_clip_norm
  c.lr_base_batch_size = lr_base_batch_size  # > 0: lr scaled by batch_size / this
  c.freeze = tuple(freeze)
  # Named groups with their own settings, e.g. param_groups.probe = {'pattern': '^probe/',
  # 'learning_rate': 0.1, 'weight_decay': 0.0} (see train/optim.py); none by default.
  c.param_groups = ml_collections.ConfigDict()
  return c


def loop_defaults(
  c: ml_collections.ConfigDict,
  *,
  num_epochs: float,
  seed: int = 1,
  total_steps: int = 0,
  log_every_steps: int = 10,
  checkpoint_every_steps: int = 500,
  keep_checkpoints: int = 2,
  compilation_cache_dir: str = DEFAULT_CACHE_DIR,
  num_devices: int = 0,
  progress: bool = True,
  distributed: bool = False,
) -> ml_collections.ConfigDict:
  """Sets the loop's top-level keys (all but data, model, objective, optim, evals) on ``c``.

  ``total_steps`` > 0 overrides ``num_epochs``; ``checkpoint_every_steps`` 0 = only at the end;
  ``compilation_cache_dir`` '' = off; ``num_devices`` 0 = all devices; ``init_from.workdir``
  '' = train from scratch (else a fresh run starts from that run's model weights,
  ``init_from.subtree`` e.g. 'encoder', see train/checkpoint.py). Returns ``c``.
  """
  c.seed = seed  # the paper's seeds: 1, 100, 350, 631, 872
  c.num_epochs = num_epochs
  c.total_steps = total_steps
  c.log_every_steps = log_every_steps
  c.checkpoint_every_steps = checkpoint_every_steps
  c.keep_checkpoints = keep_checkpoints
  c.compilation_cache_dir = compilation_cache_dir
  c.num_devices = num_devices
  c.progress = progress
  c.distributed = distributed
  # 'bfloat16': the model's convs/dots in bf16, float32 params/loss/optimizer (train/step.py).
  c.compute_dtype = "float32"
  # > 1: every conv's weight gradient as that many convs over batch slices (train/step.py).
  c.conv_dw_groups = 1
  # 'onednn': every supported conv runs in oneDNN via an XLA FFI call (optional kernel,
  # mtneuro_jax/kernels/onednn.py; needs libdnnl-dev + g++). 'xla' = XLA's own convs.
  c.conv_backend = "xla"
  c.init_from = ml_collections.ConfigDict(
    {"workdir": "", "step": 0, "subtree": "", "model_state": True}
  )
  return c


def classification_evals(
  splits: Sequence[str] = ("test", "val"),
  *,
  protocols: Sequence[str] = ("whole",),
  curve_splits: Sequence[str] = ("val",),
) -> ml_collections.ConfigDict:
  """``config.evals``: a classification eval ``<split>_<protocol>`` per split and protocol.

  Protocols: 'whole' (the whole tile) | 'corners' (see mtneuro_jax/eval/classification.py).
  Evals of ``curve_splits`` get ``every_steps = 0`` (only at the end), so a run can ask
  for curves with ``--config.evals.val_whole.every_steps=N`` on the locked config.
  """
  evals = ml_collections.ConfigDict()
  for split in splits:
    for protocol in protocols:
      e = ml_collections.ConfigDict(
        {"kind": "classification", "split": split, "protocol": protocol}
      )
      if split in curve_splits:
        e.every_steps = 0
      evals[f"{split}_{protocol}"] = e
  return evals


def segmentation_evals(splits: Sequence[str] = ("test", "val")) -> ml_collections.ConfigDict:
  """``config.evals``: a 'segmentation' eval per split, named by the split, run at the end only
  (``every_steps`` 0; ``--config.evals.val.every_steps=N`` asks for a curve)."""
  evals = ml_collections.ConfigDict()
  for split in splits:
    evals[split] = ml_collections.ConfigDict(
      {"kind": "segmentation", "split": split, "every_steps": 0}
    )
  return evals


def apply_task1_ref_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference code's Task 1 script (task1_sup.py) as a recipe, applied before any size.

  Full-resolution 256x256 tiles fed as ToTensor() output ([0, 1], unnormalised), batch 8;
  where the config has them: no dropout, plain SGD lr 0.01 without momentum, decay or
  schedule, one epoch. Returns ``c``.
  """
  c.data.downsample = 1
  c.data.image_mean = 0.0
  c.data.image_std = 1.0
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  if "model" in c and "dropout" in c.model:
    c.model.dropout = 0.0
  if "optim" in c:
    c.optim.learning_rate = 0.01
    c.optim.momentum = 0.0
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
  if "num_epochs" in c:
    c.num_epochs = 1.0
  return c


def apply_size(c: ml_collections.ConfigDict, size: Size | None) -> ml_collections.ConfigDict:
  """Applies a size preset (QUICK, TINY; None = nothing) to a built config, after its recipe.

  Sets the ``data`` sizes always, ``model.width_multiplier`` and the capped
  ``optim.weight_decay`` where the config has them, the loop keys for loop configs
  (those with ``total_steps``) and ``baseline.nmf_max_iter`` for baseline configs.
  """
  if size is None:
    return c
  c.data.downsample = size.downsample
  c.data.batch_size = size.batch_size
  c.data.eval_batch_size = size.eval_batch_size
  if "model" in c and "width_multiplier" in c.model:
    c.model.width_multiplier = size.width_multiplier
  if "optim" in c:
    c.optim.weight_decay = min(c.optim.weight_decay, size.weight_decay_cap)
  if "total_steps" in c:
    c.total_steps = size.total_steps
    if size.num_epochs is not None:
      c.num_epochs = size.num_epochs
    c.log_every_steps = size.log_every_steps
    c.checkpoint_every_steps = size.checkpoint_every_steps
    if size.progress is not None:
      c.progress = size.progress
  if "baseline" in c and size.nmf_max_iter is not None:
    c.baseline.nmf_max_iter = size.nmf_max_iter
  return c


def task1_byol_family_config(
  objective_name: str, *, recipe: str, size: Size | None, mined: bool, cascaded: bool
) -> ml_collections.ConfigDict:
  """The unlocked Task 1 config of BYOL (mined=False) or MYOW (mined=True; cascaded = a second
  projector_m / predictor_m), shared by configs/task1_{byol,myow,myow_merged}.py (their
  docstrings explain the choices). Recipe 'paper' | 'ref', then ``size`` (QUICK / TINY / None).

  MYOW's batch holds the queries and an equal candidate pool, so its batch sizes, LR base
  batch and epoch counts are doubled to keep the reference's per-example LR and step counts.
  """
  pool = 2 if mined else 1
  heads = ("projector", "predictor") + (("projector_m", "predictor_m") if cascaded else ())
  c = ml_collections.ConfigDict()
  # ROI-C1 (cube A); task1_roi_c2 / task1_roi_c3 for the other settings.
  c.data = data_config("task1_roi_c1", downsample=2, batch_size=256 * pool, eval_batch_size=256)
  c.model_name = "resnet18_xray"
  # Encoder only: the objective owns its heads (projector, predictor, probe).
  c.model = ml_collections.ConfigDict({"num_classes": 0, "width_multiplier": 1.0, "dropout": 0.0})
  c.objective_name = objective_name
  objective = {
    # data/augment.py ViewConfig; intensity augmentations off, as the paper.
    "views": {
      "crop_fraction": 0.5,
      "per_sample": True,
      "brightness": 0.0,
      "contrast": 0.0,
      "gamma": 0.0,
      "blur_sigma": 0.0,
      "noise_std": 0.0,
    },
    "ema_base": 0.996,
    "projector": {"hidden": 4096, "out": 256},
    "predictor": {"hidden": 4096, "out": 256},
    "num_classes": 4,  # the online probe
  }
  if mined:
    objective.update(
      {
        "pool_size": 0,  # the last rows of the batch form the candidate pool; 0 = half
        "knn_k": 1,
        "myow_max_weight": 0.1,
        "myow_rampup_epochs": 20.0,  # 10 reference epochs (an epoch here has half the steps)
        "byol_warmup_epochs": 0.0,
      }
    )
  if cascaded:
    objective.update(
      {"projector_m": {"hidden": 4096, "out": 256}, "predictor_m": {"hidden": 4096, "out": 256}}
    )
  c.objective = ml_collections.ConfigDict(objective)
  c.optim = optim_config(
    name="sgd",
    learning_rate=0.03,
    lr_base_batch_size=256 * pool,  # the batch includes MYOW's pool
    momentum=0.9,
    weight_decay=5e-4,
    weight_decay_mode="coupled",
    schedule="cosine",
    warmup_epochs=10.0 * pool,  # 10 reference epochs
  )
  c.optim.trust_coefficient = 0.001  # LARS only (--config.optim.name=lars)
  c.optim.param_groups.probe = ml_collections.ConfigDict(
    {"pattern": "^probe/", "learning_rate": 0.1, "lr_base_batch_size": 0, "weight_decay": 0.0}
  )
  loop_defaults(c, seed=1, num_epochs=800.0 * pool)
  # The online probe learns on half-size views, so it is scored on half-size corners.
  c.evals = classification_evals(("test", "val"), protocols=("corners",))

  if recipe == "ref":
    c.data.downsample = 1
    c.data.batch_size = 8 * pool  # MYOW: 8 queries + 8 pool
    c.data.eval_batch_size = 8
    c.objective.views.per_sample = False
  apply_size(c, size)
  if size is not None:
    c.data.batch_size = size.batch_size * pool  # the preset's batch of queries (+ the pool)
    c.optim.warmup_epochs = 0.25 * pool  # 8 steps at quick
    if mined:
      c.objective.myow_rampup_epochs = 1.0
  if size is QUICK:
    # A 96-step smoke run. The long-run recipe (lr 0.03 x B/256, EMA base 0.996, 4096-wide heads)
    # barely moves the encoder in 96 steps (frozen-probe ROI-C1 ~0.57 on the phantom, below
    # PCA's 0.65). A short-run recipe from a small sweep on ROI-C1, seeds 1 and 100 (lr 0.03 /
    # 0.1 / 0.2 / 0.3, EMA base 0.9 / 0.99, heads 256 / 512 / 4096; the validation accuracy
    # picks the same setting as the test accuracy): lr 0.2 unscaled, EMA base 0.99, 512-wide heads.
    c.optim.learning_rate = 0.2
    c.optim.lr_base_batch_size = 0
    c.objective.ema_base = 0.99
  if size is not None:
    for head in heads:
      c.objective[head].hidden = 512 if size is QUICK else 256  # TINY: tests stay fast
  return c


# ICIP 2021 multi-scale models (configs/icip_multiscale.py, experiments/icip_tables.py): the
# quick size of `mtneuro icip --preset quick` (4x downsampling = 64x64 tiles, so the U-Nets
# run n_blocks 4 to keep the paper's 8x8 latent). Steps and width are sized so that all five
# quick runs (Double U-Net steps 1 and 2, U-Net, MT U-Net, SegNet) fit the main job's
# 150 s on 2 idle cores (docs/icip.md has the measurement).
ICIP_QUICK_STEPS = 64
ICIP_QUICK_STEP1_STEPS = 60  # step 1 (the region branch learns faster than the pixels)
# Task 2's quick size (same tiles, width and decay cap) with a larger batch and fewer steps.
ICIP_QUICK = dataclasses.replace(
  TASK2_QUICK,
  batch_size=16,
  eval_batch_size=64,
  total_steps=ICIP_QUICK_STEPS,
  log_every_steps=40,
)
ICIP_SIZES = {"quick": ICIP_QUICK, "tiny": TINY}
