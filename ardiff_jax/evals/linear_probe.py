"""Linear probing of a frozen AR trunk, one head per token position (llamagen_star.md §3).

ST-AR probes LlamaGen-B at 8 token positions uniformly spaced over the 256, on the output of
block 6, with the null class token, following MAE's `main_linprobe.py`. Each position p gets its
own head, trained independently of the others:

  head_p(x) = W_p · BN(x) + b_p        BN: BatchNorm1d without affine, eps 1e-6 (`batch_norm`)
  loss_p    = cross-entropy(head_p(x_p), y)
  optimiser LARS (momentum 0.9, trust coefficient 0.001, weight decay 0; biases get neither the
            trust ratio nor weight decay), lr = base_lr · batch / 256, `warmup_epochs` of linear
            warmup then a half-cycle cosine to 0 at `epochs`, all per step.

The P heads' parameters are stacked on a leading [P] axis and the loss, its gradient and the optax
update are `jax.vmap`ped over it, so LARS's trust ratio ‖w‖/‖g‖ is taken per head, never over the
stack: a head learns the same whether it is trained alone or beside others.

Shape letters: N training rows, M test rows, P probed positions, D feature width, K classes,
B batch, L tokens.

Choices where MAE's image recipe does not carry over (ST-AR states none of them):
  - `positions(L, P)`: the last position of each of P equal segments, 1-based steps L/P, 2L/P, …,
    L (31, 63, …, 255 for L=256, P=8). The feature at position t is the hidden state that
    predicts token t (input slots [class, x_0 … x_{L−2}]), so position 0 has seen only the null
    class token and would always score chance; this grid probes the final step and step 192,
    after which ST-AR reports the accuracy falls.
  - Features are extracted once with the frozen model and kept in memory (`feature_passes`
    passes over the training split, a fresh random cached view per image each pass) instead of
    MAE's fresh augmentation every epoch: a CPU-budget choice. Memory: N·P·D·4 bytes (31 GB for
    ImageNet-1k, GPT-B, one pass).
  - Each epoch is a fresh seeded permutation of the N rows cut into ⌊N/B⌋ full batches; the last
    partial batch is dropped (MAE's training loader sets drop_last=True), a different remainder
    every epoch. B = min(batch_size, N).
  - Test accuracy is that of the final weights (no selection over epochs on the test set; MAE's
    log also prints the running maximum).
  - Head init: truncated normal at ±2σ, σ = 0.01 (MAE's timm call truncates at ±2 absolute, i.e.
    effectively untruncated; at σ = 0.01 the difference is immaterial).
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

BN_EPS = 1e-6        # MAE: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1    # torch's default running-stat momentum
HEAD_INIT_STD = 0.01
EVAL_CHUNK = 4096    # test rows per forward pass of the heads


def positions(num_tokens: int, num_positions: int) -> np.ndarray:
  """int [P]: position k = ⌊(k+1)·L/P⌋ − 1, the last of each of P equal segments of L tokens
  (0-based; 1-based steps L/P, 2L/P, …, L). E.g. L=256, P=8: 31, 63, …, 255."""
  if not 1 <= num_positions <= num_tokens:
    raise ValueError(f"probe.num_positions={num_positions} must be in [1, {num_tokens}] (the "
                     "number of tokens per image): set --config.probe.num_positions accordingly")
  k = np.arange(1, num_positions + 1)
  return (k * num_tokens) // num_positions - 1


# ---------------------------------------------------------------------------------------- heads
def init_stats(num_positions: int, dim: int) -> dict[str, jax.Array]:
  """BN running statistics as torch starts them: mean 0 [P, D], var 1 [P, D]."""
  return {"mean": jnp.zeros((num_positions, dim), jnp.float32),
          "var": jnp.ones((num_positions, dim), jnp.float32)}


def init_heads(rng: jax.Array, num_positions: int, dim: int, num_classes: int) -> dict:
  """{"w": [P, D, K] trunc-normal σ 0.01, "b": [P, K] zeros}. Head p draws from fold_in(rng, p),
  so a head's initial weights do not depend on how many heads are stacked beside it."""
  init = jax.nn.initializers.truncated_normal(HEAD_INIT_STD)
  w = jnp.stack([init(jax.random.fold_in(rng, p), (dim, num_classes), jnp.float32)
                 for p in range(num_positions)])
  return {"w": w, "b": jnp.zeros((num_positions, num_classes), jnp.float32)}


