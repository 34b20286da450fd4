"""The seeds table (evals/table.py): mean ± sample std over runs' evaluation files."""
import json
import os

import numpy as np
import pytest

from ardiff_jax.evals import table


def _run(root, name, fd, acc, snr, decays, step=1000):
  ev = os.path.join(root, name, "eval")
  os.makedirs(ev)
  with open(os.path.join(ev, f"{step}.json"), "w") as f:
    json.dump({"fd_clf": fd, "class_accuracy": acc, "precision": 0.5, "recall": 0.25,
               "memorization/nn_train_ratio": 1.0}, f)
  with open(os.path.join(ev, "10.json"), "w") as f:       # an older evaluation: not read
    json.dump({"fd_clf": 99.0}, f)
  with open(os.path.join(ev, f"condition_error_{step}.json"), "w") as f:
    json.dump({"served": "raw", "variants": {"raw": {"denoise_snr_db": [snr - 1, snr + 1]}},
               "score_by_step": {"fit": {"decays": decays, "beta": 0.8}}}, f)
  return os.path.join(root, name)


def test_rows_are_the_mean_and_sample_std_of_the_newest_evaluations(tmp_path):
  dirs = [_run(tmp_path, f"s{i}", fd, acc, snr, d)
          for i, (fd, acc, snr, d) in enumerate([(1.0, 0.9, 10.0, True), (2.0, 0.8, 12.0, False),
                                                 (4.0, 0.7, 14.0, True)])]
  got = table.row("MAR", dirs)
  fd = np.array([1.0, 2.0, 4.0])
  assert got[:3] == ["MAR", "3", f"{fd.mean():.2f} ± {fd.std(ddof=1):.2f}"]
  assert got[3] == "80.0 ± 10.0" and got[4] == "0.500 ± 0.000 / 0.250 ± 0.000"
  assert got[6] == "12.00 ± 2.00" and got[7] == "2/3 (0.80 ± 0.00)" and got[8] == "–"
  assert table.row("one", dirs[:1])[2] == "1.00"
  text = table.table(table.parse_groups([f"MAR, probe={','.join(dirs)}"]))
  assert text.splitlines()[2].startswith("| MAR, probe | 3 | 2.33 ± 1.53 |")


def test_a_tagged_evaluation_is_read_with_workdir_at_tag(tmp_path):
  run = _run(tmp_path, "r", 1.0, 0.9, 10.0, True)
  with open(os.path.join(run, "eval", "1000_steps8.json"), "w") as f:
    json.dump({"fd_clf": 7.0, "class_accuracy": 0.5}, f)
  assert table.row("untagged", [run])[2] == "1.00"
  assert table.row("8 steps", [run + "@steps8"])[2:4] == ["7.00", "50.0"]
  with pytest.raises(ValueError, match="eval.tag=steps12"):
    table.row("12 steps", [run + "@steps12"])


def test_bad_arguments_and_unevaluated_runs_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="expected LABEL=WORKDIR"):
    table.parse_groups(["no-label"])
  with pytest.raises(ValueError, match="run --mode eval"):
    table.row("x", [str(tmp_path)])


def test_probe_columns_average_each_position_over_seeds(tmp_path):
  dirs = []
  for i, top1 in enumerate([[0.1, 0.3], [0.2, 0.5]]):
    d = _run(tmp_path, f"s{i}", 1.0, 0.5, 10.0, True)
    os.makedirs(os.path.join(d, "probe"))
    for step, scale in ((1000, 1.0), (10, 0.0)):        # the older probe is not read
      with open(os.path.join(d, "probe", f"{step}.json"), "w") as f:
        json.dump({"positions": [31, 63], "top1": [scale * t for t in top1],
                   "best_top1": scale * max(top1)}, f)
    dirs.append(d)
  assert table.row("x", dirs)[8] == f"40.0 ± {np.std([30, 50], ddof=1):.1f}"
  lines = table.probe_table({"ST-AR": dirs}).splitlines()
  assert lines[0] == "| run | seeds | position 31 | position 63 |"
  assert lines[2] == f"| ST-AR | 2 | 15.0 ± 7.1 | 40.0 ± {np.std([30, 50], ddof=1):.1f} |"
