"""Dataset and run-size presets that config files share (`configs/*.py` import from here).

Each helper edits a config in place for one situation: a short CPU run, the digits or CIFAR-10
latents of a tokenizer run, ImageNet through KL-16, the CIFAR-10 feature net. Nothing in the
package imports this module; methods own their config sections' defaults (`mar_config`,
`tokenizer_config`, ...), and this module only combines them.
"""
from __future__ import annotations

import ml_collections

from ardiff_jax import configlib
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.methods.ar_diffusion import ar_base_config
from ardiff_jax.methods.dd2 import dd2_config
from ardiff_jax.methods.dd2_adapt import dd2_adapt_config
from ardiff_jax.methods.dd2_tune import dd2_tune_config
from ardiff_jax.methods.kl_tokenizer import tokenizer_config
from ardiff_jax.methods.llamagen import llamagen_base_config
from ardiff_jax.methods.st_ar import st_ar_config
from ardiff_jax.models.gpt import PRESETS as gpt_presets


def use_digits_tokenizer_run(c: ml_collections.ConfigDict, *, steps: int, batch: int,
                             size: int) -> None:
  """A tokenizer (KL or VQ) trained on the bundled digits for a few CPU minutes: `size` px, no
  flips (digits are not mirror-symmetric), lr 1e-3 after 100 warmup steps, grids of 64, and no
  LPIPS: the demo runs without user files, and VGG features of 8×8 digits upsampled are far from
  the natural images LPIPS was calibrated on."""
  c.tokenizer.perceptual_weight = 0.0
  c.data.source = "digits"
  c.data.image_size = size
  c.data.random_flip = False
  c.train.num_steps = steps
  c.train.batch_size = batch
  c.train.log_every = 50
  c.train.ckpt_every = 300
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.sample.num_samples = c.sample.batch_size = 64


def use_tiny_vq_tokenizer_run(c: ml_collections.ConfigDict) -> None:
  """A seconds-long smoke run of a digits VQ tokenizer, for the tests: 4 steps at batch 16 on
  16 px images, a codebook-usage window of 256 (configs set their own tiny model)."""
  c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 4, 16, 2, 2
  c.sample.num_samples = c.sample.batch_size = 16
  c.data.image_size = 16
  c.tokenizer.usage_window = 256


def use_cifar10_tokenizer_run(c: ml_collections.ConfigDict, *, steps: int, batch: int, path: str,
                              disc: bool, warmup: int) -> None:
  """A tokenizer (KL or VQ) trained on the CIFAR-10 image folder at `path` (32 px, flips): lr 4e-4
  after `warmup` steps, the PatchGAN (if `disc`) from half-way as LDM starts it after the
  reconstruction settles, and 10,000 reconstructions scored on the CIFAR-10 feature net."""
  c.data.source = "folder"
  c.data.path = path
  c.data.image_size = 32
  c.data.random_flip = True
  c.train.num_steps = steps
  c.train.batch_size = batch
  c.train.log_every = 100
  c.train.ckpt_every = 2000
  c.optim.lr = 4e-4
  c.optim.warmup_steps = warmup
  c.tokenizer.disc_enabled = disc
  c.tokenizer.disc_start = steps // 2
  use_cifar_feature_net(c.eval.feature_net)
  c.eval.num_samples = 10000


def use_short_cpu_run(c: ml_collections.ConfigDict, steps: int, tiny: bool) -> None:
  """Training and sampling sizes for a short CPU run of a generator (the digits demos, CIFAR-10
  budget runs): lr 1e-3 after 200 warmup steps rather than the papers' schedules; samples from the
  raw weights, since an EMA of a run this short still holds much of its initialisation (MAR's
  author: EMA needs ~100k steps); CFG 2; grids of 100 and evaluations of 1,000 samples. `tiny`:
  three steps at batch 16, for the tests."""
  c.train.num_steps = steps
  c.train.log_every = 100
  c.train.ckpt_every = 1000
  c.train.ema_decay = 0.999
  c.sample.use_ema = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.sample.num_samples = c.sample.batch_size = 100
  c.sample.cfg_scale = 2.0
  c.eval.num_samples, c.eval.batch_size = 1000, 100
  if tiny:
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 3, 16, 1, 3
    c.sample.num_samples, c.sample.batch_size = 20, 16
    c.eval.num_samples, c.eval.batch_size = 40, 16


