"""The layer contract in pyproject.toml catches what it is meant to catch.

`make test` runs `lint-imports` on the package itself; here, a copy of the package with one planted
import must break it, so the check cannot pass vacuously.
"""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=root)
  return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.fixture
def package_copy(tmp_path):
  shutil.copytree(os.path.join(REPO, "ardiff_jax"), tmp_path / "ardiff_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
  return tmp_path


def _plant(root, module: str, imported: str) -> None:
  with open(root / (module.replace(".", "/") + ".py"), "a") as f:
    f.write(f"\n\ndef _planted():\n  import {imported}  # noqa\n")


def test_the_package_keeps_its_contract(package_copy):
  r = _lint(str(package_copy))
  assert r.returncode == 0, r.stdout[-3000:]
  assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module,imported,message", [
    # An engine module calling a mode (the periodic evaluation must come in as a callback).
    ("ardiff_jax.train.loop", "ardiff_jax.modes.eval",
     "ardiff_jax.train is not allowed to import ardiff_jax.modes"),
    # A method reaching up into the evaluator.
    ("ardiff_jax.methods.mar", "ardiff_jax.evals.features",
     "ardiff_jax.methods is not allowed to import ardiff_jax.evals"),
    # A cycle inside one layer: condref already imports ot_refine.
    ("ardiff_jax.methods.ot_refine", "ardiff_jax.methods.condref", "No cycles are allowed"),
])
def test_a_planted_import_breaks_the_contract(package_copy, module, imported, message):
  _plant(package_copy, module, imported)
  r = _lint(str(package_copy))
  assert r.returncode != 0
  assert message in r.stdout, r.stdout[-3000:]
