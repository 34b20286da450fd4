"""The colab/ notebooks: valid, compilable, and (slow) they run end to end on the tiny digits chain."""
import glob
import json
import os
import sys
import types

import pytest

from tests.helpers import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def _code_cells(path):
  """Source of each code cell, without IPython magics and shell lines (`%pip`, `!ls`)."""
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  return ["".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
          for cell in nb["cells"] if cell["cell_type"] == "code"]


def test_there_are_notebooks_for_training_and_sampling():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"train_digits_demo.ipynb", "sample_from_checkpoint.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_cells_compile(path):
  for i, source in enumerate(_code_cells(path)):
    compile(source, f"{os.path.basename(path)}[cell {i}]", "exec")
  assert not any("outputs" in c and c["outputs"] for c in json.load(open(path))["cells"])


def _run_notebook(path, overrides, monkeypatch):
  """Executes the code cells in one namespace; `overrides` replace the settings of the first cell.

  IPython's display is replaced by a recorder of the image paths it was asked to show."""
  shown = []
  display = types.ModuleType("IPython.display")
  display.Image = lambda path: path
  display.display = lambda obj: shown.append(obj)
  ipython = types.ModuleType("IPython")
  ipython.get_ipython = lambda: None     # matplotlib asks for the shell (there is none)
  ipython.version_info = (9, 0, 0)       # and the version (a current one: no legacy shims)
  monkeypatch.setitem(sys.modules, "IPython", ipython)
  monkeypatch.setitem(sys.modules, "IPython.display", display)
  namespace = {}
  for i, source in enumerate(_code_cells(path)):
    exec(compile(source, f"{path}[{i}]", "exec"), namespace)  # pylint: disable=exec-used
    if i == 0:
      namespace.update(overrides)
  return namespace, shown


@pytest.mark.slow
def test_notebooks_train_then_sample_the_tiny_digits_chain(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("ARDIFF_JAX_CACHE", str(tmp_path / "cache"))
  work = str(tmp_path / "work")
  ns, shown = _run_notebook(os.path.join(REPO, "colab", "train_digits_demo.ipynb"),
                            {"WORKDIR": work, "TINY": True}, monkeypatch)
  assert len(shown) == 2 and all(os.path.exists(p) for p in shown)
  assert 0 <= ns["result"]["class_accuracy"] <= 1
  monkeypatch.chdir(tmp_path)
  ns, shown = _run_notebook(os.path.join(REPO, "colab", "sample_from_checkpoint.ipynb"),
                            {"WORKDIR": os.path.join(work, "mar")}, monkeypatch)
  assert ns["images"].shape[0] == 10 * ns["PER_CLASS"] and shown == ["samples.png"]
