"""ST-AR: self-guided training of LlamaGen (Yue et al., NeurIPS 2025; reference/llamagen_star.md §2).

Sampling is LlamaGen's, unchanged (`methods/llamagen.py`, from params["gpt"]); training adds three
self-supervised terms. For a batch of B images, each with M = 2 distinct cached views (`data.views`),
the student GPT (masked attention, dropout) and an EMA teacher (same architecture, unmasked, no
dropout, no gradient, in the train state's extras) read the same codes and labels:

  L_AR   = CE of the masked student's next-code logits, over both views
  L_MIM  = mean over positions of 1 − cos(h_s, sg(h_t)), h the last block's output
  L_step = InfoNCE: anchor the projected student feature at (b, m, i), positive the teacher's
           at (b, m, j ≠ i)
  L_view = InfoNCE: anchor (b, m, i), positive the teacher's at (b, m' ≠ m, i)
  L      = L_AR + α·L_MIM + β·½(L_step + L_view)            α = 1.0, β = 0.5

Attention masking (§3.3.1): for each sequence a fraction r = 0.25 of the image-token key slots
gets −inf on the attention logits on top of the causal mask, student only. The class slot is
never masked, so no query row is ever empty.
Contrastive features (§3.3.2): the output of the middle block (6 of 12 for GPT-B) at K = 4
positions per image drawn without replacement from 1..L−1 and shared by both views (position 0
reads only the class token, so its state is the same for every image of a class: never drawn); the student's go through a
projector f (SimSiam's MLP: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN without affine; output width
= model width) trained with the model and dropped at sampling. Anchors and keys are l2-normalised;
τ = 0.2 (MoCo v3, which the paper cites; the paper gives none). Negatives are the teacher features of
every *other image* of the global batch, all views and positions (under jit the batch is one global
array, so with data parallelism the keys are gathered across devices); the same image's keys that
are not the positive are left out of the denominator. Each positive gives one term
−log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ_neg e^{s⁻/τ})), averaged over the anchor's positives, then anchors.

Choices where the paper is silent, each a config field (`st_ar` section):
  mask_scope "sample": one key mask per sequence for every layer and head (the simplest reading;
    "layer" draws a fresh one per block); the masked count is round(r·(L − 1)) exactly.
  mim_features "prenorm": the last block's output before the final RMSNorm ("postnorm": after it).
  contrastive_layer 0: the middle block, depth // 2 (the paper prints 18 for GPT-L, whose half is 12: set it).
  contrastive_half True: the ½ in β·½(L_step + L_view) (the equation itself is lost).
  teacher_decay 0.9999; the teacher is updated inside the loss from the weights the step starts
    from, so after n steps it is the EMA of θ_0 … θ_{n−1} (one update behind an EMA of the
    post-update weights), and it starts equal to the student (`Method.extras_from_params`).
  The engine's own EMA of all parameters (`train.ema_decay`, read when `sample.use_ema`) is kept
    as for LlamaGen, apart from the teacher: one more copy of the weights in memory.
  With `train.grad_accum_steps` > 1 the negatives and the projector's BatchNorm statistics come
    from each micro-batch, not the whole batch.
  use_mim / use_step / use_view: the loss ablation (Table 3); use_mim=False also drops the mask,
    so with all three off the step is LlamaGen's on two views.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ardiff_jax.methods import Method, llamagen, vq_tokenizer
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.models import vit

MASK_SCOPES = ("sample", "layer")
MIM_FEATURES = ("prenorm", "postnorm")


def st_ar_config() -> ml_collections.ConfigDict:
  """Defaults of the `st_ar` config section (the paper's, §2.3 of the reference)."""
  s = ml_collections.ConfigDict()
  s.mask_ratio = 0.25             # r: fraction of image-token key slots masked (0.35: best FID)
  s.mask_scope = "sample"         # one mask per sequence shared by all layers and heads | "layer"
  s.mim_weight = 1.0              # α
  s.mim_features = "prenorm"      # the last block's output before | after the final RMSNorm
  s.contrastive_weight = 0.5      # β
  s.contrastive_half = True       # β·½(L_step + L_view) rather than β·(L_step + L_view)
  s.contrastive_layer = 0         # block whose output the contrastive terms read; 0: the middle
  s.num_positions = 4             # K positions per image, shared by both views
  s.temperature = 0.2             # τ (MoCo v3)
  s.projector_layers = 3          # SimSiam projector depth
  s.projector_hidden = 2048       # its hidden width (output width = model width)
  s.teacher_decay = 0.9999
  s.use_mim = True
  s.use_step = True
  s.use_view = True
  return s


def sample_key_mask(rng: jax.Array, shape: tuple[int, ...], seq_len: int, ratio: float) -> jax.Array:
  """bool [*shape, L], True = may be attended to: slot 0 (the class token) always; of the L − 1
  image-token slots exactly round(ratio·(L − 1)), chosen uniformly per row, are False."""
  num_masked = int(round(ratio * (seq_len - 1)))
  scores = jax.random.uniform(rng, shape + (seq_len - 1,))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  keep = ranks >= num_masked
  return jnp.concatenate([jnp.ones(shape + (1,), bool), keep], axis=-1)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 − cos(a, b) over the last axis, float32 [...]."""
  return 1.0 - jnp.sum(_l2_normalize(a) * _l2_normalize(b), -1)


def contrastive_losses(anchors: jax.Array, keys: jax.Array, temperature: float
                       ) -> tuple[jax.Array, jax.Array]:
  """(L_step, L_view) from anchors (projected student) and keys (teacher), both [B, M, K, D].

  Anchor a = (b, m, i). Positives: step (b, m, j ≠ i), view (b, m' ≠ m, i). Negatives: every key
  of another image b' ≠ b. Per positive p: −s_ap + log(e^{s_ap} + Σ_neg e^{s_an}) with
  s = cos/τ; averaged over the anchor's positives, then over anchors. Needs K ≥ 2 (step),
  M ≥ 2 (view) and B ≥ 2 (negatives)."""
  b, m, k, _ = anchors.shape
  q = _l2_normalize(anchors).reshape(b * m * k, -1)
  t = _l2_normalize(keys).reshape(b * m * k, -1)
  logits = q @ t.T / temperature                                          # [N, N]
  img, view, pos = (x.reshape(-1) for x in np.meshgrid(np.arange(b), np.arange(m), np.arange(k),
                                                       indexing="ij"))
  same_img = img[:, None] == img[None, :]
  same_view, same_pos = view[:, None] == view[None, :], pos[:, None] == pos[None, :]
  neg_lse = jax.nn.logsumexp(jnp.where(~same_img, logits, -jnp.inf), axis=-1, keepdims=True)
  per_pair = jnp.logaddexp(logits, neg_lse) - logits

  def average(positive):
    weights = positive / positive.sum(-1, keepdims=True)
    return jnp.mean(jnp.sum(jnp.where(positive, per_pair, 0.0) * weights, -1))

  return average(same_img & same_view & ~same_pos), average(same_img & ~same_view & same_pos)


def _batch_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """x [N, F] standardised with the batch's statistics (the projector only ever trains)."""
  mean = jnp.mean(x, 0, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, 0, keepdims=True) + eps)


class Projector(nn.Module):
  """SimSiam's projection MLP: [Linear → BN → ReLU] × (layers − 1), Linear → BN (no affine).
  x [N, D] -> [N, out]. BN uses the batch's statistics (over the global batch under jit)."""
  hidden: int
  out: int
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i in range(self.layers):
      last = i == self.layers - 1
      x = vit.dense(self.out if last else self.hidden, ("embed", "mlp") if i == 0 else
                    ("mlp", "embed") if last else ("mlp", "mlp"), f"linear_{i}", jnp.float32,
                    use_bias=not last)(x)
      x = _batch_norm(x)
      if not last:
        width = x.shape[-1]
        scale = self.param(f"bn_{i}_scale", nn.with_logical_partitioning(
            nn.initializers.ones_init(), ("mlp",)), (width,))
        bias = self.param(f"bn_{i}_bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp",)), (width,))
        x = nn.relu(x * scale + bias)
    return x