def use_cpu_run(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, steps: int,
                tiny: bool) -> None:
  """`use_short_cpu_run` for a DiffLoss generator, plus its sampler: 50 DDPM steps (tiny: 5), and
  x̂_0 clipped to ±5 while sampling (tokens have unit std and |x| < 3.1 in the cache): a head
  trained for minutes is not exact enough at t ≈ T, where x̂_0 amplifies its error (MAR: no clip)."""
  use_short_cpu_run(c, steps, tiny)
  section.num_sampling_steps = "5" if tiny else "50"
  section.clip_denoised = 5.0


def _use_cached_tokens(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                       tokenizer_workdir: str, eval_source: str) -> None:
  """What every cached-token helper below shares: 32 px images, tokens (latents or codes) from the
  cache of the tokenizer run at `tokenizer_workdir`, and evaluation against the real images of
  `eval_source` (a fresh `eval.data` for the caller to complete)."""
  section.tokenizer_workdir = tokenizer_workdir
  c.data.source = "cached"
  c.data.path = tokenizer_workdir + "/cache"
  c.data.image_size = 32
  c.eval.data = ml_collections.ConfigDict(configlib.base_config().data.to_dict())
  c.eval.data.source = eval_source
  c.eval.data.image_size = 32


def _use_cached_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                        tokenizer_workdir: str, eval_source: str) -> None:
  """`_use_cached_tokens` for KL latents: scaled by 1/std of the cache, in 2×2 patches."""
  c.tokenizer.latent_scale = 0.0
  section.patch_size = 2
  _use_cached_tokens(c, section, tokenizer_workdir, eval_source)


def use_digits_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                       tokenizer_workdir: str, tiny: bool) -> None:
  """Points a generator config at the digits demo tokenizer (`configs/kl_digits.py`) and its cache.

  32 px digits -> 8×8×4 latents -> 2×2 patches: 16 tokens of 16 dims (tiny: the 16 px two-level
  tokenizer, 8×8×4 latents, patch 1: 64 tokens of 4 dims). The scale is 1/std of the cache.
  Evaluation reads the digits images themselves (`eval.data`).
  """
  c.tokenizer = tokenizer_config("kl_tiny")
  c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, resolution=32)
  _use_cached_latents(c, section, tokenizer_workdir, eval_source="digits")
  c.data.random_flip = False               # digits are not mirror-symmetric
  c.eval.data.random_flip = False
  if tiny:
    c.tokenizer.overrides = dict(enc_ch=16, dec_ch=16, enc_ch_mult=(1, 2), dec_ch_mult=(1, 2),
                                 enc_attn_resolutions=(), resolution=16)
    c.data.image_size = c.eval.data.image_size = 16
    section.patch_size = 1


CIFAR10_TRAIN_IMAGES = 50_000


def use_cifar10_latents(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                        kl: str, path: str, preset: str) -> None:
  """Points a generator config at a `configs/kl_cifar10.py` run (`preset` must be that run's) and
  its cache; evaluation reads the CIFAR-10 image folder at `path` with the CIFAR-10 feature net.

  32 px -> 8×8×4 latents -> 2×2 patches: 16 tokens of 16 dims (KL-16's token width); the scale
  is 1/std of the cache (kl_cifar10 has no published scale).
  """
  c.tokenizer = tokenizer_config(preset)
  _use_cached_latents(c, section, kl, eval_source="folder")
  c.eval.data.path = path
  use_cifar_feature_net(c.eval.feature_net)


def use_cifar10_run(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                    steps: int, batch: int, cpu: bool) -> None:
  """`steps` steps of MAR's recipe with a 5-epoch warmup (MAR: 100 epochs of a 400-epoch run),
  EMA 0.9999, 100 DDPM steps, CFG 3; or, with `cpu`, the short-run settings of `use_cpu_run`
  (lr 1e-3, raw weights, 50 DDPM steps, CFG 2). Both evaluate as `use_cifar10_eval`."""
  if cpu:
    use_cpu_run(c, section, steps, tiny=False)
  else:
    c.train.num_steps = steps
    c.optim.warmup_steps = 5 * CIFAR10_TRAIN_IMAGES // batch
    c.train.log_every = 200
    c.train.ckpt_every = 5000
    c.sample.cfg_scale = 3.0
    c.sample.num_samples = c.sample.batch_size = 100
  use_cifar10_eval(c)


def use_cifar10_eval(c: ml_collections.ConfigDict) -> None:
  """10,000 samples (1,000 per class) against the 10,000 test images, as the real-train row of the
  evaluator check does, in batches of 250."""
  c.eval.num_samples, c.eval.batch_size = 10000, 250


