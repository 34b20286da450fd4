"""Sample-quality metrics on feature vectors, in float64 NumPy.

The same functions serve every feature network (our own classifiers for FD-clf, the InceptionV3
for FID/IS), so a number differs between networks only because the features do.

  - Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), with the
    matrix square root taken through a symmetric eigendecomposition in float64.
  - Inception score from class probabilities (Salimans et al. 2016), averaged over splits.
  - Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around each real
    (generated) feature approximate the real (generated) manifold.
  - Reference statistics as `.npz` with `mu` and `sigma`, the layout of ADM's and pytorch-fid's files.
"""
from __future__ import annotations

import os

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) of features [N, D] in float64; sigma is the unbiased covariance."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_stats needs features [N>=2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), in float64.

  tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½): the inner matrix is symmetric PSD, so both square roots come
  from `eigh` and stay real, without the ε-regularised retry pytorch-fid needs for `sqrtm`.
  Symmetric in its two arguments up to round-off.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}; were they computed with the same feature net?")
  r1 = _sqrt_psd(s1)
  inner = r1 @ s2 @ r1
  w = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sqrt(np.clip(w, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
  return frechet_distance(*feature_stats(a), *feature_stats(b))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes `mu`, `sigma` (float64) as pytorch-fid's and ADM's reference files hold them."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a `.npz` with those keys (ADM's `VIRTUAL_*_labeled.npz` or pytorch-fid's)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics {path!r} do not exist; write them with "
                            "evals.metrics.save_stats or point eval.fid_stats at an existing .npz")
  with np.load(path) as f:
    missing = {"mu", "sigma"} - set(f.files)
    if missing:
      raise ValueError(f"{path!r} lacks {sorted(missing)} (has {f.files}); reference statistics "
                       "need 'mu' [D] and 'sigma' [D, D]")
    return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal chunks of exp(E_x KL(p(y|x) || p(y))); probs [N, C]."""
  p = np.asarray(probs, np.float64)
  scores = []
  for chunk in np.array_split(p, splits):
    marginal = chunk.mean(axis=0, keepdims=True)
    kl = (chunk * (np.log(chunk + 1e-30) - np.log(marginal + 1e-30))).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists_blocks(a: np.ndarray, b: np.ndarray, block: int = 2048):
  """Yields (row offset, squared Euclidean distances [rows, len(b)]) in float64 row blocks, so
  memory stays at block × len(b) however many queries there are."""
  bb = (b * b).sum(axis=1)
  for i in range(0, len(a), block):
    x = a[i:i + block]
    yield i, np.maximum((x * x).sum(axis=1)[:, None] + bb[None, :] - 2.0 * x @ b.T, 0.0)


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """[N] distance of each point to its k-th nearest neighbour within the same set (itself excluded)."""
  f = np.asarray(features, np.float64)
  if len(f) <= k:
    raise ValueError(f"k-NN radii need more than k={k} points, got {len(f)}")
  radii = np.empty(len(f))
  for i, d in _sq_dists_blocks(f, f):
    # Index 0 after partitioning is the point itself (distance 0); the k-th neighbour is at index k.
    radii[i:i + len(d)] = np.sqrt(np.partition(d, k, axis=1)[:, k])
  return radii


def manifold_coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
  """Fraction of queries inside at least one ball B(support_j, radii_j)."""
  q, s = np.asarray(queries, np.float64), np.asarray(support, np.float64)
  inside = np.concatenate([(d <= (radii ** 2)[None, :]).any(axis=1) for _, d in _sq_dists_blocks(q, s)])
  return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Improved precision (fake inside the real manifold) and recall (real inside the fake one)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  precision = manifold_coverage(fake, real, knn_radii(real, k))
  recall = manifold_coverage(real, fake, knn_radii(fake, k))
  return precision, recall


def nearest_distances(queries: np.ndarray, support: np.ndarray) -> np.ndarray:
  """[N] Euclidean distance of each query to its nearest support point (float64)."""
  q, s = np.asarray(queries, np.float64), np.asarray(support, np.float64)
  out = np.empty(len(q))
  for i, d in _sq_dists_blocks(q, s):
    out[i:i + len(d)] = np.sqrt(d.min(axis=1))
  return out


def memorization(generated: np.ndarray, held_out: np.ndarray, train: np.ndarray) -> dict:
  """How close samples sit to the training images, against how close new real images do.

  Features [N, F] of generated and held-out real images, and of training images [M, F]. A model
  that copies its training set puts its samples nearer the training images than held-out images
  are: `nn_train_ratio` (median nearest-training distance of the samples over that of the held-out
  images) falls below 1, and `frac_below_real_p5` (samples nearer a training image than 95% of
  held-out images are) rises above its 0.05 of a model that does not copy."""
  gen_d, real_d = nearest_distances(generated, train), nearest_distances(held_out, train)
  return {"nn_train_median": float(np.median(gen_d)),
          "nn_train_median_real": float(np.median(real_d)),
          "nn_train_ratio": float(np.median(gen_d) / max(np.median(real_d), 1e-30)),
          "frac_below_real_p5": float(np.mean(gen_d < np.percentile(real_d, 5)))}


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose arg-max class equals the class they were generated for."""
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
