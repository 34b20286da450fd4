"""Paella v2 (Rampas et al.; reference/dd2_paella.md §3): a convolutional U-Net that predicts every
token of a VQGAN code grid at once, trained on uniform-renoised codes (`src_distributed/train.py`).

For cached codes x [B, h, w] of a VQ tokenizer run (Paella's f = 4 VQGAN: `tokenizer.preset=
paella_f4` or a CPU preset), with condition c of each image:
  t   = clip(1 − U + 0.001, 0.001, 1)                        per sample (`sample_levels`)
  m   = 1[u ≤ t] per token; x̃ = m ? uniform code in [0, V) : x   (`uniform_noise`; no mask token,
        and the drawn code may equal the original)
  ℓ   = UNet(x̃, t, c)                                          [B, h, w, V]
  w   = 1 − (1 − m)(1 − t)(1 − η), η = 0.3                     (`loss_weights`: noised tokens 1,
        clean ones η + (1 − η)t)
  L   = mean_b Σ_hw w·CE_ls(ℓ, x) / Σ_hw w                      (label smoothing 0.1, `weighted_ce`)
AdamW (torch defaults: β 0.9/0.999, weight decay 0.01 on every tensor), lr 1e-4 after a linear
10k-step warmup, clip 1.0 (`paella_base_config`).

Conditioning (`paella.cond`): a sequence of condition tokens, LayerNorm without affine, with
classifier-free-guidance dropout per source (the first three on cached codes, the last on COCO):
  - `class`: one token from a class embedding (ours, for digits and CIFAR-10); dropped (the null
    class) with probability `label_drop`;
  - `text`: captions `caption_template.format(class name)` through ByT5's byte ids and a byte-level
    encoder trained with the predictor (`models/byte_text.py`), mapped to the condition width as
    Paella's `byt5_mapper`; dropped (the empty caption, whose ids are just </s>) with probability
    `text_drop` (Paella 0.05). Padding bytes are masked from the predictor's attention (ours: the
    official code attends to the batch's padding, so a caption's condition would depend on the
    longest caption of its batch).
  - `byt5`: the same captions through a pretrained ByT5 encoder read from the local checkpoint
    folder `byt5_path` (`models/t5_checkpoint.py`; frozen, replicated, passed to the loss and
    the sampler as frozen weights; ByT5-XL's 2560-wide `last_hidden_state` is Paella's input),
    with the padding masked in the encoder and the predictor as above.
  - `byt5+clip` (Paella's, `configs/paella_coco256.py`): on COCO captions (`data.source=coco`,
    one item per image-caption pair), the ByT5 states plus CLIP's projected text and image
    embeddings as `clip_seq_len` (4) tokens each (`models/clip.py`, read from `clip_path`),
    dropped with probability `text_drop` / `clip_text_drop` / `clip_image_drop` (0.05 / 0.9 /
    0.9: the empty caption, the empty CLIP caption, the image tokens masked out); the codes are
    encoded each step from the images by the frozen VQGAN (with its BatchNorm statistics), as
    Paella does, and sampling is text to image (no CLIP image).
  Paella draws each dropout once per batch (`np.random.rand() < p` for the whole batch);
  `drop_scope="batch"` keeps that, `"sample"` draws per sample (the usual CFG recipe).

Sampling (`sampling/paella.py`): Paella's 12-step renoise sampler, CFG on logits with weight
`sample.cfg_scale` (Paella: 8 for text), temperature linear 0.7 → 0.3.

Baseline (`paella.noise="mask"`, the comparison's MaskGIT): training masks ⌈cos(π/2·r)·N⌉ random
tokens (r ~ U[0, 1), N = h·w) with an absorbing [MASK] id V (an extra input row of the predictor's
code table), feeds the masked fraction as the noise level, and takes the cross-entropy over the
masked tokens only, averaged over every masked token of the batch (MaskGIT: label smoothing
0.1); sampling is mask-and-freeze with confidence re-masking and choice temperature 4.5. Ours: the
baseline samples with the same CFG on logits as the renoise sampler (MaskGIT's class-conditional
decoder has none), so that the comparison changes only the noise and the sampler.

Shape letters: B batch, h/w the code grid, V codebook size, S condition tokens, T caption bytes.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ardiff_jax import configlib
from ardiff_jax.methods import Method
from ardiff_jax.methods import reconstruction as rec_lib
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.data import clip_bpe
from ardiff_jax.models import byte_text
from ardiff_jax.models import clip as clip_lib
from ardiff_jax.models import clip_checkpoint
from ardiff_jax.models import hf_checkpoint
from ardiff_jax.models import paella_unet
from ardiff_jax.models import t5 as t5_lib
from ardiff_jax.models import t5_checkpoint
from ardiff_jax.sampling import paella as sampler

NOISES = ("uniform", "mask")
CONDS = ("class", "text", "byt5", "byt5+clip")
DROP_SCOPES = ("batch", "sample")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


def paella_config(preset: str = "paella_1b") -> ml_collections.ConfigDict:
  """Defaults of the `paella` config section (Paella v2's recipe unless noted)."""
  p = ml_collections.ConfigDict()
  p.preset = preset
  p.overrides = ml_collections.ConfigDict()   # PaellaUNet fields to change in the preset
  p.tokenizer_workdir = ""        # the VQ tokenizer run whose decoder turns codes into images
  p.noise = "uniform"             # uniform (Paella) | mask (MaskGIT's absorbing noise, the baseline)
  p.t_min = 0.001                 # noise=uniform: t = clip(1 − U + t_min, t_min, 1)
  p.loss_weight_floor = 0.3       # noise=uniform: η, the weight of clean tokens at t = 0
  p.label_smoothing = 0.1
  p.cond = "class"                # class | text | byt5 | byt5+clip (data.source=coco)
  p.label_drop = 0.1              # cond=class: null-class probability (ours; Paella's text: 0.05)
  p.text_drop = 0.05              # cond=text: empty-caption probability (Paella's ByT5 dropout)
  p.drop_scope = "batch"          # batch (Paella: one draw per batch) | sample
  p.caption_template = "a photo of a {}"
  p.class_names = CIFAR10_CLASSES
  p.byt5_path = ""                # cond=byt5: a local Hugging Face ByT5 (or T5) checkpoint folder
  p.clip_path = ""                # cond=byt5+clip: a local Hugging Face CLIP folder (CLIP-H)
  p.clip_text_drop = 0.9          # cond=byt5+clip: CLIP text -> "" (Paella's p)
  p.clip_image_drop = 0.9         # cond=byt5+clip: CLIP image tokens left out (Paella uses them w.p. 0.1)
  p.text_max_bytes = 32           # caption bytes with </s> (longer captions are cut; Paella: 768)
  p.text_width = 128              # the byte-level encoder (models/byte_text.py)
  p.text_depth = 2
  p.text_heads = 4
  p.steps = 12                    # sampler steps
  p.temperature_start = 0.7       # noise=uniform (the mask sampler draws at temperature 1)
  p.temperature_end = 0.3
  p.cfg_steps = -1                # ≥ 0: guidance only in the first cfg_steps steps
  p.t_start = 1.0                 # noise=uniform: the first level (< 1 with init codes: variations)
  p.choice_temperature = 4.5      # noise=mask: MaskGIT's re-masking randomness
  return p


def paella_base_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  """A full Paella config with the paper's optimisation; dataset configs set the tokenizer
  section, the code cache (`data.path`), the steps and the sampling scale."""
  c = configlib.base_config()
  c.method = "paella"
  c.paella = paella_config(preset)
  c.tokenizer = vq_tokenizer.tokenizer_config("paella_f4")
  c.train.batch_size = batch_size
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10000
  c.optim.b1, c.optim.b2 = 0.9, 0.999          # torch AdamW's defaults, as Paella
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = "constant"
  c.sample.use_ema = False                      # Paella keeps no EMA
  c.sample.cfg_scale = 8.0
  c.data.source = "cached"
  return c


# ---------------------------------------------------------------------------------------------
# Noising and the loss, as pure functions.


def sample_levels(rng: jax.Array, batch: int, t_min: float = 0.001) -> jax.Array:
  """Paella's noise levels t = clip(1 − U + t_min, t_min, 1), U ~ U[0, 1). -> float32 [B]."""
  u = jax.random.uniform(rng, (batch,))
  return jnp.clip(1.0 - u + t_min, t_min, 1.0)


def uniform_noise(rng: jax.Array, codes: jax.Array, t: jax.Array, vocab: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Each code [B, h, w] replaced with probability t [B] by a uniform code in [0, V).
  -> (noised codes int32 [B, h, w], replaced positions float32 [B, h, w])."""
  r_codes, r_mask = jax.random.split(rng)
  random_codes = jax.random.randint(r_codes, codes.shape, 0, vocab, jnp.int32)
  noised, replaced = sampler.renoise(r_mask, codes, t, random_codes)
  return noised, replaced.astype(jnp.float32)


def mask_noise(rng: jax.Array, codes: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MaskGIT's training noise: ⌈cos(π/2·r)·N⌉ positions of each grid [B, h, w] (r ~ U[0, 1)),
  chosen uniformly, set to `mask_id`. -> (noised int32 [B, h, w], masked float32 [B, h, w], the
  masked fraction float32 [B], the level the predictor sees)."""
  b, n = codes.shape[0], codes.shape[1] * codes.shape[2]
  r_level, r_pos = jax.random.split(rng)
  count = jnp.ceil(sampler.cosine_mask_ratio(jax.random.uniform(r_level, (b, 1))) * n)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(r_pos, (b, n)), axis=-1), axis=-1)
  masked = (rank < count).reshape(codes.shape)
  return (jnp.where(masked, mask_id, codes).astype(jnp.int32), masked.astype(jnp.float32),
          count[:, 0] / n)


