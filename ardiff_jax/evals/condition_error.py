"""Condition-error analysis of a DiffLoss generator (reference/condition_refinement_ott.md §2.4).

On held-out tokens x₀ with the sampler's conditions c (ground truth as the already generated
tokens), a fixed noise ε and x_t at a set of timesteps t:

  denoising SNR      SNR_t(c)  = 10·log₁₀(E‖x₀‖² / E‖x̂₀(x_t, t, c) − x₀‖²)
  noise intensity    N_t(c)    = E‖ε̂(x_t, t, c) − ε‖² / C
  condition SNR      SNR_c(t)  = 10·log₁₀(E‖ε̂(·, c*)‖² / E‖ε̂(·, c) − ε̂(·, c*)‖²) of the raw c,
                     c* = E_φ(x₀), the inverse encoder's ideal condition (runs with condref on or
                     in `probe` mode). An instrument of the run itself: E_φ is trained through
                     the run's head and fills the queue R maps onto, so it is reported for the raw
                     conditions only (for R(c) it would measure R against its own target)
  score vs AR step   s_i = E‖ε̂(·, c_i) − ε̂(·, c_∅)‖ / σ_t at `score_t`, per AR step i (MAR
                     iteration, or the causal AR's step: the image position in raster order, a
                     random position with `ar.order=random`), fitted by s_i ≈ M·βⁱ + m with
                     M ≥ 0 and a confidence interval for β (`fit_decay`; the paper's Thm 2
                     claims β < 1)

for each condition variant: `raw` (c), `refined` (R(c), the sampling map of the run's checkpointed
queues, when they are full) and `ideal` (c*). `served` names the variant the sampler feeds the
head (refined in runtime mode, raw otherwise): its denoising SNR is what compares across models.
Within one model, raw vs refined is confounded (its head was trained on one of them only).

Matched across models: the held-out images, the noise and the timesteps depend only on
`eval.condition_error_seed` (not on the run's seed), so two runs' JSONs compare entry by entry;
`compare` (and `python -m ardiff_jax.evals.condition_error BASELINE OTHER...`) lines up their
served SNRs and refuses analyses made at different settings. Results go to
`eval/condition_error_<step>.json` and a PNG of the curves.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ardiff_jax.diffusion.gaussian import create_diffusion
from ardiff_jax.methods import condref as cr


def default_timesteps(num: int = 10, highest: int = 900) -> list[int]:
  """`num` timesteps evenly over [0, highest], high noise first. The top of the cosine schedule
  is left out: at t ≈ 999, ᾱ_t ≈ 0 and x̂₀ multiplies any ε error by 1/√ᾱ_t (−60 dB for every
  condition), which says nothing about the conditions."""
  return [int(t) for t in np.linspace(highest, 0, num).round()]


BETA_GRID = np.linspace(0.01, 2.0, 400)


def _fit_at(beta: float, steps: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
  """(SSE, M, m) of the least-squares fit s ≈ M·β^(k − k₀) + m with M ≥ 0 (m free)."""
  basis = np.stack([beta ** (steps - steps.min()), np.ones_like(steps)], 1)
  (scale, floor), *_ = np.linalg.lstsq(basis, s, rcond=None)
  if scale < 0:   # the constraint binds: a flat line
    scale, floor = 0.0, float(s.mean())
  return float(np.sum((basis @ np.array([scale, floor]) - s) ** 2)), float(scale), float(floor)


def fit_decay(steps: np.ndarray, s: np.ndarray, level: float = 0.95) -> dict:
  """Fits s ≈ M·βᵏ + m with M ≥ 0 over β ∈ (0, 2] (the paper's Theorem 2: β < 1).

  M ≥ 0 makes β readable: with M free, a rising sequence m − |M|·βᵏ fits β < 1 as well as a
  falling one does. Returns β, M, m, r², β's `level` profile-likelihood interval (the β whose
  SSE ≤ SSE_min·(1 + F(level; 1, n − 3)/(n − 3)); the whole grid when n ≤ 3 or M = 0, where β
  is not identified), whether the best β lies on the grid's edge, and `decays`: M > 0 and the
  interval below 1.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  steps, s = np.asarray(steps, np.float64), np.asarray(s, np.float64)
  fits = [_fit_at(b, steps, s) for b in BETA_GRID]
  sse = np.array([f[0] for f in fits])
  i = int(np.argmin(sse))
  err, scale, floor = fits[i]
  dof = len(s) - 3
  if dof > 0 and scale > 0:
    limit = err * (1.0 + stats.f.ppf(level, 1, dof) / dof)
    inside = BETA_GRID[sse <= limit + 1e-12 * max(err, 1e-30)]
    interval = [float(inside.min()), float(inside.max())]
  else:
    interval = [float(BETA_GRID[0]), float(BETA_GRID[-1])]
  total = float(np.sum((s - s.mean()) ** 2))
  return {"beta": float(BETA_GRID[i]), "M": scale, "m": floor,
          "r2": 1.0 - err / total if total > 0 else 1.0, "beta_interval": interval,
          "interval_level": level, "beta_at_grid_edge": i in (0, len(BETA_GRID) - 1),
          "decays": bool(scale > 0 and interval[1] < 1.0)}


