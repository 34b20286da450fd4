"""LlamaGen's class-conditional GPT over VQ codes (Sun et al. 2024; reference/llamagen_star.md §1.2–1.4).

For cached codes x [B, h, w] of a VQ tokenizer run, flattened in raster order to x_1 … x_L:
  labels  = the class, replaced by the null class (row num_classes) with probability label_drop
  z       = GPT([cls, x_1 … x_{L−1}])           (token-embedding, residual and FFN dropout 0.1)
  L       = mean_i CE(softmax(W_out z_i), x_i)   (W_out bias-free, zero-initialised)
Optimisation (LlamaGen `train_c2i.py`): AdamW(0.9, 0.95), weight decay 0.05 on ≥ 2-D tensors,
global-norm clip 1.0, constant lr 1e-4·B/256 without warmup, EMA optional (off: samples from the
raw weights). Sampling: `sampling/llamagen.py` (KV cache, CFG in logit space, top-k / top-p).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ardiff_jax import configlib
from ardiff_jax.methods import Method, frozen_run_loader
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.models import layers
from ardiff_jax.sampling.llamagen import sample_codes


def llamagen_config(preset: str = "gpt_b") -> ml_collections.ConfigDict:
  """Defaults of the `llamagen` config section (LlamaGen's c2i recipe)."""
  g = ml_collections.ConfigDict()
  g.preset = preset
  g.overrides = ml_collections.ConfigDict()   # GPT fields to change in the preset (e.g. dropout)
  g.label_drop = 0.1
  g.tokenizer_workdir = ""        # the VQ tokenizer run whose decoder turns codes into images
  g.cfg_interval = -1             # ≥ 0: decode steps after this index run without guidance
  g.temperature = 1.0
  g.top_k = 0                     # 0: all codes
  g.top_p = 1.0
  g.remat = "none"                # transformer blocks: models.layers.REMAT_POLICIES
  g.scan_layers = False
  return g


def llamagen_base_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  """A full LlamaGen config with the paper's optimisation; dataset configs set the VQ tokenizer
  section (`tokenizer`), the code cache (`data.path`), the steps and the sampling scale."""
  c = configlib.base_config()
  c.method = "llamagen"
  c.llamagen = llamagen_config(preset)
  c.tokenizer = vq_tokenizer.tokenizer_config("vq16")
  c.train.batch_size = batch_size
  c.train.ema_decay = 0.9999
  c.sample.use_ema = False
  c.optim.lr = 1e-4 * batch_size / 256
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = "constant"
  c.data.source = "cached"
  return c


def build_model(config: ml_collections.ConfigDict) -> gpt_lib.GPT:
  g = config.llamagen
  _, seq_len, vocab = vq_tokenizer.code_geometry(config)
  return gpt_lib.make_gpt(g.preset, token_dim=0, seq_len=seq_len, vocab_size=vocab,
                          num_classes=config.data.num_classes, remat=g.remat,
                          scan_layers=g.scan_layers, dtype=jnp.dtype(config.train.compute_dtype),
                          **configlib.overrides(g))


def code_loss(model: gpt_lib.GPT, params, inputs: jax.Array, codes: jax.Array, labels: jax.Array,
              r_dropout: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced next-code cross-entropy: inputs (codes [B, L], or their codebook vectors
  [B, L, C] for a `GPT.input_dim` model), targets codes [B, L], labels [B] -> (mean loss, code
  accuracy)."""
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  z = apply(inputs, labels, deterministic=False, rngs={"dropout": r_dropout})
  logits = apply(z, method=gpt_lib.GPT.logits)                             # [B, L, V]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == codes)


def make_method(config: ml_collections.ConfigDict) -> Method:
  g = config.llamagen
  model = build_model(config)
  side, seq_len, vocab = vq_tokenizer.code_geometry(config)
  vq = vq_tokenizer.build_vq(config.tokenizer)
  null = config.data.num_classes

  def init_params(rng):
    return model.init(rng, method=gpt_lib.GPT.init_all)["params"]

  def loss_fn(params, batch, rng, step, extras):
    del step
    r_drop, r_dropout = jax.random.split(rng)
    codes = batch["codes"].reshape(-1, seq_len)
    drop = jax.random.uniform(r_drop, codes.shape[:1]) < g.label_drop
    labels = jnp.where(drop, null, batch["label"])
    loss, accuracy = code_loss(model, params, codes, codes, labels, r_dropout)
    return loss, {"code_accuracy": accuracy}, extras

  def generate_codes(params, frozen, batch, rng):
    """labels [B] -> codes int32 [B, L] (LlamaGen's sampler, the config's settings)."""
    del frozen
    return sample_codes(model, params, batch["label"], rng, cfg_scale=float(config.sample.cfg_scale),
                        cfg_interval=int(g.cfg_interval), temperature=float(g.temperature),
                        top_k=int(g.top_k), top_p=float(g.top_p))

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3]."""
    codes = generate_codes(params, frozen, batch, rng)
    return vq_tokenizer.codes_to_images(vq, frozen, codes, side)

  def init_frozen(rng):
    size = config.data.image_size
    return vq_tokenizer.init_vq_params(vq, rng, size)

  def probe_features(params, codes, layer):
    """codes [B, L] -> [B, L, D]: block `layer`'s output (0: half the depth, ST-AR's layer 6 of
    12), teacher-forced with the null class, so no label reaches the features (ST-AR §3.2)."""
    labels = jnp.full(codes.shape[:1], null, jnp.int32)
    trunk = model
    if model.scan_layers:   # a scanned checkpoint is read block by block
      trunk, params = model.clone(scan_layers=False), layers.unstack_layers(params, "layers")
    states = trunk.apply({"params": params}, codes, labels,
                         capture=layer or gpt_lib.middle_block(model.depth),
                         method=gpt_lib.GPT.hidden_states)
    return states["mid"]

  return Method(name="llamagen", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("codes", "label"), generate=generate, generate_from="labels",
                load_frozen=frozen_run_loader(g.tokenizer_workdir, "vq", "llamagen.tokenizer_workdir",
                                              "VQ tokenizer (configs/vq_*.py)"),
                init_frozen=init_frozen,
                check_batch=lambda batch: vq_tokenizer.check_code_batch(batch, side, vocab, config,
                                                           "llamagen.tokenizer_workdir"),
                probe_features=probe_features, generate_tokens=generate_codes)
