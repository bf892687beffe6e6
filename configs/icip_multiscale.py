"""ICIP 2021 multi-scale models: Double U-Net (two steps) and its baselines on Task 2 2D tiles.

Run:
  python -m mtneuro_jax.train.loop --config configs/icip_multiscale.py:double_unet,step1,quick \
      --workdir out/runs/icip_step1
  python -m mtneuro_jax.train.loop --config configs/icip_multiscale.py:double_unet,step2,quick \
      --workdir out/runs/icip_step2 --config.init_from.workdir=out/runs/icip_step1
  python -m mtneuro_jax.train.loop --config configs/icip_multiscale.py:mt_unet,quick \
      --workdir out/runs/icip_mt_unet
  (the tables driver, experiments/icip_tables.py = `mtneuro icip`, runs them all with seeds)

``arg`` (comma-separated, parsed by mtneuro_jax/configlib.py; at most one word of each kind):
  model  double_unet (default) | unet (the Double U-Net's U-Net alone, MODELS 'res_unet') |
         mt_unet | segnet | unet_encoder (the classification branch alone: the macro baseline).
  step   step1 | step2 (double_unet only; default step1) | joint (the other models' one
         step; their default).
         step1: the whole Double U-Net on CE(region) + recon_weight x MSE(image,
                reconstruction) (objective region_recon), on task2_2d_3class (all four
                regions; its masks are unused), 100 epochs.
         step2: pixel CE (objective pixel_ce) on task2_2d_4class (bg, vessel, cell, axon;
                CTX/STR/VP), the class branch frozen (optim.freeze '^class_branch/',
                model.freeze_class_branch: inference-mode BatchNorm); start it from step 1
                with --config.init_from.workdir=<step-1 workdir> (init_from.subtree is
                'class_branch': the U-Net branch starts fresh), 300 epochs.
         joint: unet / segnet pixel CE and mt_unet pixel CE + region CE on task2_2d_4class
                (300 epochs); unet_encoder region CE on task2_2d_3class (100 epochs).
  recipe paper (the only one): Adam lr 1e-3, batch 8, 2x downsampling (the paper's 128x128
         inputs), n_blocks 5 (an 8x8 latent for the 5x5 / 4x4 P-block), width 1 (32 start
         filters), flips + rot90, constant lr. For accelerators.
  size   quick (configlib.ICIP_QUICK: 64x64 tiles, n_blocks 4, width 1/4, ICIP_QUICK_STEPS
         steps at batch 16 (step 1: ICIP_QUICK_STEP1_STEPS); ~30 s per run on 2 idle
         cores, compiles included) | tiny (configlib.TINY, n_blocks 2: tests).

Evals (evaluator kind 'multiscale', at the end): ``test_micro`` (pixel F1 per class on the
run's task) where the model segments, ``test_macro`` (region F1 on task2_2d_3class's test
split, all four regions) where it has a region branch. docs/icip.md explains the choices.
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"
# model word -> MODELS name
MODELS = {
  "double_unet": "double_unet",
  "unet": "res_unet",
  "mt_unet": "mt_unet",
  "segnet": "segnet",
  "unet_encoder": "unet_encoder",
}
STEPS = ("step1", "step2", "joint")
MICRO_TASK = "task2_2d_4class"  # bg, vessel, cell, axon (no ZI: it lacks axon labels)
MACRO_TASK = "task2_2d_3class"  # the same tiles with all four regions
SEGMENTERS = ("double_unet", "unet", "mt_unet", "segnet")
REGION_MODELS = ("double_unet", "mt_unet", "unet_encoder")
ARGS = (
  "tiny",
  "double_unet,step1,quick",
  "double_unet,step2,quick",
  "double_unet,step2,tiny",
  "unet,quick",
  "mt_unet,quick",
  "segnet,quick",
  "unet_encoder,quick",
  "unet,tiny",
  "mt_unet,tiny",
  "segnet,tiny",
  "unet_encoder,tiny",
  "double_unet,step1",
  "double_unet,step2",
  "mt_unet",
)


def _step(arg: str | None, model: str) -> str:
  """The step word given, else the model's default (step1 for double_unet, joint otherwise)."""
  given = [w.strip() for w in (arg or "").split(",") if w.strip() in STEPS]
  step = given[0] if given else ("step1" if model == "double_unet" else "joint")
  if (model == "double_unet") == (step == "joint"):
    fix = "step1 or step2" if model == "double_unet" else "joint (or no step word)"
    raise configlib.ConfigArgError(
      f"config arg {arg!r}: model {model} does not train in step {step!r}; use {fix}"
    )
  return step


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(
    arg, recipes=("paper",), methods=tuple(MODELS), settings=STEPS, sizes=configlib.ICIP_SIZES
  )
  model, step = a.method, _step(arg, a.method)
  micro = model in SEGMENTERS and step != "step1"
  macro = model in REGION_MODELS
  pixel_task = step == "step2" or (step == "joint" and model in SEGMENTERS)

  c = ml_collections.ConfigDict()
  c.data = configlib.data_config(
    MICRO_TASK if pixel_task else MACRO_TASK, downsample=2, batch_size=8, eval_batch_size=8
  )
  c.model_name = MODELS[model]
  c.model = ml_collections.ConfigDict(
    {
      # The data's classes (the loop checks): bg, vessel, cell, axon for the pixel tasks; the
      # four regions for unet_encoder; step 1's pixel head (3, task2_2d_3class) is never trained.
      "num_classes": 4 if pixel_task or model == "unet_encoder" else 3,
      "dims": 2,
      "width_multiplier": 1.0,
      "start_filters": 32,
      "n_blocks": 5,
    }
  )
  if model == "double_unet":
    c.model.freeze_class_branch = step == "step2"
  augment = {"flip": True, "rot90": True, "flip_z": False}
  if step == "step1" or model == "unet_encoder":
    c.objective_name = "region_recon"
    # lambda: the paper's weight of the reconstruction MSE (its value is not given); 0 for the
    # encoder baseline, which has no reconstruction.
    c.objective = ml_collections.ConfigDict(
      {"recon_weight": 1.0 if model == "double_unet" else 0.0, "augment": augment}
    )
  elif model == "mt_unet":
    c.objective_name = "multitask"
    c.objective = ml_collections.ConfigDict({"region_weight": 1.0, "augment": augment})
  else:
    c.objective_name = "pixel_ce"
    c.objective = ml_collections.ConfigDict({"augment": augment})
  c.optim = configlib.optim_config(
    name="adam",
    learning_rate=0.001,
    schedule="constant",
    freeze=("^class_branch/",) if step == "step2" else (),
  )
  configlib.loop_defaults(c, seed=1, num_epochs=100.0 if not pixel_task else 300.0)
  if step == "step2":
    # Step 2 takes the class branch (params and BatchNorm statistics) of step 1's run; the
    # U-Net branch starts fresh (its pixel head differs from step 1's anyway).
    c.init_from.subtree = "class_branch"
  c.evals = ml_collections.ConfigDict()
  if micro:
    c.evals.test_micro = ml_collections.ConfigDict(
      {"kind": "multiscale", "scores": "micro", "split": "test", "every_steps": 0}
    )
  if macro:
    c.evals.test_macro = ml_collections.ConfigDict(
      {
        "kind": "multiscale",
        "scores": "macro",
        "split": "test",
        "task": MACRO_TASK,
        "every_steps": 0,
      }
    )
  configlib.apply_size(c, a.size)
  if a.size is configlib.ICIP_QUICK and step == "step1":
    c.total_steps = configlib.ICIP_QUICK_STEP1_STEPS
  if a.size is configlib.ICIP_QUICK:
    c.model.n_blocks = 4  # 64x64 tiles: 3 poolings keep the paper's 8x8 latent
  elif a.size is not None:
    c.model.n_blocks = 2  # tests: fewer layers compile faster (a 32x32 latent, P-block -> mean)
  c.lock()
  return c