def _denoise(head, params, diffusion, x0, t, noise, z):
  tt = jnp.full((x0.shape[0],), t, jnp.int32)
  x_t = diffusion.q_sample(x0, tt, noise)
  eps_hat = head(params, x_t, tt, z)[:, :x0.shape[-1]].astype(jnp.float32)
  return eps_hat, diffusion.predict_x0(x_t, tt, eps_hat)


def analyze(probe: cr.ConditionProbe, params, queue: dict | None, moments: jax.Array,
            labels: jax.Array, rng: jax.Array, timesteps: list[int], score_t: int) -> dict:
  """The analysis on one batch of held-out moments [B,h,w,2C] and labels [B]; see the module doc."""
  diffusion = create_diffusion(1000)
  r_cond, r_noise, _ = jax.random.split(rng, 3)
  out = jax.jit(probe.conditions)(params, moments, labels, r_cond)
  b, l, c = out["tokens"].shape
  x0 = out["tokens"].reshape(b * l, c).astype(jnp.float32)
  flat = lambda a: a.reshape(b * l, a.shape[-1])
  positions = jnp.tile(jnp.arange(l), b)
  row_labels = jnp.repeat(labels, l)
  variants = {"raw": flat(out["z"])}
  refinement = probe.refinement
  if cr.INVERSE_KEY in params:
    variants["ideal"] = refinement.inverse.apply({"params": params[cr.INVERSE_KEY]}, x0, positions)
  if queue is not None and bool(cr.queue_full(queue)):
    # What runtime-mode sampling applies: the map fitted on the checkpointed queues, row by row.
    refine = jax.jit(lambda p, z, lab, pos: refinement.sampling_map(p)(z, lab, pos))
    variants["refined"] = refine(params, variants["raw"], row_labels, positions)
  served = "refined" if refinement.cfg.mode == "runtime" and "refined" in variants else "raw"
  head = jax.jit(probe.head)
  result = {"timesteps": list(timesteps), "num_tokens": int(b * l), "served": served,
            "mode": str(refinement.cfg.mode), "variants": {}}
  sq = lambda a: float(jnp.mean(jnp.sum(a * a, -1)))
  power_x0 = sq(x0)
  eps_by = {}
  for i, t in enumerate(timesteps):
    noise = jax.random.normal(jax.random.fold_in(r_noise, i), x0.shape, jnp.float32)
    for name, z in variants.items():
      eps_hat, x0_hat = _denoise(head, params, diffusion, x0, t, noise, z)
      eps_by[name, t] = eps_hat
      v = result["variants"].setdefault(name, {"denoise_snr_db": [], "noise_intensity": []})
      v["denoise_snr_db"].append(10 * np.log10(power_x0 / max(sq(x0_hat - x0), 1e-30)))
      v["noise_intensity"].append(sq(eps_hat - noise) / c)
  if "ideal" in variants:   # the raw conditions only: for R(c) this would be circular
    result["variants"]["raw"]["condition_snr_vs_e_phi_db"] = [
        10 * np.log10(sq(eps_by["ideal", t]) / max(sq(eps_by["raw", t] - eps_by["ideal", t]), 1e-30))
        for t in timesteps]
    result["raw_condition_gap_vs_e_phi"] = float(jnp.mean((variants["raw"] - variants["ideal"]) ** 2))
  # The condition part of the score against the AR step (Thm 2), for the conditions the sampler
  # feeds the head.
  noise = jax.random.normal(jax.random.fold_in(r_noise, 10_000), x0.shape, jnp.float32)
  eps_c, _ = _denoise(head, params, diffusion, x0, score_t, noise, variants[served])
  eps_u, _ = _denoise(head, params, diffusion, x0, score_t, noise, flat(out["z_null"]))
  sigma = diffusion.noise_std(score_t)
  per_token = np.asarray(jnp.sqrt(jnp.sum((eps_c - eps_u) ** 2, -1))) / sigma
  step = np.asarray(out["step"]).reshape(-1)
  steps = np.unique(step[step >= 0])
  s = np.array([per_token[step == k].mean() for k in steps])
  result["score_by_step"] = {"t": int(score_t), "steps": steps.tolist(), "s": s.tolist(),
                             "fit": fit_decay(steps, s) if len(steps) >= 3 else None}
  return result