def loss_weights(t: jax.Array, replaced: jax.Array, floor: float = 0.3) -> jax.Array:
  """Paella's `get_loss_weight`: 1 − (1 − m)(1 − t)(1 − η). t [B], m [B, h, w] -> [B, h, w]."""
  return 1.0 - (1.0 - replaced) * ((1.0 - t) * (1.0 - floor))[:, None, None]


def weighted_ce(logits: jax.Array, targets: jax.Array, weights: jax.Array, smoothing: float,
                per_sample: bool = True) -> jax.Array:
  """Label-smoothed cross-entropy ((1 − ε)·onehot + ε/V targets, torch's `label_smoothing`)
  weighted by w: mean_b Σ_hw w·CE / Σ_hw w (`per_sample`, Paella), or Σ w·CE / Σ w over the whole
  batch (MaskGIT: the mean over every masked token). logits [B, h, w, V], targets int [B, h, w],
  weights [B, h, w] -> scalar."""
  vocab = logits.shape[-1]
  soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), smoothing)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), soft)
  if not per_sample:
    return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1e-12)
  per_row = jnp.sum(weights * ce, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1e-12)
  return jnp.mean(per_row)


def drop_flags(rng: jax.Array, batch: int, rate: float, scope: str) -> jax.Array:
  """Which samples lose their condition: bool [B], one draw for the batch (`scope="batch"`, Paella)
  or one per sample."""
  if scope == "batch":
    return jnp.broadcast_to(jax.random.uniform(rng, ()) < rate, (batch,))
  return jax.random.uniform(rng, (batch,)) < rate


