"""Condition refinement by entropic-OT JKO steps (Zhou, Li & Shen 2026; reference/condition_refinement_ott.md).

The AR network's per-token output z (the condition of the DiffLoss head) carries errors. Refinement
moves the conditions toward a reference distribution of "ideal" conditions P* by K steps of a
linearised JKO scheme for F(P) = ½W₂²(P, P*) + (λ/2)E‖z − ŷ‖²:

  fit    entropic OT (ott-jax Sinkhorn, float32, fixed iterations, under stop-gradient) between N of
         the batch's conditions and N' reference conditions, both with class and position features
         appended; the reference marginal may be semi-unbalanced (tau_b < 1);
  map    T = the entropic map of the dual potentials (out of sample, so it moves every token);
  step   z ← (z + τ·T(z) + τλ·ŷ) / (1 + τ + τλ)        (the proximal step with T frozen).

With λ = 0 each step moves z a fraction τ/(1+τ) of the way to T(z), contracting W₂ by 1/(1+τ).

Reference set: a FIFO queue of conditions held in the train state (`extras`, so it is checkpointed
with the run) and filled after each step from
  `inverse_encoder`  ŷ = E_φ(x_gt, position): a small MLP trained only by an auxiliary diffusion
                      loss (the shared head must denoise x from E_φ(x)); the head's parameters are
                      held fixed in that loss, so E_φ learns to speak the head's condition language
                      and the head keeps learning from the AR network's conditions alone.
  `ema_teacher`      ŷ = the EMA model's conditions under more context: MAR masks only the first
                      `teacher_mask_scale` × (the student's masked count) of the same order, and its
                      conditions at those positions join the queue; the causal AR cannot see more
                      than the past, so its teacher differs only by the averaged weights.

Modes (`condref.mode`):
  `off`      nothing changes;
  `probe`    the baseline with the instruments: E_φ trains and the queue fills (for the
             condition-error analysis), the generator's update is the one `off` makes (E_φ's
             input is ground truth and the head is held fixed in its loss, so no gradient reaches
             the generator, and E_φ's gradient is clipped by its own norm: `auxiliary_params`;
             test). The logged `loss` includes w_inv·L_aux; compare runs on `mse` + `vb`;
  `loss`     L = L_diff(z) + w·‖z − sg(R(z))‖² + w_λ·‖z − sg(ŷ)‖² (+ w_inv·L_aux), the squared
             norms averaged over the D dimensions and the loss tokens; sampling unchanged;
  `runtime`  the head consumes z + sg(R(z) − z) (value R(z), gradient of the identity) in training,
             and R is applied at every sampling step. λ is 0 inside R, and R reads the queue
             *before* this batch is pushed, so the head's input never holds the current sample's
             own ground truth. In training the OT is fitted on the loss tokens of the batch.

No leak in training: the head's input R(z) must not carry the token it is asked to denoise.
  - Queue entries carry the id of the example they came from (the data pipeline's "index"), and
    entries of the batch's own examples get no mass in the OT: an image drawn again, in a later
    epoch or as its mirror image, while its own E_φ(x) is still queued is never matched to it.
    (On digits a 4,096-entry queue filled 256 per step spans 16 steps, an epoch 22.5, so
    without this about a quarter of the images met their own entries again.)
  - The causal AR's later conditions saw the earlier tokens of their image, so a map fitted on
    all rows of an image would carry x_i into R(z_i) through the potentials (R(z₀) moves when
    only later positions change: tested). Its OT is cross-fitted: the rows of the batch's first
    half of images are moved by the map fitted on the second half's rows, and the other way round
    (the Sinkhorn cost is unchanged: two solves on half the points). MAR's loss rows (masked
    tokens) never see each other's tokens and need no cross-fitting.

Sampling is per sample: the map R applies at sampling (and in the condition-error analysis) is
fitted once, with a fixed seed, from checkpointed state only: `num_points` of the generator's own
training conditions (a second FIFO, `condref_source`, filled with the loss rows' z as the reference
queue is filled with ŷ) against `num_reference` entries of the reference queue. Each row is then
moved by the fitted maps alone, so a sample never depends on the other rows of its batch, on the
batch size or on the evaluation order. (Fitting on the sampling batch itself, as a first version
did, coupled the samples: one row's R(z) moved by 15% when the other rows changed, and a batch
of one class at one position sent most of its mass to the queue's wrong positions.) Fit weights
enter Sinkhorn as the source marginal (`a`), never as repeated rows.

Choices the paper leaves open (ours, config fields): the reference (`inverse_encoder`, whose E_φ
also gives the condition-error analysis its ideal condition), feature
scales set relative to the mean squared distance between the two point sets (`class_cost`,
`position_cost`: the extra cost of a class or position mismatch in units of that mean), the null
class (CFG) gets a zero class feature (equidistant from every class), refinement starts once the
queue is full.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.models.inverse_encoder import InverseEncoder
from ardiff_jax.models.diffloss import diffloss_loss
from ardiff_jax.methods.ot_refine import (  # noqa: F401  (re-exported: the operator and the queue)
    Refiner, condition_features, draw_reference, entropic_map, feature_scales, fit_rows,
    init_queue, jko_update, push, queue_full)

MODES = ("off", "probe", "loss", "runtime")
REFERENCES = ("inverse_encoder", "ema_teacher")


def condref_config() -> ml_collections.ConfigDict:
  """The `condref` section of a generator config (defaults from the design notes, §2.2–2.3)."""
  r = ml_collections.ConfigDict()
  r.mode = "off"               # off | probe | loss | runtime
  r.reference = "inverse_encoder"   # or "ema_teacher"
  r.teacher_mask_scale = 0.5   # ema_teacher with MAR: the teacher masks this fraction of the student's
  r.num_steps = 1              # K JKO steps
  r.tau = 1.0                  # JKO step size τ
  r.lam = 0.0                  # λ: pull toward the paired ŷ inside R (loss mode only)
  r.epsilon = 0.05             # entropic ε, relative to the std of the cost matrix
  r.sinkhorn_iterations = 60   # fixed (a multiple of ott's 10 inner iterations): a lax.scan
  r.tau_b = 0.9                # reference-side marginal relaxation (1 = balanced)
  r.num_points = 1024          # N: batch conditions the OT is fitted on (fewer if the batch is small)
  r.num_reference = 2048       # N': reference conditions drawn from the queue per solve
  r.queue_size = 4096          # M
  r.push_per_step = 256        # reference conditions added to the queue per train step
  r.class_cost = 1.0           # extra cost of a class mismatch, × the mean squared distance
  r.position_cost = 0.5        # extra cost of a position mismatch, × the mean squared distance
  r.loss_weight = 1.0          # w (loss mode)
  r.lambda_weight = 0.0        # w_λ (loss mode)
  r.inverse_weight = 0.1       # w_inv: the auxiliary diffusion loss that trains E_φ
  r.inverse_width = 256
  r.inverse_depth = 2
  return r


def validate(r: ml_collections.ConfigDict, loss_rows: int | None = None) -> None:
  """Raises ValueError naming the field for settings the refinement cannot run with. `loss_rows`:
  the fewest loss-bearing conditions one (micro-)batch holds, when known."""
  if r.mode not in MODES:
    raise ValueError(f"condref.mode={r.mode!r}: expected one of {MODES}")
  if r.reference not in REFERENCES:
    raise ValueError(f"condref.reference={r.reference!r}: expected one of {REFERENCES}")
  if not 0.0 < r.tau_b <= 1.0:
    raise ValueError(f"condref.tau_b={r.tau_b}: the reference marginal's relaxation must lie in "
                     "(0, 1] (1 = balanced OT; 0.5–0.9 lets a batch of few classes leave the "
                     "queue's other classes unmatched)")
  if r.push_per_step > r.queue_size:
    raise ValueError(f"condref.push_per_step={r.push_per_step} exceeds condref.queue_size="
                     f"{r.queue_size}: a step would overwrite its own entries; push fewer or "
                     "enlarge the queue")
  if loss_rows is not None and r.mode != "off":
    for field in ("num_points", "push_per_step"):
      if r[field] > loss_rows:
        raise ValueError(
            f"condref.{field}={r[field]} exceeds the {loss_rows} loss-bearing conditions of a "
            "training (micro-)batch, so rows would be drawn twice; lower it, or raise "
            "train.batch_size")
  for field in ("num_reference", "num_points"):
    if r[field] > r.queue_size:
      raise ValueError(f"condref.{field}={r[field]} exceeds condref.queue_size={r.queue_size}; "
                       "the sampling map draws it from a queue without replacement")
  if r.sinkhorn_iterations <= 0 or r.sinkhorn_iterations % 10:
    raise ValueError(f"condref.sinkhorn_iterations={r.sinkhorn_iterations}: use a positive multiple "
                     "of 10 (ott-jax runs fixed iterations in blocks of 10 and would round down)")
  if r.reference == "ema_teacher" and (r.lam or r.lambda_weight):
    raise ValueError("condref.lam and condref.lambda_weight need a paired ideal condition for every "
                     "loss token; the EMA teacher gives one only where it masks (use "
                     "reference='inverse_encoder')")
  if r.mode == "runtime" and r.lam:
    raise ValueError("condref.lam must be 0 in runtime mode: ŷ holds the sample's own ground truth "
                     "and must never reach the denoiser's input")


def make_refiner(r: ml_collections.ConfigDict, *, allow_lambda: bool) -> Refiner:
  return Refiner(num_steps=int(r.num_steps), tau=float(r.tau),
                 lam=float(r.lam) if allow_lambda else 0.0, epsilon=float(r.epsilon),
                 iterations=int(r.sinkhorn_iterations), tau_b=float(r.tau_b))


# ------------------------------------------------------- what a generator's loss adds
INVERSE_KEY = "condref_inverse"    # params subtree of E_φ, next to the generator's own
QUEUE_KEY = "condref_queue"        # in extras; and next to the weights for runtime-mode sampling
SOURCE_KEY = "condref_source"      # the generator's own training conditions: the sampling map's source
SAMPLING_MAP_SEED = 0              # the draws the sampling map is fitted on: fixed, never the batch's


@dataclasses.dataclass(frozen=True)
class ConditionRefinement:
  """Condition refinement bound to one generator (its sequence length, condition width, classes).

  Used by `methods/mar.py` and `methods/ar_diffusion.py`; see the module docstring for the modes.
  """
  cfg: ml_collections.ConfigDict
  seq_len: int
  cond_dim: int
  token_dim: int
  num_classes: int
  loss_rows: int | None = None    # the fewest loss-bearing conditions of a (micro-)batch
  cross_fit: bool = False         # causal generators: see `refine` and the module docstring

  def __post_init__(self):
    validate(self.cfg, self.loss_rows)

  @property
  def enabled(self) -> bool:
    return self.cfg.mode != "off"

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """What the refinement reads from a data batch: the examples' ids (to exclude their own
    queue entries), when on."""
    return ("index",) if self.enabled else ()

  @property
  def inverse(self) -> InverseEncoder:
    return InverseEncoder(self.cond_dim, self.seq_len, self.cfg.inverse_width, self.cfg.inverse_depth)

  @property
  def uses_teacher(self) -> bool:
    """True when the reference comes from the EMA model (the loss then reads the EMA weights)."""
    return self.enabled and self.cfg.reference == "ema_teacher"

  def init_params(self, rng: jax.Array) -> dict:
    """{INVERSE_KEY: E_φ params} (empty when off or with the EMA-teacher reference)."""
    if not self.enabled or self.uses_teacher:
      return {}
    x = jnp.zeros((1, self.token_dim), jnp.float32)
    return {INVERSE_KEY: self.inverse.init(rng, x, jnp.zeros((1,), jnp.int32))["params"]}

  def auxiliary_params(self):
    """`Method.auxiliary_params`: E_φ's parameters (None when there is no E_φ)."""
    if not self.enabled or self.uses_teacher:
      return None
    return lambda params: {k: jax.tree.map(lambda _: k == INVERSE_KEY, v) for k, v in params.items()}

  def init_extras(self, rng: jax.Array) -> dict:
    """{QUEUE_KEY: reference ŷ, SOURCE_KEY: the generator's own z} FIFOs (empty when off)."""
    del rng
    if not self.enabled:
      return {}
    return {QUEUE_KEY: init_queue(self.cfg.queue_size, self.cond_dim),
            SOURCE_KEY: init_queue(self.cfg.queue_size, self.cond_dim)}

  def _feature_fn(self, z, ref, ref_weights=None):
    """(labels [n], positions [n]) -> class/position features [n, F], scaled for the point sets
    z and ref (`feature_scales`; ref weighted by `ref_weights`)."""
    s_cls, s_pos = feature_scales(z, ref, self.cfg.class_cost, self.cfg.position_cost, ref_weights)
    return lambda lab, pos: condition_features(lab, pos, self.num_classes, self.seq_len, s_cls, s_pos)

  def refine(self, z, labels, positions, weights, queue, rng, y_hat=None, allow_lambda=False,
             ids=None, first_half=None):
    """Training's R(z), fitted on this batch: rows z [n, D] with labels [n] (num_classes = null),
    positions [n] and fit weights [n] (the marginal of the rows the OT is fitted on; 0: never)
    against `queue`. Rows pass unchanged until the queue is full.

    ids [k]: the batch's example ids; queue entries of these examples get no mass (an example
    seen again while its own E_φ(x) is queued must not be matched to it). first_half [n] bool
    (cross-fitting, `cross_fit`): rows of the batch's first images are moved by the map fitted on
    the other images' rows, and the other way round, so no row's map was fitted on a condition
    that saw its token.
    Returns (refined [n, D] float32, diagnostics)."""
    r = self.cfg
    n = z.shape[0]
    fit_rng, ref_rng = jax.random.split(rng)
    ref, ref_labels, ref_pos, ref_weights = draw_reference(queue, ref_rng, r.num_reference, ids)
    has_ref = ref_weights.sum() > 0      # exclusion may leave nothing to match against
    ref_weights = jnp.where(has_ref, ref_weights, 1.0 / ref_weights.shape[0])
    z32 = jax.lax.stop_gradient(z.astype(jnp.float32))
    refiner = make_refiner(r, allow_lambda=allow_lambda)

    def fit_and_apply(fit_weights_in, num_fit, key):
      fit_index, fit_weights = fit_rows(key, fit_weights_in, num_fit)
      feature_fn = self._feature_fn(z32[fit_index], ref, ref_weights)
      return refiner(z32, feature_fn(labels, positions), fit_index, ref,
                     feature_fn(ref_labels, ref_pos), y_hat, fit_weights, ref_weights)

    if first_half is None:
      refined, info = fit_and_apply(weights, min(int(r.num_points), n), fit_rng)
    else:
      half = max(min(int(r.num_points), n) // 2, 1)
      key_a, key_b = jax.random.split(fit_rng)
      from_a, info_a = fit_and_apply(weights * first_half, half, key_a)
      from_b, info_b = fit_and_apply(weights * ~first_half, half, key_b)
      refined = jnp.where(first_half[:, None], from_b, from_a)
      info = jax.tree.map(lambda u, v: (u + v) / 2, info_a, info_b)
    active = queue_full(queue) & has_ref
    refined = jnp.where(active, refined, z32)
    moved = jnp.sqrt(jnp.sum(weights[:, None] * (refined - z32) ** 2) / jnp.maximum(weights.sum(), 1))
    info = {k: jnp.where(active, v, 0.0) for k, v in info.items()}
    return refined, dict(info, move_rms=moved, queue_full=queue_full(queue).astype(jnp.float32))

  def training_terms(self, params, z, tokens, labels, true_labels, weights, extras, rng,
                     fixed_head_fn, teacher=None, ids=None):
    """The refinement's part of a generator's training step.

    z [B, L, D] conditions, tokens [B, L, C] ground truth, labels [B] as the generator saw them
    (num_classes where dropped for CFG), true_labels [B], weights [B, L] loss weights (masked
    tokens for MAR, all for the causal AR), fixed_head_fn the DiffLoss head with the generator's
    parameters bound under stop-gradient (E_φ's auxiliary loss must not train it), teacher
    (`ema_teacher` only) = (EMA conditions [B, L, D], [B, L] where they may join the queue), ids
    [B] the examples' ids (the data pipeline's "index"; None: unknown, nothing is excluded).
    Returns (conditions for the head [B·L, D], extra loss, metrics, new extras).
    """
    r = self.cfg
    b, l, d = z.shape
    z_flat = z.reshape(b * l, d)
    if not self.enabled:
      return z_flat, jnp.zeros((), jnp.float32), {}, extras
    w = weights.reshape(-1).astype(jnp.float32)
    positions = jnp.tile(jnp.arange(l), b)
    row_labels = jnp.repeat(labels, l)
    tok_flat = tokens.reshape(b * l, -1)
    if self.uses_teacher:
      if teacher is None:
        raise ValueError("condref.reference='ema_teacher' needs the EMA model's conditions")
      y_hat = jax.lax.stop_gradient(teacher[0].reshape(b * l, d).astype(jnp.float32))
      push_weights = teacher[1].reshape(-1).astype(jnp.float32)
    else:
      y_hat = self.inverse.apply({"params": params[INVERSE_KEY]}, tok_flat, positions)  # [B·L, D]
      push_weights = w
    r_ref, r_aux, r_push, r_source = jax.random.split(rng, 4)
    queue = extras[QUEUE_KEY]
    use_lambda = r.mode == "loss"
    first_half = None
    if self.cross_fit:
      if b < 2:
        raise ValueError("condition refinement of a causal generator cross-fits the OT between "
                         "the two halves of each batch, which needs at least 2 images per "
                         "(micro-)batch: raise train.batch_size or lower train.grad_accum_steps")
      first_half = jnp.repeat(jnp.arange(b) < b // 2, l)
    refined, info = self.refine(z_flat, row_labels, positions, w, queue, r_ref,
                                y_hat=jax.lax.stop_gradient(y_hat) if use_lambda else None,
                                allow_lambda=use_lambda, ids=ids, first_half=first_half)
    wmean = lambda v: jnp.sum(v * w) / jnp.maximum(w.sum(), 1.0)
    metrics = {f"condref/{k}": v for k, v in info.items()}
    extra = jnp.zeros((), jnp.float32)
    zf = z_flat.astype(jnp.float32)
    if r.mode == "loss":
      head_in = z_flat
      gap = wmean(jnp.mean((zf - jax.lax.stop_gradient(refined)) ** 2, -1))
      extra += r.loss_weight * gap
      if r.lambda_weight:
        extra += r.lambda_weight * wmean(jnp.mean((zf - jax.lax.stop_gradient(y_hat)) ** 2, -1))
    elif r.mode == "probe":
      head_in = z_flat
      gap = wmean(jnp.mean((zf - refined) ** 2, -1))
    else:   # runtime: the value R(z), the gradient of the identity
      head_in = z_flat + jax.lax.stop_gradient(refined.astype(z_flat.dtype) - z_flat)
      gap = wmean(jnp.mean((zf - refined) ** 2, -1))
    metrics["condref/gap"] = gap
    metrics["condref/reference_gap"] = wmean(jnp.mean((zf - jax.lax.stop_gradient(y_hat)) ** 2, -1))
    if not self.uses_teacher:
      # E_φ's own training signal: the head (held fixed) must denoise x given E_φ(x).
      aux, _ = diffloss_loss(fixed_head_fn, create_diffusion(1000), y_hat, tok_flat, w, r_aux, 1)
      extra += r.inverse_weight * aux
      metrics["condref/inverse_loss"] = aux
    # Push after use: the queue this step refined against never held this batch. The source FIFO
    # takes the generator's own conditions of loss rows, as the sampler will meet them.
    n_push = min(int(r.push_per_step), b * l)
    idx, pw = fit_rows(r_push, push_weights, n_push)
    row_ids = None if ids is None else jnp.repeat(ids, l)
    take = lambda i: None if row_ids is None else row_ids[i]
    queue = push(queue, y_hat[idx], jnp.repeat(true_labels, l)[idx], positions[idx], valid=pw > 0,
                 ids=take(idx))
    idx, sw = fit_rows(r_source, w, n_push)
    source = push(extras[SOURCE_KEY], zf[idx], row_labels[idx], positions[idx], valid=sw > 0,
                  ids=take(idx))
    return head_in, extra, metrics, dict(extras, **{QUEUE_KEY: queue, SOURCE_KEY: source})

  def sampling_params(self, params: dict, extras: dict) -> dict:
    """`Method.sampling_params`: the weights travel with the reference queue (read by runtime-mode
    sampling and by the condition-error analysis)."""
    if not self.enabled:
      return params
    return dict(params, **{k: extras[k] for k in (QUEUE_KEY, SOURCE_KEY) if k in extras})

  def sampling_map(self, params: dict):
    """refine_fn(z [n, D], labels [n] (num_classes = null), positions [n]) -> z [n, D]: R fitted
    once from the checkpointed queues in `params` (see the module docstring), identity until both
    are full. Each row's result depends on that row alone."""
    missing = [k for k in (QUEUE_KEY, SOURCE_KEY) if k not in params]
    if missing:
      raise ValueError(
          f"condition refinement samples against the checkpointed queues, but {missing} are "
          "missing: sample from a checkpoint of a run with condref on (a run saved before the "
          "source queue existed must be trained again)")
    r = self.cfg
    queue, source = params[QUEUE_KEY], params[SOURCE_KEY]
    src_rng, ref_rng = jax.random.split(jax.random.key(SAMPLING_MAP_SEED))
    src, src_labels, src_pos, _ = draw_reference(source, src_rng, r.num_points)
    ref, ref_labels, ref_pos, _ = draw_reference(queue, ref_rng, r.num_reference)
    feats = self._feature_fn(src, ref)
    fitted = make_refiner(r, allow_lambda=False).fitted(src, feats(src_labels, src_pos), ref,
                                                        feats(ref_labels, ref_pos))
    full = queue_full(queue) & queue_full(source)

    def refine_fn(z, labels, positions):
      return jnp.where(full, fitted(z, feats(labels, positions)), z.astype(jnp.float32)).astype(z.dtype)

    return refine_fn

  def sampling_refiner(self, params: dict):
    """The samplers' refine_fn (`sampling_map`) in runtime mode, or None when refinement does not
    act at sampling. `params` as `sampling_params` made them."""
    return self.sampling_map(params) if self.cfg.mode == "runtime" else None


def for_generator(config: ml_collections.ConfigDict, model,
                  loss_tokens_per_image: int | None = None, causal: bool = False
                  ) -> ConditionRefinement:
  """The refinement of a DiffLoss generator (MAR or GPT: `seq_len`, `width`, `token_dim`).
  `loss_tokens_per_image`: the fewest loss-bearing tokens of an image (MAR: the fewest masked;
  default every token), which with the (micro-)batch size bounds `num_points` and
  `push_per_step`. `causal`: the generator's later conditions saw the earlier tokens of their
  image (teacher forcing), so training's OT is cross-fitted between batch halves."""
  cfg = config.condref if "condref" in config else condref_config()   # runs from before condref
  micro_batch = config.train.batch_size // max(int(config.train.grad_accum_steps), 1)
  per_image = model.seq_len if loss_tokens_per_image is None else loss_tokens_per_image
  return ConditionRefinement(cfg, model.seq_len, model.width, model.token_dim,
                             config.data.num_classes, loss_rows=micro_batch * per_image,
                             cross_fit=causal)


def generator_params(params: dict) -> dict:
  """The generator's own weights from a tree that may also hold E_φ and the sampling queue."""
  return {k: v for k, v in params.items() if k not in (INVERSE_KEY, QUEUE_KEY, SOURCE_KEY)}


@dataclasses.dataclass(frozen=True)
class ConditionProbe:
  """What the condition-error analysis (evals/condition_error.py) needs from a generator.

  conditions(params, moments [B,h,w,2C], labels [B], rng) -> {"tokens" [B,L,C], "z" [B,L,D],
    "z_null" [B,L,D] (the same context with the CFG null class), "step" [B,L] int32 (the AR step
    at which the sampler generates each position, given the ground truth before it)}.
  head(params, x_t [N,C], t [N], z [N,D]) -> [N, 2C].
  """
  conditions: Callable
  head: Callable
  num_steps: int
  refinement: ConditionRefinement