def use_16_token_condref(c: ml_collections.ConfigDict, mode: str) -> None:
  """Condition refinement sized for batches of ≥ 64 images of 16 tokens (the digits and CIFAR-10
  generators: 64 × 16 = 1,024 conditions at batch 64, of which MAR's mask leaves ≥ 70%
  loss-bearing): fit on 512 of them against 1,024 of a 4,096-entry queue that 256 conditions
  join per step (full after 16 steps)."""
  c.condref.mode = mode
  c.condref.update(num_points=512, num_reference=1024, queue_size=4096, push_per_step=256)


IMAGENET_TRAIN_IMAGES = 1_281_167


def use_imagenet_images(data: ml_collections.ConfigDict) -> None:
  """ImageNet 256 from `tfds` imagenet2012 prepared by the user (data.path = its data_dir):
  the training split and the 50,000 validation images, 1,000 classes, 8 reading workers."""
  data.source = "tfds"
  data.tfds_name = "imagenet2012"
  data.eval_split = "validation"
  data.image_size = 256
  data.num_classes = 1000
  data.num_workers = 8


def use_imagenet_kl16(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                      kl: str, cache: str, batch: int, epochs: int) -> None:
  """ImageNet 256 through MAR's KL-16 (×0.2325, patch 1: 256 tokens × 16) from cached moments,
  `epochs` epochs with MAR's 100-epoch warmup, bf16 compute, 50k-sample evaluation."""
  c.tokenizer = tokenizer_config("kl16")
  c.tokenizer.latent_scale = 0.2325
  section.tokenizer_workdir = kl
  c.data.source = "cached"
  c.data.path = cache
  c.data.image_size = 256
  c.data.num_classes = 1000
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  c.train.num_steps = epochs * steps_per_epoch
  c.optim.warmup_steps = 100 * steps_per_epoch
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.sample.batch_size = 256
  c.eval.num_samples = 50000
  c.eval.batch_size = 256