def summary(result: dict) -> dict:
  """Scalars for eval/<step>.json: the mean denoising SNR of the served conditions (comparable
  across models), of the raw (and refined) ones, the raw condition SNR against E_φ, the fitted β."""
  out = {"cond_err/served_denoise_snr_db":
         float(np.mean(result["variants"][result["served"]]["denoise_snr_db"]))}
  for name in ("raw", "refined"):
    v = result["variants"].get(name)
    if v is None:
      continue
    out[f"cond_err/{name}_denoise_snr_db"] = float(np.mean(v["denoise_snr_db"]))
  raw = result["variants"]["raw"]
  if "condition_snr_vs_e_phi_db" in raw:
    out["cond_err/raw_condition_snr_vs_e_phi_db"] = float(np.mean(raw["condition_snr_vs_e_phi_db"]))
  fit = result["score_by_step"]["fit"]
  if fit:
    out["cond_err/score_decay_beta"] = fit["beta"]
    out["cond_err/score_decay_beta_low"], out["cond_err/score_decay_beta_high"] = fit["beta_interval"]
  return out


MATCHED_FIELDS = ("timesteps", "num_tokens", "analysis_seed", "score_t")


def compare(results: dict[str, dict]) -> dict:
  """Lines up the served denoising SNR of several runs' analyses ({name: result}, the first the
  baseline) at matched settings: {name: {"served", "mode", "denoise_snr_db" [per t], "mean_db",
  "delta_db" (mean minus the baseline's)}}. Raises ValueError naming the field when two analyses
  were made at different settings (held-out images, noise, timesteps)."""
  names = list(results)
  if not names:
    raise ValueError("compare needs at least one analysis")
  base = results[names[0]]
  for name in names[1:]:
    for field in MATCHED_FIELDS:
      if results[name].get(field) != base.get(field):
        raise ValueError(
            f"analyses {names[0]!r} and {name!r} differ in {field} ({base.get(field)} vs "
            f"{results[name].get(field)}): run --mode eval of both with the same "
            "eval.condition_error_samples, eval.condition_error_seed and eval.condition_error_score_t")
  table = {}
  for name in names:
    r = results[name]
    snr = r["variants"][r["served"]]["denoise_snr_db"]
    table[name] = {"served": r["served"], "mode": r.get("mode"), "denoise_snr_db": snr,
                   "mean_db": float(np.mean(snr))}
  for row in table.values():
    row["delta_db"] = row["mean_db"] - table[names[0]]["mean_db"]
  return table


