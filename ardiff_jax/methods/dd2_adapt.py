"""DD2's teacher adaptation (reference/dd2_paella.md §1.5, App. E.4): a LlamaGen teacher that reads
continuous codebook vectors, so that it can condition on a one-step generator's continuous tokens.

From a trained LlamaGen run (`dd2.teacher_workdir`) and its VQ tokenizer run:
  1. warm start: every teacher weight is copied except the code table E [V, D], which an MLP over
     codebook vectors replaces (`GPT.input_dim`, `models/gpt.py`'s `tok_mlp`); the MLP is fitted by
     L2 to the table, min mean_j ‖MLP(c_j) − E_j‖², full batch over all V entries, Adam
     (`dd2.fit_steps` at `dd2.fit_lr`; `fit_token_mlp`), before the first training step;
  2. training: LlamaGen's teacher-forced cross-entropy with each input code fed as its codebook
     vector c_j (the VQ's lookup table: l2-normalised for LlamaGen's tokenizer), every weight
     trained (DD2: 200k iterations for LlamaGen-L).
Sampling is LlamaGen's (KV cache, CFG, top-k / top-p) with each drawn code fed back as its vector.
Paper-silent choices, ours: the MLP's shape (Linear C→D, SiLU, Linear D→D), the fit's optimiser
and length, and the CPU configs' learning rate (`configs/dd2_adapt_digits.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ardiff_jax.methods import Method, frozen_run_loader, restore_checked_run
from ardiff_jax.methods import llamagen
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.sampling.llamagen import sample_codes


def dd2_adapt_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.teacher_workdir = ""          # the LlamaGen run (configs/llamagen_*.py) to adapt
  d.fit_steps = 2000              # Adam steps of the MLP's L2 fit to the code table (full batch)
  d.fit_lr = 1e-3
  return d


def fit_token_mlp(mlp: gpt_lib.TokenMLP, params, vectors: jax.Array, table: jax.Array,
                  steps: int, lr: float) -> tuple[dict, float]:
  """Adam on mean_j ‖MLP(c_j) − E_j‖² over all rows: vectors [V, C], table [V, D] -> (fitted
  params, relative error ‖MLP(c) − E‖ / ‖E‖)."""
  tx = optax.adam(lr)
  vectors, table = jnp.asarray(vectors, jnp.float32), jnp.asarray(table, jnp.float32)
  loss = lambda p: jnp.mean(jnp.square(mlp.apply({"params": p}, vectors) - table))

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, opt = carry
      grads = jax.grad(loss)(p)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    err = jnp.sqrt(jnp.sum(jnp.square(mlp.apply({"params": p}, vectors) - table))
                   / jnp.sum(jnp.square(table)))
    return p, err

  fitted, err = fit(jax.tree.map(jnp.asarray, params))
  return jax.device_get(fitted), float(err)


def build_model(config: ml_collections.ConfigDict) -> gpt_lib.GPT:
  """The teacher's GPT (its `llamagen` section) reading codebook vectors of the VQ's width."""
  vq = vq_tokenizer.build_vq(config.tokenizer)
  return llamagen.build_model(config).clone(input_dim=vq.embed_dim)


def make_method(config: ml_collections.ConfigDict) -> Method:
  g, d = config.llamagen, config.dd2
  model = build_model(config)
  side, seq_len, vocab = vq_tokenizer.code_geometry(config)
  vq = vq_tokenizer.build_vq(config.tokenizer)
  null = config.data.num_classes

  def vectors(vq_params):
    """The VQ's lookup table [V, C]: what the decoder reads for each code."""
    return vq_tokenizer.code_vectors(vq, vq_params)

  def init_params(rng):
    return model.init(rng, method=gpt_lib.GPT.init_all)["params"]

  def warm_start(fresh, restore_run_params):
    teacher = restore_checked_run(restore_run_params, d.teacher_workdir, "dd2.teacher_workdir",
                                  "a LlamaGen run over codes (configs/llamagen_*.py) to adapt",
                                  has=("tok_embeddings",), lacks=("tok_mlp",))
    mismatch = sorted(k for k in set(fresh) ^ set(teacher) if k not in ("tok_mlp", "tok_embeddings"))
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    if mismatch or any(shapes(teacher[k]) != shapes(fresh[k]) for k in fresh if k != "tok_mlp"):
      raise ValueError(f"dd2.teacher_workdir={d.teacher_workdir!r} does not match this config's "
                       f"llamagen section (preset {g.preset!r}, {seq_len} codes of {vocab}; "
                       f"differing parts: {mismatch or 'shapes'}): build this config with the "
                       "teacher's arguments")
    book = vectors(restore_run_params(g.tokenizer_workdir)["vq"])
    table = teacher["tok_embeddings"]["embedding"]
    mlp, err = fit_token_mlp(gpt_lib.TokenMLP(model.width), fresh["tok_mlp"], book, table,
                             int(d.fit_steps), float(d.fit_lr))
    logging.info("dd2_adapt: token MLP fitted to the teacher's %d-row code table, relative L2 "
                 "error %.4f after %d steps", vocab, err, d.fit_steps)
    params = {k: v for k, v in teacher.items() if k != "tok_embeddings"}
    params["tok_mlp"] = mlp
    return params

  def loss_fn(params, batch, rng, step, extras, frozen=None):
    del step
    r_drop, r_dropout = jax.random.split(rng)
    codes = batch["codes"].reshape(-1, seq_len)
    drop = jax.random.uniform(r_drop, codes.shape[:1]) < g.label_drop
    labels = jnp.where(drop, null, batch["label"])
    inputs = vectors(frozen)[codes]                                          # [B, L, C]
    loss, accuracy = llamagen.code_loss(model, params, inputs, codes, labels, r_dropout)
    return loss, {"code_accuracy": accuracy}, extras

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3]."""
    codes = sample_codes(model, params, batch["label"], rng, cfg_scale=float(config.sample.cfg_scale),
                         cfg_interval=int(g.cfg_interval), temperature=float(g.temperature),
                         top_k=int(g.top_k), top_p=float(g.top_p), token_table=vectors(frozen))
    return vq_tokenizer.codes_to_images(vq, frozen, codes, side)

  def init_frozen(rng):
    size = config.data.image_size
    return vq_tokenizer.init_vq_params(vq, rng, size)

  return Method(name="dd2_adapt", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("codes", "label"), generate=generate, generate_from="labels",
                load_frozen=frozen_run_loader(g.tokenizer_workdir, "vq", "llamagen.tokenizer_workdir",
                                              "VQ tokenizer (configs/vq_*.py)"),
                init_frozen=init_frozen, loss_reads_frozen=True, warm_start=warm_start,
                check_batch=lambda batch: vq_tokenizer.check_code_batch(
                    batch, side, vocab, config, "llamagen.tokenizer_workdir"))
