"""The resolved `config.json` of every shipped config (with its main argument variants), frozen.

`tests/test_configs.py` checks each config against `tests/fixtures/configs.json`, so moving code
between modules cannot change what a run is configured to do. After an intended change of a
config's values, rewrite the file and review its diff:

    python -m tests.config_fixtures
"""
from __future__ import annotations

import glob
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "configs.json")

# (config name, argument string or None): the defaults of every file, plus the variants the README,
# the Makefile and the tests use.
VARIANTS = (
    ("kl_digits", "tiny"),
    ("vq_digits", "tiny"),
    ("vq_digits", "f=4"),
    ("llamagen_digits", "tiny"),
    ("llamagen_imagenet256", "model=xl"),
    ("kl_cifar10", "preset=kl_tiny,disc=false"),
    ("mar_digits", "tiny"),
    ("mar_digits", "condref=runtime"),
    ("ar_diffusion_digits", "tiny"),
    ("ar_diffusion_digits", "condref=loss,order=random"),
    ("mar_cifar10", "tok=kl_tiny,cpu"),
    ("ar_diffusion_cifar10", "tok=kl_tiny,cpu"),
    ("vq_cifar10", "preset=vq_tiny,disc=false"),
    ("llamagen_cifar10", "tok=vq_tiny,cpu"),
    ("llamagen_cifar10", "tok=vq_tiny,cpu,st_ar"),
    ("llamagen_imagenet256", "st_ar"),
    ("mar_imagenet256", "model=huge"),
    ("ar_diffusion_imagenet256", "model=b"),
)


def config_names() -> list[str]:
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                if not os.path.basename(p).startswith("_"))


def cases() -> list[tuple[str, str | None]]:
  return [(name, None) for name in config_names()] + list(VARIANTS)


def key(name: str, arg: str | None) -> str:
  return name if arg is None else f"{name}:{arg}"


def resolve(name: str, arg: str | None) -> dict:
  """What `--config configs/<name>.py[:arg]` writes to config.json, as plain JSON values."""
  from ardiff_jax import configlib  # pylint: disable=g-import-not-at-top
  config = configlib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)
  return json.loads(json.dumps(configlib.to_dict(config), default=str))


def main():
  table = {key(n, a): resolve(n, a) for n, a in cases()}
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  with open(FIXTURE, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {len(table)} resolved configs to {FIXTURE}")


if __name__ == "__main__":
  main()