def caption_ids(p: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """ByT5 ids of every class's caption, plus the empty caption as row `num_classes` (the
  unconditional input). -> int32 [num_classes + 1, T]."""
  names = tuple(p.class_names)
  if len(names) != num_classes:
    raise ValueError(f"paella.class_names has {len(names)} names but data.num_classes="
                     f"{num_classes}: give one name per class, in label order")
  captions = [p.caption_template.format(name) for name in names] + [""]
  return byte_text.byte_ids(captions, p.text_max_bytes)


# ---------------------------------------------------------------------------------------------
# The method.


def check_paella_config(config: ml_collections.ConfigDict) -> None:
  p = config.paella
  for field, value, valid in (("noise", p.noise, NOISES), ("cond", p.cond, CONDS),
                              ("drop_scope", p.drop_scope, DROP_SCOPES)):
    if value not in valid:
      raise ValueError(f"paella.{field}={value!r}; valid: {valid}")
  for field in ("label_drop", "text_drop", "clip_text_drop", "clip_image_drop"):
    if not 0.0 <= p[field] < 1.0:
      raise ValueError(f"paella.{field}={p[field]} must be in [0, 1)")
  if p.steps < 1:
    raise ValueError(f"paella.steps={p.steps} must be ≥ 1")
  captioned = config.data.source == "coco"
  if captioned and p.cond == "class":
    raise ValueError("data.source='coco' holds captions, not classes: set paella.cond to text, "
                     "byt5 or byt5+clip")
  if p.cond == "byt5+clip" and not captioned:
    raise ValueError("paella.cond='byt5+clip' embeds each training image with CLIP: it needs "
                     "images and captions, data.source='coco' (cached codes hold neither)")
  if (captioned and p.cond == "byt5+clip"
      and os.path.realpath(config.data.clip_tokenizer) != os.path.realpath(p.clip_path)):
    raise ValueError(f"data.clip_tokenizer={config.data.clip_tokenizer!r} must name the CLIP folder "
                     f"paella.clip_path={p.clip_path!r}: its vocabulary tokenizes the captions")
  if captioned and p.cond == "text" and config.data.caption_max_ids > p.text_max_bytes:
    raise ValueError(f"data.caption_max_ids={config.data.caption_max_ids} exceeds the byte "
                     f"encoder's paella.text_max_bytes={p.text_max_bytes}: raise the latter")


def clip_config(path: str) -> dict:
  """The config.json of the local CLIP folder named by `paella.clip_path`."""
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"paella.cond='byt5+clip' reads a local Hugging Face CLIP folder (a CLIPModel: "
                     f"config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt), "
                     f"but paella.clip_path={path!r} holds no config.json; nothing is downloaded")
  return clip_checkpoint.clip_config(path)