def use_cifar_feature_net(f: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Settings for natural 32 px images (CIFAR-10): the pooled (ResNet-9) layout at a quarter of its
  widths, BatchNorm, 25 epochs at batch 128.

  Sized so that it trains on a 2-core CPU in about an hour (it is trained once per dataset and
  cached). Measured on CIFAR-10 (held-out, 10,000 test images): 86.46% after the 25 epochs (74 min
  on 2 CPU cores). After 600 steps: pooled 16/32/64/128 67.8% (3.1 steps/s), strided 32/64/128
  66.1% (1.3 steps/s) with BatchNorm and 55.7% with GroupNorm; the strided BatchNorm net reached
  83.45% after 15 epochs. Widen `widths` where an accelerator is at hand.
  """
  f.update(dict(arch="pooled", widths=(16, 32, 64, 128), residual_stages=(1, 3),
                blocks_per_stage=1, stem_stride=1, norm="batch", steps=9770, batch_size=128,
                lr=2e-3, warmup_steps=300, max_shift=4, label_smoothing=0.1))
  return f


def use_digits_codes(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                     tokenizer_workdir: str, tiny: bool, f: int = 4) -> None:
  """Points a LlamaGen config at a `configs/vq_digits.py:f=<f>` run (the same tokenizer settings)
  and its code cache; evaluation reads the digits images themselves (`eval.data`).

  32 px digits -> 8×8 codes (f = 4) or 4×4 codes (f = 8) from 1,024 (tiny: the 16 px two-level
  tokenizer, 8×8 codes from 64).
  """
  c.tokenizer = vq_tokenizer.tokenizer_config("vq_tiny")
  c.tokenizer.overrides = dict(ch=16, resolution=32, codebook_size=1024)
  if f == 8:
    c.tokenizer.overrides.update(ch_mult=(1, 2, 2, 2), attn_resolutions=(4,))
  if tiny:
    c.tokenizer.overrides = dict(ch=16, ch_mult=(1, 2), attn_resolutions=(), resolution=16,
                                 codebook_size=64, z_channels=16)
  _use_digits_code_cache(c, section, tokenizer_workdir, tiny)


def use_paella_digits_codes(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                            tokenizer_workdir: str, tiny: bool) -> None:
  """Points a Paella config at a `configs/paella_vq_digits.py` run (its default settings) and its
  code cache: 32 px digits -> 8×8 codes from 1,024 (tiny: the 16 px width-16 tokenizer, 4×4 codes
  from 64)."""
  c.tokenizer = vq_tokenizer.tokenizer_config("paella_tiny")
  c.tokenizer.overrides = dict(c_hidden=64, bottleneck_blocks=2, codebook_size=1024)
  if tiny:
    c.tokenizer.overrides = dict(c_hidden=16, bottleneck_blocks=1, codebook_size=64)
  _use_digits_code_cache(c, section, tokenizer_workdir, tiny)


def _use_digits_code_cache(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                           tokenizer_workdir: str, tiny: bool) -> None:
  """The digits code cache of a tokenizer run, evaluated against the digits images; no mirror
  images (digits are not mirror-symmetric: the image's own codes); 16 px when `tiny`."""
  _use_cached_tokens(c, section, tokenizer_workdir, eval_source="digits")
  c.data.random_flip = False
  c.eval.data.random_flip = False
  if tiny:
    c.data.image_size = c.eval.data.image_size = 16


def use_cifar10_codes(c: ml_collections.ConfigDict, section: ml_collections.ConfigDict, *,
                      vq: str, path: str, preset: str) -> None:
  """Points a LlamaGen config at a `configs/vq_cifar10.py` run (`preset` must be that run's) and
  its code cache; evaluation reads the CIFAR-10 image folder at `path` with the CIFAR-10 feature
  net. 32 px -> 8×8 codes (f = 4): 64 tokens; a training item reads the codes of the image or of
  its mirror image (`data.random_flip`, both cached)."""
  c.tokenizer = vq_tokenizer.tokenizer_config(preset)
  _use_cached_tokens(c, section, vq, eval_source="folder")
  c.data.random_flip = True
  c.eval.data.path = path
  use_cifar_feature_net(c.eval.feature_net)


def use_st_ar(c: ml_collections.ConfigDict, short_run: bool) -> None:
  """Turns a LlamaGen config into ST-AR's (`methods/st_ar.py`) at the same budget: method st_ar,
  the `st_ar` section at the paper's defaults, two distinct cached views per image.
  `short_run` (CPU budgets of a few thousand steps) departs in two places: teacher EMA decay
  0.99, whose half-life of 69 steps is about the same share of a 2,000-step run (3.5%) as the
  paper's 0.9999 (6,931 steps) is of its 250,000 (2.8%), where 0.9999 would leave the teacher
  82% at its initialisation after 2,000 steps; and a projector hidden width of 4× the model's
  (SimSiam's 2048 against a 128-wide trunk would outweigh the trunk)."""
  c.method = "st_ar"
  c.st_ar = st_ar_config()
  c.data.views = 2
  if short_run:
    c.st_ar.teacher_decay = 0.99
    c.st_ar.projector_hidden = 4 * gpt_presets[c.llamagen.preset]["width"]


def dd2_cifar10_base(steps: int, batch: int, vq: str, path: str, tok: str
                     ) -> ml_collections.ConfigDict:
  """The CIFAR-10 LlamaGen teacher's CPU config (`configs/llamagen_cifar10.py:cpu=True`: gpt_small
  on the `vq` run's 8×8 codes, `tok` its preset, evaluated against the test folder at `path`)
  that DD2's CIFAR-10 configs start from, so the teacher's weights fit theirs."""
  c = llamagen_base_config("gpt_small", batch)
  use_cifar10_codes(c, c.llamagen, vq=vq, path=path, preset=tok)
  use_short_cpu_run(c, steps, tiny=False)
  use_cifar10_eval(c)
  return c


def ar_diffusion_digits_base(steps: int, batch: int, kl: str, tiny: bool) -> ml_collections.ConfigDict:
  """The digits causal AR + DiffLoss config (`configs/ar_diffusion_digits.py`: gpt_small, or
  gpt_tiny when `tiny`, raster order, on the `kl` run's latents), which DD2's continuous-teacher
  configs also start from, so the teacher's weights fit theirs."""
  c = ar_base_config("gpt_small", batch)
  use_digits_latents(c, c.ar, kl, tiny)
  use_cpu_run(c, c.ar, steps, tiny)
  if tiny:
    c.ar.preset = "gpt_tiny"
  return c


def dd2_digits_base(steps: int, batch: int, vq: str, f: int, tiny: bool) -> ml_collections.ConfigDict:
  """The digits LlamaGen teacher's config (`configs/llamagen_digits.py`: gpt_small, or gpt_tiny
  when `tiny`, on the `vq` run's codes) that DD2's digits configs start from, so the teacher's
  weights fit theirs."""
  c = llamagen_base_config("gpt_tiny" if tiny else "gpt_small", batch)
  use_digits_codes(c, c.llamagen, vq, tiny, f)
  use_short_cpu_run(c, steps, tiny)
  return c


def use_dd2_adapt(c: ml_collections.ConfigDict, teacher: str, short_run: bool) -> None:
  """DD2's teacher adaptation (`methods/dd2_adapt.py`) on a LlamaGen teacher's config: the run
  at `teacher` made to read codebook vectors; AdamW at lr 1e-4 (DD2 fine-tunes 200k iterations
  and gives no rate; LlamaGen's own). `short_run`: 100 warmup steps."""
  c.method = "dd2_adapt"
  c.dd2 = dd2_adapt_config()
  c.dd2.teacher_workdir = teacher
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 100 if short_run else 0


def use_dd2_tune(c: ml_collections.ConfigDict, adapted: str, gts: bool, short_run: bool,
                 kind: str = "llamagen") -> None:
  """DD2 stage 1 (`methods/dd2_tune.py`) from the adapted teacher run at `adapted`: DD2's LlamaGen
  recipe (the full model at lr 1e-4, Adam 0.9/0.95, the teacher's own CFG (2.0 for LlamaGen-B/L
  and the CPU teachers, 1.75 / 1.65 for the larger ones) and top-p 1.0, a MAR-style
  head 1024 wide and 6 deep, 10 Euler steps per token), with the teacher's weight decay (0.05 for
  LlamaGen's configs; DD2 writes Adam). `short_run` (CPU budgets): lr 3e-4 after
  100 warmup steps and a head 256 wide and 3 deep, at the trunk's scale. `kind="ar_diffusion"`:
  the teacher at `adapted` is a causal AR + DiffLoss run of this config (no adaptation), sampled
  and guided with its own CFG scale and temperature (`methods/dd2_teacher.py`)."""
  c.method = "dd2_tune"
  c.dd2 = dd2_tune_config()
  c.dd2.teacher_kind = kind
  c.dd2.teacher_workdir = adapted
  c.dd2.gts = gts
  c.dd2.teacher_cfg = c.sample.cfg_scale      # the teacher's own guidance (its config's)
  if kind == "ar_diffusion":
    c.dd2.teacher_temperature = c.ar.temperature
  c.optim.lr, c.optim.warmup_steps = 1e-4, 0
  c.sample.cfg_scale = 1.0          # the teacher's guidance is in the targets
  if short_run:
    c.dd2.head_width, c.dd2.head_depth = 256, 3
    c.optim.lr, c.optim.warmup_steps = 3e-4, 100


def use_dd2_distil(c: ml_collections.ConfigDict, adapted: str, tune: str, init_g: bool,
                   init_psi: bool, short_run: bool, kind: str = "llamagen") -> None:
  """DD2 stage 2 (`methods/dd2.py`): G and ψ from the stage-1 run at `tune` (`init_g` / `init_psi`
  False: a fresh draw, the Tab. 4 ablation), against the adapted teacher at `adapted`. DD2's
  LlamaGen settings: K = 5, peak rates 1e-4 (G) and 2e-4 (ψ) warmed up from 1e-6 over 40k ψ
  iterations (8k G iterations), Adam 0.9/0.95 without weight decay, α = 1, G's progressive EMA,
  sampled from the EMA. `short_run`: warmups of 100 G and 500 ψ iterations and stage 1's short
  head (`use_dd2_tune`)."""
  use_dd2_tune(c, adapted, True, short_run, kind)
  c.optim.weight_decay = 0.0
  c.method = "dd2"
  keep = ("head_width", "head_depth", "teacher_kind", "teacher_cfg", "teacher_temperature")
  c.dd2 = ml_collections.ConfigDict({**dd2_config().to_dict(), **{k: c.dd2[k] for k in keep}})
  c.dd2.teacher_workdir, c.dd2.tune_workdir = adapted, tune
  c.dd2.init_generator, c.dd2.init_guidance = init_g, init_psi
  c.optim.lr, c.dd2.guidance_lr = 1e-4, 2e-4
  c.optim.warmup_start = 1e-6
  c.optim.warmup_steps, c.dd2.guidance_warmup = (100, 500) if short_run else (8000, 40000)
  c.train.ema_decay, c.train.ema_progressive = 0.9999, True
  c.sample.use_ema = True
