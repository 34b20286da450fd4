"""DD2 stage 1, AR-diffusion tuning with the ground-truth score (reference/dd2_paella.md §1.5):
the teacher's trunk (`methods/dd2_teacher.py`: an adapted LlamaGen run, `methods/dd2_adapt.py`,
or a causal AR + DiffLoss run) with a per-token DiffLoss MLP head that predicts a rectified-flow
velocity, trained data-free on sequences the teacher samples.

Each step, for B random classes y:
  x_0     ~ teacher(y) with its sampling settings (CFG `dd2.teacher_cfg`, top-k / top-p), tokens
            [B, L, C] (codebook vectors of the drawn codes; KV-cached sampling inside the step)
  t_i     ~ U(t_min, 1 − t_min) per token; x_t = (1 − t)x_0 + tε
  v_θ     = head(x_t, t, z_i), z = trunk([y, x_0 1..L−1])                    [B, L, C]
  target  = GTS (`dd2.gts`): (x_t − x̂_0)/t with x̂_0 the teacher's denoiser given the clean
            prefix x_0,<i — for a LlamaGen teacher the posterior mean of Eq. (1)'s codebook
            mixture under its law log p_i = log softmax(filter(uncond + w(cond − uncond))), so the
            target is the exact conditional velocity E[ε − x_0 | x_t, q_<i];
            Monte Carlo (gts=False, the ablation): ε − x_0
  L       = mean ‖v_θ − target‖²
Choices the paper leaves open, ours: the loss in velocity space (the paper writes ‖s_ψ − s_Φ‖²,
which is the velocity error weighted by ((1 − t)/t)², unbounded near t = 0); t uniform on
[t_min, 1 − t_min] per token; sequences sampled online each step rather than pre-generated; the
student is conditioned on the class without label dropout (the teacher's CFG is in its targets);
the head's first C outputs are the velocity (MAR's head is 2C wide).
Sampling (`sampling/dd2.py`): per token `dd2.euler_steps` Euler steps (DD2 reports 10), then the
teacher's decoder (codes: each token snapped to its nearest entry).
Warm start: every weight of the teacher run (`dd2.teacher_workdir`) except its logit layer (or
DiffLoss head); the velocity head starts fresh (its last layer at zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ardiff_jax.diffusion import rectified_flow as rf
from ardiff_jax.methods import Method
from ardiff_jax.methods import dd2_adapt
from ardiff_jax.methods import dd2_teacher
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.sampling import dd2 as dd2_sampling


def dd2_tune_config() -> ml_collections.ConfigDict:
  d = dd2_adapt.dd2_adapt_config()
  d.teacher_kind = "llamagen"     # or "ar_diffusion" (methods/dd2_teacher.py)
  d.teacher_workdir = ""          # the teacher run (configs/dd2_adapt_*.py or ar_diffusion_*.py)
  d.gts = True                    # False: the Monte-Carlo target ε − x_0 (the paper's ablation)
  d.t_min = 1e-3
  d.teacher_cfg = 2.0             # the teacher's sampling settings that shape p (DD2 E.3: 2.0)
  d.teacher_top_k = 0
  d.teacher_top_p = 1.0
  d.teacher_temperature = 1.0
  d.score_chunk = 4096            # codebook rows per chunk of Eq. (1)
  d.euler_steps = 10              # sampling: Euler steps per token
  d.head_width = 1024
  d.head_depth = 6
  return d


def make_method(config: ml_collections.ConfigDict) -> Method:
  d = config.dd2
  teacher = dd2_teacher.make_teacher(config)
  model = teacher.student
  seq_len = teacher.seq_len
  null = config.data.num_classes

  def init_params(rng):
    return model.init(rng, method=gpt_lib.GPT.init_all)["params"]

  def loss_fn(params, batch, rng, step, extras, frozen=None):
    del step
    r_label, r_sample, r_t, r_eps, r_dropout = jax.random.split(rng, 5)
    b = batch["label"].shape[0]
    labels = jax.random.randint(r_label, (b,), 0, null)        # data-free: random classes
    x0 = jax.lax.stop_gradient(teacher.sample(frozen, labels, r_sample))       # [B, L, C]
    t = jax.random.uniform(r_t, (b, seq_len), minval=d.t_min, maxval=1.0 - d.t_min)
    eps = jax.random.normal(r_eps, x0.shape)
    xt = rf.interpolate(x0, eps, t)
    if d.gts:
      x_hat = teacher.denoise(frozen, teacher.posterior(frozen, x0, labels), xt, t)
      target = jax.lax.stop_gradient(rf.velocity_from_denoised(x_hat, xt, t))
    else:
      target = eps - x0
    z = model.apply({"params": params}, x0, labels, deterministic=False, rngs={"dropout": r_dropout})
    v = dd2_sampling.head_velocity(model, params, xt.reshape(b * seq_len, -1), t.reshape(-1),
                                   z.reshape(b * seq_len, -1)).reshape(x0.shape)
    loss = jnp.mean(jnp.square(v - target))
    return loss, {"target_norm": jnp.mean(jnp.square(target))}, extras

  def generate_tokens(params, frozen, batch, rng):
    """labels [B] -> tokens [B, L, C]: `dd2.euler_steps` Euler steps per token."""
    del frozen
    return dd2_sampling.sample_euler_ar(model, params, batch["label"], rng, int(d.euler_steps))

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3]."""
    return teacher.decode(frozen, generate_tokens(params, frozen, batch, rng))

  return Method(name="dd2_tune", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("label",), generate=generate, generate_from="labels",
                load_frozen=teacher.load_frozen, init_frozen=teacher.init_frozen,
                loss_reads_frozen=True, warm_start=teacher.student_init,
                generate_tokens=generate_tokens)