def byt5_config(path: str) -> dict:
  """The config.json of the local ByT5 checkpoint folder named by `paella.byt5_path`."""
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"paella.cond='byt5' reads a local Hugging Face ByT5 checkpoint folder "
                     f"(config.json and model.safetensors or pytorch_model.bin), but "
                     f"paella.byt5_path={path!r} holds no config.json; nothing is downloaded")
  return hf_checkpoint.read_config(path, "a local Hugging Face ByT5 checkpoint folder")


def build_model(config: ml_collections.ConfigDict) -> paella_unet.PaellaUNet:
  p = config.paella
  _, _, vocab = vq_tokenizer.code_geometry(config)
  # The configured source alone: a preset's other mappers (paella_1b's ByT5 and CLIP widths)
  # would be created, decayed and never fed.
  text_dim = 0
  if p.cond == "text":
    text_dim = p.text_width
  elif p.cond in ("byt5", "byt5+clip"):
    text_dim = byt5_config(p.byt5_path)["d_model"]
  clip_dim = int(clip_config(p.clip_path).get("projection_dim", 512)) if p.cond == "byt5+clip" else 0
  sources = dict(num_classes=config.data.num_classes if p.cond == "class" else 0,
                 text_dim=text_dim, clip_dim=clip_dim)
  return paella_unet.make_paella_unet(
      p.preset, num_labels=vocab, mask_token=p.noise == "mask",
      dtype=jnp.dtype(config.train.compute_dtype), **{**sources, **configlib.overrides(p)})