def plot(result: dict, path: str) -> None:
  """Three panels: denoising SNR and condition SNR against t, and s_i against the AR step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  ts = result["timesteps"]
  for name, v in result["variants"].items():
    axes[0].plot(ts, v["denoise_snr_db"], marker="o", label=name)
    if "condition_snr_vs_e_phi_db" in v:
      axes[1].plot(ts, v["condition_snr_vs_e_phi_db"], marker="o", label=name)
  axes[0].set(xlabel="timestep t", ylabel="dB",
              title=f"denoising SNR (sampling feeds the head: {result.get('served', 'raw')})")
  axes[1].set(xlabel="timestep t", ylabel="dB", title="raw condition SNR vs E_φ(x₀) (this run's)")
  sb = result["score_by_step"]
  axes[2].plot(sb["steps"], sb["s"], "o", label="measured")
  if sb["fit"]:
    k = np.asarray(sb["steps"], np.float64)
    f = sb["fit"]
    lo, hi = f["beta_interval"]
    axes[2].plot(k, f["M"] * f["beta"] ** (k - k.min()) + f["m"], "-",
                 label=f"M·β^i + m, β={f['beta']:.3f} [{lo:.2f}, {hi:.2f}], r²={f['r2']:.2f}")
  axes[2].set(xlabel="AR step i", ylabel="‖ε̂(c_i) − ε̂(c_∅)‖/σ_t",
              title=f"condition score ({result.get('served', 'raw')}), t={sb['t']}")
  if not axes[1].lines:
    axes[1].text(0.5, 0.5, "no ideal condition\n(E_φ is trained only with condref on\nor in probe mode)",
                 ha="center", va="center", transform=axes[1].transAxes)
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=8)
  axes[0].invert_xaxis()
  axes[1].invert_xaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def load_heldout_moments(data_cfg: ml_collections.ConfigDict, num: int, seed: int):
  """(moments [n,h,w,2C] float32, labels [n] int32): a seeded subset of the cached held-out split."""
  from ardiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.make_source(data_cfg, data_cfg.eval_split, seed)
  idx = np.random.default_rng(seed).choice(len(source), min(num, len(source)), replace=False)
  records = [source[int(i)] for i in np.sort(idx)]
  return (np.stack([r["moments"] for r in records]).astype(np.float32),
          np.asarray([r["label"] for r in records], np.int32))


def analysis_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the held-out subset and the noise: fixed across runs (not the run's seed)."""
  return int(config.eval.get("condition_error_seed", 0))


def run(config: ml_collections.ConfigDict, workdir: str, method, params, step: int) -> dict:
  """Writes eval/condition_error_<step>.json and .png; returns the summary scalars. `params` as
  `Method.sampling_params` made them (with the reference queue when refinement is on)."""
  e = config.eval
  seed = analysis_seed(config)
  moments, labels = load_heldout_moments(config.data, e.condition_error_samples, seed)
  queue = params.get(cr.QUEUE_KEY)
  with jax.default_device(jax.devices()[0]):
    result = analyze(method.condition_probe, jax.device_get(params), jax.device_get(queue),
                     jnp.asarray(moments), jnp.asarray(labels), jax.random.key(seed + 2),
                     default_timesteps(), e.condition_error_score_t)
  result.update(analysis_seed=seed, score_t=int(e.condition_error_score_t), step=int(step))
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"condition_error_{step}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  plot(result, stem + ".png")
  logging.info("condition-error analysis: %s.json / .png", stem)
  return dict(summary(result), condition_error_file=stem + ".json")


def newest_step(workdir: str, prefix: str = "", suffix: str = "") -> int | None:
  """The largest step of a run's `eval/<prefix><step><suffix>.json` files, or None when there is
  none."""
  out_dir = os.path.join(workdir, "eval")
  pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"\.json")
  steps = [int(m.group(1)) for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
           if (m := pattern.fullmatch(n))]
  return max(steps) if steps else None


def latest_analysis(workdir: str) -> dict:
  """The newest eval/condition_error_<step>.json of a run (ValueError naming the fix if none)."""
  step = newest_step(workdir, "condition_error_")
  if step is None:
    raise ValueError(f"{workdir} has no eval/condition_error_<step>.json: run --mode eval of it "
                     "(a DiffLoss generator with eval.condition_error_samples > 0)")
  with open(os.path.join(workdir, "eval", f"condition_error_{step}.json")) as f:
    return json.load(f)


def main(argv: list[str]) -> None:
  """`python -m ardiff_jax.evals.condition_error BASELINE_WORKDIR OTHER_WORKDIR...`: prints the
  served denoising SNR of each run's latest analysis against the first's, matched."""
  if len(argv) < 2:
    raise SystemExit("usage: python -m ardiff_jax.evals.condition_error BASELINE_WORKDIR "
                     "OTHER_WORKDIR...")
  table = compare({w: latest_analysis(w) for w in argv})
  for name, row in table.items():
    print(f"{row['mean_db']:7.2f} dB  ({row['delta_db']:+.2f})  {row['mode']}, served "
          f"{row['served']}: {name}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])
