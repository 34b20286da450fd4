"""Shared config pieces: `:k=v` argument parsing, the base config every method extends, mesh rules.

Config files under `configs/` are Python modules with `get_config(arg: str | None)`. They start
from `base_config()`, which holds every field the engine, the scripts and the tests rely on, so a
field has one meaning everywhere. The CLI locks the config, so an override of a field that does not
exist fails with a message naming the nearest valid field.
"""
from __future__ import annotations

import ast
from typing import Any

import ml_collections

# Logical axis name -> mesh axes. One table for every model (maxtext style): parameters and key
# activations carry logical names, and this table alone decides how they are laid out on the mesh.
# A dimension whose size the mesh axes do not divide is replicated instead (see parallel/sharding.py).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("layers", None),      # the stacked axis of scanned blocks (models/layers.py)
)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `k1=v1,k2=v2` (big_vision style) into a ConfigDict typed by `defaults`.

  A bare `k` sets a boolean default to True. Values are converted to the type of their default,
  so `size=32` is an int when the default is an int. Unknown keys are an error that lists the
  valid ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"unknown config argument {key!r}; valid arguments: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} must be true/false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, str):
      out[key] = value
    else:
      try:
        out[key] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return out


def probe_config() -> ml_collections.ConfigDict:
  """Defaults of the `probe` section: `--mode probe`'s linear probe (evals/linear_probe.py), ST-AR's
  protocol after MAE's `main_linprobe.py` (reference/llamagen_star.md §3)."""
  c = ml_collections.ConfigDict()
  c.layer = 0                # probed block, 1-based; 0: the method's default (half the depth)
  c.num_positions = 8        # P token positions, `linear_probe.positions`
  c.epochs = 90
  c.warmup_epochs = 10
  c.batch_size = 16384       # effective batch, capped at the number of training rows
  c.base_lr = 0.1            # lr = base_lr · batch / 256
  c.weight_decay = 0.0
  c.momentum = 0.9
  c.trust_coefficient = 0.001
  c.feature_passes = 1       # passes over the train split whose features are kept (one view each)
  c.max_train = 0            # > 0: keep at most this many training rows (the first of the stream)
  return c