def check_settings(s: ml_collections.ConfigDict, depth: int, seq_len: int) -> int:
  """Validates the `st_ar` section against the model; returns the contrastive layer (1-based)."""
  if s.mask_scope not in MASK_SCOPES:
    raise ValueError(f"st_ar.mask_scope={s.mask_scope!r}: expected one of {MASK_SCOPES}")
  if s.mim_features not in MIM_FEATURES:
    raise ValueError(f"st_ar.mim_features={s.mim_features!r}: expected one of {MIM_FEATURES}")
  if not 0.0 <= s.mask_ratio < 1.0:
    raise ValueError(f"st_ar.mask_ratio={s.mask_ratio} must be in [0, 1)")
  if not 2 <= s.num_positions <= seq_len - 1:
    raise ValueError(f"st_ar.num_positions={s.num_positions} must be in [2, {seq_len - 1}] "
                     f"(image-token positions 1..{seq_len - 1} of the {seq_len}-token sequences)")
  if s.temperature <= 0:
    raise ValueError(f"st_ar.temperature={s.temperature} must be > 0")
  if not 0.0 <= s.teacher_decay <= 1.0:
    raise ValueError(f"st_ar.teacher_decay={s.teacher_decay} must be in [0, 1]")
  if s.projector_layers < 1:
    raise ValueError(f"st_ar.projector_layers={s.projector_layers} must be ≥ 1")
  layer = s.contrastive_layer or gpt_lib.middle_block(depth)
  if not 1 <= layer <= depth:
    raise ValueError(f"st_ar.contrastive_layer={s.contrastive_layer}: the model has blocks "
                     f"1..{depth} (0 picks the middle one)")
  return layer


