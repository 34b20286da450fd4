"""Mean ± std across seeds of the evaluations of several runs, as a Markdown table.

    python -m ardiff_jax.evals.table "MAR, probe=W0,W1,W2" "MAR, runtime=W3,W4,W5" ...
    python -m ardiff_jax.evals.table --probe "LlamaGen=W0,W1" "ST-AR=W2,W3"

Each argument is `LABEL=WORKDIR,WORKDIR,...` (one workdir per seed); every workdir's newest
`eval/<step>.json` is read (`WORKDIR@TAG`: its `eval/<step>_<TAG>.json`, an evaluation made with
`--config.eval.tag=TAG`) (and its `eval/condition_error_<step>.json`, when there is one). Columns:
FD-clf, class accuracy, precision / recall, the memorisation ratio (`memorization/nn_train_ratio`),
the served conditions' denoising SNR and, for the decay of the condition score along the AR
chain, in how many seeds the fit says it decays (M > 0 and β's interval below 1) with the mean β,
and the best position's linear-probe top-1 (`probe/<step>.json` of `--mode probe`, when there is
one). `--probe` prints the probe's top-1 at every position instead.
The std is the sample std (ddof 1) over the seeds; one seed gives its value alone.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from ardiff_jax.evals import condition_error

COLUMNS = ("FD-clf", "class acc (%)", "precision / recall", "memorisation ratio",
           "served denoise SNR (dB)", "score decays (β)", "probe top-1, best (%)")


def newest_eval(workdir: str) -> tuple[dict, dict | None]:
  """(eval/<step>.json, its condition_error_<step>.json or None) of the newest evaluated step;
  `WORKDIR@TAG` reads the tagged evaluation eval/<step>_<TAG>.json (`eval.tag`) instead."""
  workdir, _, tag = workdir.partition("@")
  suffix = f"_{tag}" if tag else ""
  step = condition_error.newest_step(workdir, suffix=suffix)
  if step is None:
    raise ValueError(f"{workdir} has no eval/<step>{suffix}.json: run --mode eval of it first"
                     + (f" with --config.eval.tag={tag}" if tag else ""))
  with open(os.path.join(workdir, "eval", f"{step}{suffix}.json")) as f:
    result = json.load(f)
  path = os.path.join(workdir, "eval", f"condition_error_{step}.json")
  if not os.path.exists(path):
    return result, None
  with open(path) as f:
    return result, json.load(f)


def newest_probe(workdir: str) -> dict | None:
  """The newest `probe/<step>.json` of `--mode probe`, or None."""
  folder = os.path.join(workdir, "probe")
  steps = [int(n[:-5]) for n in os.listdir(folder) if n[:-5].isdigit()] if os.path.isdir(folder) else []
  if not steps:
    return None
  with open(os.path.join(folder, f"{max(steps)}.json")) as f:
    return json.load(f)


def mean_std(values, fmt: str) -> str:
  """"m ± s" over the values (sample std), or the one value; "–" when none is known."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if len(v) == 0:
    return "–"
  if len(v) == 1:
    return f"{v[0]:{fmt}}"
  return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}"


def row(label: str, workdirs: list[str]) -> list[str]:
  """One table row: the label, the number of seeds, then `COLUMNS`."""
  evals = [newest_eval(w) for w in workdirs]
  get = lambda key, scale=1.0: [None if key not in e else scale * e[key] for e, _ in evals]
  served = [None if c is None else float(np.mean(c["variants"][c["served"]]["denoise_snr_db"]))
            for _, c in evals]
  fits = [c["score_by_step"]["fit"] for _, c in evals if c is not None and c["score_by_step"]["fit"]]
  decay = (f"{sum(f['decays'] for f in fits)}/{len(fits)} ({mean_std([f['beta'] for f in fits], '.2f')})"
           if fits else "–")
  probes = [newest_probe(w.partition("@")[0]) for w in workdirs]
  best = [None if p is None else 100.0 * p["best_top1"] for p in probes]
  return [label, str(len(workdirs)), mean_std(get("fd_clf"), ".2f"),
          mean_std(get("class_accuracy", 100.0), ".1f"),
          f"{mean_std(get('precision'), '.3f')} / {mean_std(get('recall'), '.3f')}",
          mean_std(get("memorization/nn_train_ratio"), ".3f"), mean_std(served, ".2f"), decay,
          mean_std(best, ".1f")]


def probe_table(groups: dict[str, list[str]]) -> str:
  """Markdown: linear-probe top-1 (%) per probed position, mean ± std over each group's seeds."""
  probes = {label: [newest_probe(w) for w in dirs] for label, dirs in groups.items()}
  found = [p for ps in probes.values() for p in ps if p is not None]
  if not found:
    raise ValueError("none of the runs has probe/<step>.json: run --mode probe of them first")
  positions = found[0]["positions"]
  lines = ["| run | seeds | " + " | ".join(f"position {p}" for p in positions) + " |",
           "|" + "---|" * (len(positions) + 2)]
  for label, ps in probes.items():
    if any(p is not None and p["positions"] != positions for p in ps):
      raise ValueError(f"{label}: probed at other positions than {positions}; compare runs probed "
                       "with the same probe.num_positions and sequence length")
    cells = [mean_std([None if p is None else 100.0 * p["top1"][i] for p in ps], ".1f")
             for i in range(len(positions))]
    lines.append(f"| {label} | {len(ps)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def table(groups: dict[str, list[str]]) -> str:
  """The Markdown table of {label: [workdir per seed]}."""
  lines = ["| run | seeds | " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * (len(COLUMNS) + 2)]
  lines += ["| " + " | ".join(row(label, dirs)) + " |" for label, dirs in groups.items()]
  return "\n".join(lines)


def parse_groups(argv: list[str]) -> dict[str, list[str]]:
  groups = {}
  for arg in argv:
    label, sep, dirs = arg.rpartition("=")
    if not sep or not label or not dirs:
      raise ValueError(f"{arg!r}: expected LABEL=WORKDIR[,WORKDIR...]")
    groups[label] = dirs.split(",")
  return groups


def main(argv: list[str]) -> None:
  if not argv or argv == ["--probe"]:
    raise SystemExit("usage: python -m ardiff_jax.evals.table [--probe] LABEL=WORKDIR[,WORKDIR...] ...")
  if argv[0] == "--probe":
    print(probe_table(parse_groups(argv[1:])))
  else:
    print(table(parse_groups(argv)))


if __name__ == "__main__":
  main(sys.argv[1:])