def base_config() -> ml_collections.ConfigDict:
  """The fields everyone relies on (DESIGN.md, Contracts). Method configs fill in the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = ""                       # key into ardiff_jax.methods.METHODS
  c.nan_policy = "skip"               # "skip": drop the update and count it; "halt": also stop the run

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 64             # global, over all processes and devices
  c.train.grad_accum_steps = 1        # micro-batches per step (lax.scan); batch_size must divide
  c.train.log_every = 50
  c.train.ckpt_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 0            # 0: no periodic sample grids during training
  c.train.ema_decay = 0.9999
  c.train.ema_progressive = False     # True: decay min(ema_decay, (step + 1)/(step + 10)) (DD2's EMA)
  c.train.compute_dtype = "float32"   # "bfloat16" on accelerators; params stay float32

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4                   # peak learning rate (absolute; configs derive it from blr·B/256)
  c.optim.warmup_steps = 0
  c.optim.warmup_start = 0.0          # the ramp: start + (lr − start)·min(step + 1, warmup)/warmup
  c.optim.schedule = "constant"       # "constant" | "cosine" (after the linear warmup)
  c.optim.min_lr = 0.0                # cosine floor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 0.0        # 0: no clipping

  c.convert = ml_collections.ConfigDict()
  c.convert.source = ""               # --mode convert: the released file (torch.save or .safetensors)
  c.convert.key = ""                  # its entry holding the state dict ("": the converter's default)

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"            # digits | folder | tfds | cached | coco
  c.data.path = ""
  c.data.tfds_name = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.random_flip = True
  c.data.views = 1                    # cached codes: distinct views per example (ST-AR: 2)
  c.data.num_classes = 10
  c.data.digits_test_fraction = 0.2
  c.data.num_workers = 0
  c.data.max_skipped_fraction = 0.1   # stop when more than this fraction of images read is unreadable
  c.data.caption_max_ids = 256        # coco: ByT5 ids per caption, </s> included (longer ones are cut)
  c.data.clip_tokenizer = ""          # coco: a CLIP folder (vocab.json, merges.txt) -> items get clip_ids

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)           # sizes of ("data", "fsdp", "tensor"); -1 fills the rest
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.rules = DEFAULT_RULES

  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 64
  c.sample.batch_size = 64
  c.sample.cfg_scale = 1.0
  c.sample.use_ema = True

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 1000
  c.eval.source = "model"             # model | real_train
  c.eval.tag = ""                     # names a variant of the evaluation: eval/<step>_<tag>.json
  c.eval.batch_size = 64              # generation batch (global)
  c.eval.every_steps = 0              # >0: run the evaluation during training every K steps
  c.eval.num_real = 0                 # held-out real images as reference (0: the whole split)
  c.eval.memorization_train = 10_000  # training images of the memorisation check (0: all; -1: off)
  c.eval.pr_k = 3                     # k of the k-NN manifolds (Kynkäänniemi et al. 2019)
  c.eval.condition_error_samples = 128  # held-out images of the condition-error analysis (0: off;
                                        # DiffLoss generators only, evals/condition_error.py)
  c.eval.condition_error_score_t = 500  # timestep of the score-vs-AR-step fit
  c.eval.condition_error_seed = 0     # held-out subset and noise of the analysis: the same for
                                      # every run, so analyses compare across models
  c.eval.feature_net = feature_net_defaults()
  c.eval.inception_weights = ""       # converted FID Inception .npz (convert/inception.py)
  c.eval.fid_stats = ""               # reference mu/sigma .npz; "" -> from the held-out split
  c.eval.inception_batch_size = 100

  c.bench = ml_collections.ConfigDict()
  c.bench.steps = 10
  c.bench.warmup_steps = 2
  c.bench.synthetic_data = False      # time on a random batch of the data's shapes (no dataset)
  c.probe = probe_config()

  c.aot = ml_collections.ConfigDict()
  c.aot.topology = ""

  c.cache = ml_collections.ConfigDict()
  c.cache.dir = ""                    # "" -> <workdir>/cache; train on it with data.source=cached
  c.cache.batch_size = 64
  c.cache.splits = ("train", "test")
  c.cache.use_ema = True
  c.cache.ten_crop = False            # VQ codes: LlamaGen's ten crops per image instead of image + flip
  c.cache.crop_range = 1.1            # ten_crop: centre crop to crop_range × image_size first
  return c


def feature_net_defaults() -> ml_collections.ConfigDict:
  """`eval.feature_net`: the in-project classifier behind FD-clf (evals/features.py; network: models/classifier.py).

  Defaults are sized for digits on a 2-core CPU (about a minute);
  `presets.use_cifar_feature_net` switches to natural 32 px images.
  """
  f = ml_collections.ConfigDict()
  f.dir = ""                 # "" -> $ARDIFF_JAX_CACHE (or ~/.cache/ardiff_jax)/feature_nets/<key>
  f.widths = (32, 64, 128)   # channels per stage; the penultimate features have widths[-1] dims
  f.blocks_per_stage = 1
  f.stem_stride = 2
  f.groups = 8                # GroupNorm groups (norm="group")
  f.norm = "group"           # "group" | "batch" (running statistics kept with the checkpoint)
  f.arch = "strided"         # "strided" residual stages | "pooled" (ResNet-9 layout, models/classifier.py)
  f.residual_stages = (1, 3)  # arch="pooled": stages (indices into widths) followed by residual blocks
  f.steps = 500
  f.batch_size = 64
  f.lr = 3e-3
  f.weight_decay = 0.05
  f.warmup_steps = 50
  f.max_shift = 2            # random translation in pixels (reflect padding)
  f.label_smoothing = 0.0
  f.seed = 0
  return f


def overrides(section: ml_collections.ConfigDict) -> dict:
  """A config section's `overrides` (model fields to change in its preset) as keyword arguments;
  JSON turns tuples into lists, which flax module fields must not hold."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in section.overrides.to_dict().items()}


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """Plain JSON-able dict of a config (tuples become lists)."""
  return config.to_dict()


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (e.g. "configs/mar_digits.py", "kl=W,tiny"):
  what `--config path:arg` gives the command line, for notebooks and tests (unlocked)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist (configs live in configs/NAME.py)")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from its `config.json`."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a trained ardiff_jax run "
                            "(train it first with --mode train)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