def batch_norm(x: jax.Array, stats: Mapping[str, jax.Array], *, train: bool,
               momentum: float = BN_MOMENTUM, eps: float = BN_EPS) -> tuple[jax.Array, dict]:
  """BatchNorm1d without affine, as torch computes it: x [B, D], stats {"mean", "var"} [D] ->
  (normalised x [B, D], new stats).

  train: normalise by the batch mean and biased variance; running stats move by `momentum`
  towards the batch mean and the unbiased (B/(B−1)) variance. Else: normalise by the running
  stats, which are returned unchanged."""
  if not train:
    return (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + eps), dict(stats)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"batch_norm needs at least 2 rows in training, got {n}")
  mean = jnp.mean(x, axis=0)
  var = jnp.var(x, axis=0)
  new = {"mean": (1 - momentum) * stats["mean"] + momentum * mean,
         "var": (1 - momentum) * stats["var"] + momentum * var * (n / (n - 1))}
  return (x - mean) * jax.lax.rsqrt(var + eps), new


def head_logits(params: Mapping, stats: Mapping, x: jax.Array, *, train: bool
                ) -> tuple[jax.Array, dict]:
  """One head: params {"w" [D, K], "b" [K]}, stats [D], x [B, D] -> (logits [B, K], new stats)."""
  z, new_stats = batch_norm(x, stats, train=train)
  return z @ params["w"] + params["b"], new_stats


def _head_loss(params, stats, x, labels):
  """Mean cross-entropy of one head on x [B, D], labels [B]; aux: the updated BN stats."""
  logits, new_stats = head_logits(params, stats, x, train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_stats


# ------------------------------------------------------------------------------------ optimiser
def _is_matrix(params):
  """LARS masks: trust ratio and weight decay for the weight matrices only (MAE: p.ndim > 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int, batch_size: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(LARS for ONE head, its schedule): peak lr base_lr·batch/256, linear warmup over
  warmup_epochs·steps_per_epoch steps, half-cycle cosine to 0 at epochs·steps_per_epoch."""
  if cfg.epochs < 1 or not 0 <= cfg.warmup_epochs < cfg.epochs:
    raise ValueError(f"probe.epochs={cfg.epochs}, probe.warmup_epochs={cfg.warmup_epochs}: need "
                     "epochs >= 1 and 0 <= warmup_epochs < epochs")
  peak = cfg.base_lr * batch_size / 256
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_epochs * steps_per_epoch,
      decay_steps=cfg.epochs * steps_per_epoch, end_value=0.0)
  # MAE's LARS order: weight decay and the trust ratio (matrices only), momentum on that step, the
  # lr last (optax.lars scales by the lr before its momentum, which differs while the lr moves).
  tx = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay, mask=_is_matrix),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=cfg.trust_coefficient, eps=0.0),
                   _is_matrix),
      optax.trace(decay=cfg.momentum),
      optax.scale_by_learning_rate(schedule))
  return tx, schedule


# ------------------------------------------------------------------------------------- training
def _train_step(tx, state, feats, labels):
  """One LARS step of every head: feats [B, P, D], labels [B] -> (state, losses [P])."""
  grad_fn = jax.value_and_grad(_head_loss, has_aux=True)
  (loss, stats), grads = jax.vmap(grad_fn, in_axes=(0, 0, 1, None))(
      state["params"], state["stats"], feats, labels)
  updates, opt_state = jax.vmap(tx.update)(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"params": params, "stats": stats, "opt_state": opt_state}, loss


@functools.partial(jax.jit, static_argnames=("tx", "batch_size", "steps"))
def _train_epoch(state, feats, labels, key, *, tx, batch_size: int, steps: int):
  """One epoch over a fresh permutation of feats [N, P, D] / labels [N] in `steps` full batches
  (the rest dropped) -> (state, mean training loss [P])."""
  order = jax.random.permutation(key, feats.shape[0])[: steps * batch_size]

  def body(state, rows):
    return _train_step(tx, state, feats[rows], labels[rows])

  state, losses = jax.lax.scan(body, state, order.reshape(steps, batch_size))
  return state, losses.mean(axis=0)


@jax.jit
def _num_correct(params, stats, feats, labels, valid):
  """Correct top-1 predictions per head [P] on feats [C, P, D], counting rows where valid [C]."""
  logits, _ = jax.vmap(functools.partial(head_logits, train=False), in_axes=(0, 0, 1))(
      params, stats, feats)                                   # [P, C, K]
  hit = (jnp.argmax(logits, axis=-1) == labels[None]) & valid[None]
  return hit.sum(axis=1)


