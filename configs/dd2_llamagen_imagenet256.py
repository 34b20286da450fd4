"""DD2 on ImageNet 256 with a LlamaGen teacher (reference/dd2_paella.md §1.5–1.7): the paper's
LlamaGen-L setting, one stage per `stage`, each on the teacher's own config
(`configs/llamagen_imagenet256.py:model=<model>`, so every shape fits its weights).

  stage=adapt   the LlamaGen run (`teacher`) made to read VQ-16's 8-wide codebook vectors: an MLP
                fitted to its code table, then 200k AR iterations at lr 1e-4 (`dd2_adapt`; DD2
                gives the length, not the rate or batch: LlamaGen's 1e-4 and 256)
  stage=tune    AR-diffusion tuning with the GTS loss from the adapted run (`adapt`): 100k
                iterations, batch 512, lr 1e-4, a MAR-style head 1024 wide and 6 deep, 10 Euler
                steps per token (`dd2_tune`)
  stage=distil  the one-step generator (`dd2`): G and ψ from the tuned run (`tune`), K = 5, 12k
                G iterations (60k ψ) at batch 1024, lr 1e-4 (G) and 2e-4 (ψ) warmed up from 1e-6
                over 8k G / 40k ψ iterations, Adam 0.9/0.95, SiD α = 1, progressive EMA
The teacher's law everywhere: CFG 2.0, top-p 1.0, top-k 8,000 (DD2 gives 8,000 in App. B.4 and
E.5 and 900 in E.3; ours the former, `--config.dd2.teacher_top_k` to change). DD2 reaches batch
1024 by accumulating 8 micro-batches; ours runs the batch in one step (sharded over the mesh;
`--config.train.grad_accum_steps` where memory asks, see `methods/dd2.py` for ψ under it).
Paper (FID-50k): the teacher LlamaGen-L 4.11 at 256 steps, DD2 one step 8.59 (7.58 trained
longer), stage 1 with 10 Euler steps 15.66 (FID-5k).
Args: model (b | l | xl | xxl | 3b; the paper's is l), stage, vq, cache, teacher, adapt, tune,
batch (default per stage as above), steps (default per stage).
"""
import os

from ardiff_jax import configlib
from ardiff_jax.presets import use_dd2_adapt, use_dd2_distil, use_dd2_tune

STEPS = {"adapt": 200_000, "tune": 100_000, "distil": 12_000}
BATCH = {"adapt": 256, "tune": 512, "distil": 1024}


def get_config(arg=None):
  a = configlib.parse_arg(arg, model="l", stage="distil", vq="workdirs/vq16",
                          cache="workdirs/vq16/cache", teacher="workdirs/llamagen_l",
                          adapt="workdirs/dd2_adapt_l", tune="workdirs/dd2_tune_l", batch=0,
                          steps=0)
  if a.stage not in STEPS:
    raise ValueError(f"stage={a.stage!r}: choose one of {sorted(STEPS)}")
  batch = a.batch or BATCH[a.stage]
  teacher_config = os.path.join(os.path.dirname(__file__), "llamagen_imagenet256.py")
  c = configlib.load_config(teacher_config, f"model={a.model},batch={batch},vq={a.vq},"
                                            f"cache={a.cache}")
  c.train.num_steps = a.steps or STEPS[a.stage]
  c.train.ckpt_every = 2000
  if a.stage == "adapt":
    use_dd2_adapt(c, a.teacher, short_run=False)
  elif a.stage == "tune":
    use_dd2_tune(c, a.adapt, gts=True, short_run=False)
  else:
    use_dd2_distil(c, a.adapt, a.tune, init_g=True, init_psi=True, short_run=False)
  if a.stage != "adapt":
    c.dd2.teacher_top_k = 8000
  return c
