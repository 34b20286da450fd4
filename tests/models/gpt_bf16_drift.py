"""Relative drift of the GPT trunk's output between float32 and bfloat16 compute, at GPT-XL depth.

    python -m tests.models.gpt_bf16_drift [--preset gpt_xl] [--tokens 16] [--batch 2]

Random LlamaGen init (N(0, 0.02)), the same weights for both runs; prints
‖z_bf16 − z_f32‖ / ‖z_f32‖ over the final normalised hidden states [B, L, D] and per layer depth.
The README quotes its output before and after the residual stream was kept in float32.
"""
import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ardiff_jax.models import gpt  # noqa: E402


def drift(preset: str, tokens: int, batch: int, seed: int = 0) -> float:
  kwargs = dict(token_dim=16, seq_len=tokens, num_classes=1000, dropout=0.0)
  model32 = gpt.make_gpt(preset, **kwargs)
  model16 = gpt.make_gpt(preset, **kwargs, dtype=jnp.bfloat16)
  params = jax.jit(lambda k: model32.init(k, method=gpt.GPT.init_all)["params"])(jax.random.key(seed))
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, tokens, 16)), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32)
  z32 = jax.jit(lambda p: model32.apply({"params": p}, x, labels))(params)
  z16 = jax.jit(lambda p: model16.apply({"params": p}, x, labels))(params)
  return float(jnp.linalg.norm(z16.astype(jnp.float32) - z32) / jnp.linalg.norm(z32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpt_xl")
  parser.add_argument("--tokens", type=int, default=16)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  depth = gpt.PRESETS[args.preset]["depth"]
  print(f"{args.preset} ({depth} blocks), {args.tokens} tokens, batch {args.batch}: relative "
        f"bf16-vs-f32 drift of the trunk output {drift(args.preset, args.tokens, args.batch):.3e}")


if __name__ == "__main__":
  main()