def top1_accuracy(params: Mapping, stats: Mapping, feats: np.ndarray, labels: np.ndarray,
                  chunk: int = EVAL_CHUNK) -> np.ndarray:
  """Top-1 accuracy per head, float [P], of the heads (running BN stats) on feats [M, P, D],
  labels [M], in chunks of `chunk` rows (the last padded, so one compilation)."""
  m = len(labels)
  chunk = min(chunk, m)
  correct = np.zeros(feats.shape[1], np.int64)
  for start in range(0, m, chunk):
    x, y = feats[start:start + chunk], labels[start:start + chunk]
    pad = chunk - len(y)
    valid = np.arange(chunk) < len(y)
    x = np.pad(x, ((0, pad), (0, 0), (0, 0)))
    y = np.pad(y, (0, pad))
    correct += np.asarray(_num_correct(params, stats, x, y, valid))
  return correct / m


def _check_inputs(train_feats, train_labels, test_feats, test_labels, num_classes):
  if train_feats.ndim != 3 or test_feats.ndim != 3 or train_feats.shape[1:] != test_feats.shape[1:]:
    raise ValueError(f"probe features must be [N, P, D] (train) and [M, P, D] (test) with the same "
                     f"P and D, got {train_feats.shape} and {test_feats.shape}")
  if len(train_labels) != len(train_feats) or len(test_labels) != len(test_feats):
    raise ValueError(f"{len(train_labels)} train / {len(test_labels)} test labels for "
                     f"{len(train_feats)} / {len(test_feats)} feature rows")
  if len(train_feats) < 2 or len(test_feats) < 1:
    raise ValueError(f"the probe needs at least 2 training rows (BatchNorm) and 1 test row, got "
                     f"{len(train_feats)} and {len(test_feats)}")
  for name, y in (("train", train_labels), ("test", test_labels)):
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"{name} labels span [{y.min()}, {y.max()}], outside [0, num_classes="
                       f"{num_classes}): set data.num_classes to the dataset's class count")


def train_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                test_labels: np.ndarray, num_classes: int, cfg: ml_collections.ConfigDict,
                seed: int, progress: bool = False) -> dict:
  """Trains one linear head per position and scores it on the test rows.

  Args:
    train_feats: float32 [N, P, D] frozen features at the P probed positions; labels int [N].
    test_feats: float32 [M, P, D]; test_labels int [M].
    num_classes: K.
    cfg: the `probe` section (`configlib.probe_config()` fields; `layer`, `num_positions`,
      `feature_passes`, `max_train` are the caller's).
    seed: init (fold_in(key, 0)) and per-epoch shuffles (fold_in(fold_in(key, 1), epoch)).
    progress: show a tqdm bar over epochs.
  Returns:
    {"top1": [P] test accuracy per position, "best_index", "best_top1", "train_loss": [P] mean
    training loss of the last epoch, "batch_size", "steps_per_epoch", "peak_lr", and the trained
    heads "params" {"w" [P, D, K], "b" [P, K]} and BN running "stats" {"mean", "var"} [P, D]}.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  _check_inputs(train_feats, train_labels, test_feats, test_labels, num_classes)
  n, num_positions, dim = train_feats.shape
  batch_size = min(int(cfg.batch_size), n)
  if batch_size < 2:
    raise ValueError(f"probe.batch_size={cfg.batch_size}: BatchNorm needs batches of 2 or more "
                     "rows; raise --config.probe.batch_size")
  steps = n // batch_size
  tx, _ = make_optimizer(cfg, steps, batch_size)
  key = jax.random.key(seed)
  params = init_heads(jax.random.fold_in(key, 0), num_positions, dim, num_classes)
  state = {"params": params, "stats": init_stats(num_positions, dim),
           "opt_state": jax.vmap(tx.init)(params)}
  feats = jax.device_put(np.asarray(train_feats, np.float32))   # once: every epoch reads it
  labels = jax.device_put(train_labels.astype(np.int32))
  shuffle_key = jax.random.fold_in(key, 1)
  loss = None
  for epoch in tqdm(range(cfg.epochs), desc="probe", unit="epoch", disable=not progress):
    state, loss = _train_epoch(state, feats, labels, jax.random.fold_in(shuffle_key, epoch),
                               tx=tx, batch_size=batch_size, steps=steps)
  top1 = top1_accuracy(state["params"], state["stats"], np.asarray(test_feats, np.float32),
                       test_labels.astype(np.int32))
  best = int(np.argmax(top1))
  return {"top1": [float(a) for a in top1], "best_index": best, "best_top1": float(top1[best]),
          "train_loss": [float(v) for v in np.asarray(loss)], "batch_size": batch_size,
          "steps_per_epoch": steps, "peak_lr": float(cfg.base_lr * batch_size / 256),
          "params": state["params"], "stats": state["stats"]}