def make_method(config: ml_collections.ConfigDict) -> Method:
  check_paella_config(config)
  p = config.paella
  model = build_model(config)
  side, _, vocab = vq_tokenizer.code_geometry(config)
  vq = vq_tokenizer.build_vq(config.tokenizer)
  dtype = jnp.dtype(config.train.compute_dtype)
  null = config.data.num_classes
  captioned = config.data.source == "coco"    # images and their captions, codes encoded here
  text_encoder = (byte_text.ByteTextEncoder(p.text_width, p.text_depth, p.text_heads,
                                            p.text_max_bytes, dtype) if p.cond == "text" else None)
  byt5 = (t5_lib.encoder_from_config(byt5_config(p.byt5_path), dtype)
          if p.cond in ("byt5", "byt5+clip") else None)
  clip = clip_lib.clip_from_config(clip_config(p.clip_path), dtype) if p.cond == "byt5+clip" else None
  text_len = int(config.data.caption_max_ids) if captioned else p.text_max_bytes
  captions = (jnp.asarray(caption_ids(p, null)) if p.cond != "class" and not captioned else None)
  empty_ids = jnp.asarray(byte_text.byte_ids([""], text_len))                    # [1, T]: </s>
  empty_clip = (jnp.asarray(clip_bpe.ClipTokenizer.from_folder(p.clip_path)([""]))
                if clip is not None else None)                                   # [1, 77]
  rates = {"cond": p.label_drop if p.cond == "class" else p.text_drop,
           "clip_text": p.clip_text_drop, "clip_image": p.clip_image_drop}

  def init_params(rng):
    r_model, r_text = jax.random.split(rng)
    x = jnp.zeros((1, side, side), jnp.int32)
    params = {}
    if p.cond == "class":
      c = {"labels": jnp.zeros((1,), jnp.int32)}
    else:
      if text_encoder is not None:
        params["text_encoder"] = text_encoder.init(r_text, empty_ids)["params"]
      c = {"text": jnp.zeros((1, text_len, model.text_dim), jnp.float32)}
    params["predictor"] = model.init(r_model, x, jnp.ones((1,)), c,
                                     method=paella_unet.PaellaUNet.init_all)["params"]
    return params

  def condition_inputs(batch):
    """The batch's condition: {"labels" [B]} (classes, with their captions when cond is a text
    source) or {"ids" [B, T], "clip_ids" [B, 77], "images" [B, H, W, 3]} (coco)."""
    if not captioned:
      return {"labels": batch["label"]}
    inputs = {"ids": batch["caption_ids"]}
    if clip is not None:
      inputs["clip_ids"] = batch["clip_ids"]
      if "image" in batch:
        inputs["images"] = batch["image"]
    return inputs

  def conditions(params, inputs, drop, frozen=None):
    """inputs (`condition_inputs`), drop {"cond", "clip_text", "clip_image": bool [B]}
    -> (condition tokens [B, S, c_cond], key mask [B, S] or None).

    Dropped: the null class, the empty caption (ByT5 / byte encoder and CLIP text alike), no
    CLIP image tokens (masked out of the attention, as Paella leaves them out)."""
    embed = lambda **kw: model.apply({"params": params["predictor"]}, **kw,
                                     method=paella_unet.PaellaUNet.embed_conditions)
    if p.cond == "class":
      return embed(labels=jnp.where(drop["cond"], null, inputs["labels"])), None
    ids = inputs["ids"] if captioned else captions[inputs["labels"]]
    ids = jnp.where(drop["cond"][:, None], empty_ids, ids)
    if byt5 is not None:
      h = byt5.apply({"params": frozen["text_encoder"]}, ids, ids != byte_text.PAD_ID)
    else:
      h = text_encoder.apply({"params": params["text_encoder"]}, ids)
    masks = [ids != byte_text.PAD_ID]
    if clip is None:
      return embed(text=h), masks[0]
    b = ids.shape[0]
    clip_ids = jnp.where(drop["clip_text"][:, None], empty_clip, inputs["clip_ids"])
    clip_text = clip.apply({"params": frozen["clip"]}, clip_ids, method=clip_lib.CLIP.text)
    if "images" in inputs:
      pixels = clip_lib.clip_pixels(inputs["images"], clip.image_tower.image_size)
      clip_image = clip.apply({"params": frozen["clip"]}, pixels, method=clip_lib.CLIP.image)
      image_keep = ~drop["clip_image"]
    else:                     # text to image: no CLIP image, as Paella's sampler
      clip_image = jnp.zeros_like(clip_text)
      image_keep = jnp.zeros((b,), bool)
    seq = model.clip_seq_len
    masks += [jnp.ones((b, seq), bool), jnp.broadcast_to(image_keep[:, None], (b, seq))]
    return (embed(text=h, clip_text=clip_text, clip_image=clip_image),
            jnp.concatenate(masks, axis=1))

  def draw_drops(rng, b):
    """{source: bool [B]}: the condition's flags from `rng` itself (the stream of the runs before
    CLIP), the CLIP sources' from keys folded from it."""
    return {name: drop_flags(rng if i == 0 else jax.random.fold_in(rng, i), b, rate, p.drop_scope)
            for i, (name, rate) in enumerate(rates.items())}

  def vq_encode(frozen, images):
    """Images [B, H, W, 3] in [-1, 1] -> codes int32 [B, h, w] with the frozen tokenizer (and
    its BatchNorm running statistics), as Paella encodes every batch."""
    variables = {"params": frozen["vq"]}
    if vq_tokenizer.BATCH_STATS_KEY in frozen:
      variables["batch_stats"] = frozen[vq_tokenizer.BATCH_STATS_KEY]
    return vq.apply(variables, images.astype(jnp.float32), method=vq.encode_codes).astype(jnp.int32)

  def loss_fn(params, batch, rng, step, extras, frozen=None):
    del step
    r_level, r_noise, r_drop, r_dropout = jax.random.split(rng, 4)
    codes = vq_encode(frozen, batch["image"]) if captioned else batch["codes"].astype(jnp.int32)
    b = codes.shape[0]
    if p.noise == "uniform":
      t = sample_levels(r_level, b, p.t_min)
      noised, replaced = uniform_noise(r_noise, codes, t, vocab)
      weights = loss_weights(t, replaced, p.loss_weight_floor)
    else:
      noised, replaced, t = mask_noise(r_noise, codes, vocab)
      weights = replaced
    c, c_mask = conditions(params, condition_inputs(batch), draw_drops(r_drop, b), frozen)
    logits = model.apply({"params": params["predictor"]}, noised, t, c, c_mask,
                         deterministic=False, rngs={"dropout": r_dropout})
    loss = weighted_ce(logits, codes, weights, p.label_smoothing, per_sample=p.noise == "uniform")
    accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
    return loss, {"code_accuracy": accuracy, "noised_fraction": jnp.mean(replaced)}, extras

  def sample_codes(params, inputs, rng, init_x=None, keep=None, frozen=None):
    """inputs (`condition_inputs`: labels [B], or coco's caption ids) -> codes int32 [B, h, w]
    (with `init_x`/`keep`: variations, inpainting)."""
    b = next(iter(inputs.values())).shape[0]
    cfg = float(config.sample.cfg_scale)
    guided = cfg != 1.0
    both = jax.tree.map(lambda v: jnp.concatenate([v, v]), inputs) if guided else inputs
    dropped = jnp.arange(2 * b if guided else b) >= b
    c, c_mask = conditions(params, both, {name: dropped for name in rates}, frozen)

    def logits_fn(x, t, w):
      if guided:
        x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
      logits = model.apply({"params": params["predictor"]}, x, t, c, c_mask).astype(jnp.float32)
      if not guided:
        return logits
      cond, uncond = logits[:b], logits[b:]
      return uncond + w * (cond - uncond)

    shape = (b, side, side)
    cfg_steps = None if p.cfg_steps < 0 else int(p.cfg_steps)
    if p.noise == "mask":
      if init_x is not None or keep is not None:
        raise ValueError("init_x and keep (variations, inpainting) need the renoise sampler: "
                         "paella.noise='uniform'")
      return sampler.sample_mask_freeze(logits_fn, rng, shape, vocab, steps=int(p.steps),
                                        choice_temperature=float(p.choice_temperature),
                                        cfg=(cfg, cfg), cfg_steps=cfg_steps)
    return sampler.sample_renoise(
        logits_fn, rng, shape, vocab, steps=int(p.steps),
        temperature=(float(p.temperature_start), float(p.temperature_end)), cfg=(cfg, cfg),
        cfg_steps=cfg_steps, t_start=float(p.t_start), init_x=init_x, keep=keep)

  def decode(frozen, codes):
    images = vq.apply({"params": frozen["vq"]}, codes, method=vq.decode_codes)
    return rec_lib.to_uint8(jnp.clip(images, -1, 1))

  def generate(params, frozen, batch, rng):
    """Class-conditional samples (labels [B]), or text to image from coco's captions
    (caption ids, no CLIP image) -> uint8 images [B, H, W, 3]."""
    if captioned and "caption_ids" not in batch:
      raise ValueError("Paella on captions generates from the captions of the eval split: "
                       "`--mode sample` draws them; the FID evaluation of captioned data "
                       "(COCO-30k) is not wired yet")
    inputs = condition_inputs({k: v for k, v in batch.items() if k != "image"})
    return decode(frozen, sample_codes(params, inputs, rng, frozen=frozen))

  def visualize(params, batch, rng, frozen=None):
    """Coco (`--mode sample`): each real image next to a sample from its caption."""
    fake = generate(params, frozen, batch, rng)
    real = rec_lib.to_uint8(batch["image"].astype(jnp.float32))
    pairs = jnp.stack([real, fake], axis=1).reshape((-1,) + fake.shape[1:])
    return {"images": pairs, "labels": jnp.repeat(batch["label"], 2), "grid_columns": 8}

  def load_frozen(restore_run_params):
    """{"vq": the tokenizer run's weights (its decoder draws the images; on captioned data its
    encoder, with "vq_batch_stats", makes the codes), "text_encoder": a pretrained ByT5's,
    "clip": a pretrained CLIP's}, each present when used."""
    if not p.tokenizer_workdir:
      raise ValueError("paella.tokenizer_workdir is empty: point it at the VQ tokenizer run "
                       "(configs/paella_vq_*.py) whose decoder turns codes into images")
    if captioned:   # no code cache to check: compare the tokenizer the run was trained as
      trained = configlib.load_run_config(p.tokenizer_workdir).get("tokenizer", {})
      shapes = lambda tcfg: jax.tree.map(np.shape, jax.eval_shape(
          vq_tokenizer.build_vq(tcfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
      if shapes(trained) != shapes(config.tokenizer):
        raise ValueError(
            f"paella.tokenizer_workdir={p.tokenizer_workdir!r} was trained as tokenizer "
            f"{trained.get('preset')!r} with overrides {dict(trained.get('overrides', {}))}, "
            f"whose weights differ from this config's ({config.tokenizer.preset!r}, "
            f"{configlib.overrides(config.tokenizer)}): set tokenizer.preset and "
            "tokenizer.overrides to the run's")
    run = restore_run_params(p.tokenizer_workdir)
    if "vq" not in run:
      raise ValueError(f"paella.tokenizer_workdir={p.tokenizer_workdir!r} is not a VQ tokenizer run "
                       f"(configs/paella_vq_*.py): its parameters hold {sorted(run)}, not 'vq'")
    frozen = {"vq": run["vq"]}
    if captioned and vq_tokenizer.BATCH_STATS_KEY in run:
      frozen[vq_tokenizer.BATCH_STATS_KEY] = run[vq_tokenizer.BATCH_STATS_KEY]
    if byt5 is not None:
      frozen["text_encoder"] = t5_checkpoint.load_hf_t5_encoder(p.byt5_path)[1]
    if clip is not None:
      frozen["clip"] = clip_checkpoint.load_hf_clip(p.clip_path)[1]
    return frozen

  def init_frozen(rng):
    r_vq, r_text, r_clip = jax.random.split(rng, 3)
    size = config.data.image_size
    variables = nn.meta.unbox(vq.init(r_vq, jnp.zeros((1, size, size, 3))))
    frozen = {"vq": variables["params"]}
    if captioned and "batch_stats" in variables:
      frozen[vq_tokenizer.BATCH_STATS_KEY] = variables["batch_stats"]
    if byt5 is not None:
      frozen["text_encoder"] = nn.meta.unbox(byt5.init(r_text, empty_ids)["params"])
    if clip is not None:
      frozen["clip"] = nn.meta.unbox(clip.init(r_clip, *clip.init_inputs())["params"])
    return frozen

  if captioned:
    batch_keys = ("image", "caption_ids") + (("clip_ids",) if clip is not None else ())
    check_batch = None
  else:
    batch_keys = ("codes", "label")
    check_batch = lambda batch: vq_tokenizer.check_code_batch(batch, side, vocab, config,
                                                              "paella.tokenizer_workdir")
  return Method(name="paella", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=batch_keys, generate=generate,
                generate_from="images" if captioned else "labels",
                visualize=visualize if captioned else None,
                load_frozen=load_frozen, init_frozen=init_frozen,
                loss_reads_frozen=captioned or byt5 is not None, check_batch=check_batch,
                decay_mask=lambda params: jax.tree.map(lambda _: True, params))