def make_method(config: ml_collections.ConfigDict) -> Method:
  s = config.st_ar
  base = llamagen.make_method(config)
  model: gpt_lib.GPT = base.model
  if model.scan_layers:
    raise ValueError("method=st_ar reads intermediate blocks and masks attention per block: set "
                     "llamagen.scan_layers=False")
  micro = config.train.batch_size // max(int(config.train.grad_accum_steps), 1)
  if micro < 2:
    raise ValueError("method=st_ar's contrastive negatives are the other images of the (micro-)"
                     f"batch: train.batch_size / train.grad_accum_steps = {micro} must be ≥ 2")
  views = int(config.data.views)
  if views != 2:
    raise ValueError(f"method=st_ar trains on two views per image: set data.views=2 (got {views})")
  side, seq_len, _ = vq_tokenizer.code_geometry(config)
  layer = check_settings(s, model.depth, seq_len)
  projector = Projector(hidden=int(s.projector_hidden), out=model.width,
                        layers=int(s.projector_layers))
  null = config.data.num_classes
  contrastive = s.use_step or s.use_view
  half = 0.5 if s.contrastive_half else 1.0

  def init_params(rng):
    r_gpt, r_proj = jax.random.split(rng)
    return {"gpt": base.init_params(r_gpt),
            "projector": projector.init(r_proj, jnp.zeros((2, model.width)))["params"]}

  def states(params, codes, labels, key_mask, deterministic, rng=None):
    return model.apply({"params": params}, codes, labels, deterministic=deterministic,
                       key_mask=key_mask, capture=layer, method=gpt_lib.GPT.hidden_states,
                       rngs=None if rng is None else {"dropout": rng})

  def loss_fn(params, batch, rng, step, extras):
    del step
    r_drop, r_mask, r_dropout, r_pos = jax.random.split(rng, 4)
    codes = batch["codes"]                                      # [B, M, h, w]
    b, m = codes.shape[:2]
    codes = codes.reshape(b * m, seq_len)
    drop = jax.random.uniform(r_drop, (b,)) < config.llamagen.label_drop
    labels = jnp.repeat(jnp.where(drop, null, batch["label"]), m)   # one label draw per image
    key_mask = None
    if s.use_mim and s.mask_ratio > 0:
      shape = (model.depth, b * m) if s.mask_scope == "layer" else (b * m,)
      key_mask = sample_key_mask(r_mask, shape, seq_len, s.mask_ratio)
    student = states(params["gpt"], codes, labels, key_mask, False, r_dropout)
    teacher = jax.lax.stop_gradient(states(extras["teacher"]["gpt"], codes, labels, None, True))
    logits = model.apply({"params": params["gpt"]}, student["z"], method=gpt_lib.GPT.logits)
    l_ar = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
    loss = l_ar
    metrics = {"loss_ar": l_ar, "code_accuracy": jnp.mean(jnp.argmax(logits, -1) == codes)}
    if s.use_mim:
      key = "last" if s.mim_features == "prenorm" else "z"
      l_mim = cosine_distance(student[key], teacher[key]).mean()
      loss += s.mim_weight * l_mim
      metrics["loss_mim"] = l_mim
    if contrastive:
      pick = jax.vmap(lambda r: 1 + jax.random.choice(r, seq_len - 1, (s.num_positions,),
                                                      replace=False))
      idx = pick(jax.random.split(r_pos, b))                          # [B, K] in 1..L−1
      gather = lambda h: jnp.take_along_axis(h.reshape(b, m, seq_len, -1),
                                             idx[:, None, :, None], axis=2)   # [B, M, K, D]
      mid_s, mid_t = gather(student["mid"]), gather(teacher["mid"])
      anchors = projector.apply({"params": params["projector"]},
                                mid_s.reshape(-1, model.width)).reshape(mid_s.shape)
      l_step, l_view = contrastive_losses(anchors, mid_t, s.temperature)
      terms = (l_step if s.use_step else 0.0) + (l_view if s.use_view else 0.0)
      loss += s.contrastive_weight * half * terms
      metrics.update(loss_step=l_step, loss_view=l_view)
    decay = s.teacher_decay
    new_teacher = jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * jax.lax.stop_gradient(p),
                               extras["teacher"]["gpt"], params["gpt"])
    return loss, metrics, {**extras, "teacher": {"gpt": new_teacher}}

  def check_batch(batch):
    codes = np.asarray(batch["codes"])
    if codes.ndim != 4 or codes.shape[1] != 2:
      raise ValueError(f"method=st_ar reads two views per image, codes [B, 2, h, w]; the batch "
                       f"holds {codes.shape}: set data.views=2")
    base.check_batch({"codes": codes[:, 0]})

  return Method(
      name="st_ar", model=model, init_params=init_params, loss_fn=loss_fn,
      batch_keys=("codes", "label"),
      extras_from_params=lambda params: {"teacher": {"gpt": params["gpt"]}},
      generate=lambda params, frozen, batch, rng: base.generate(params["gpt"], frozen, batch, rng),
      generate_from="labels", load_frozen=base.load_frozen, init_frozen=base.init_frozen,
      check_batch=check_batch,
      probe_features=lambda params, codes, layer: base.probe_features(params["gpt"], codes, layer))
