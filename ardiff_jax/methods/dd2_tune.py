"""DD2 stage 1, AR-diffusion tuning with the ground-truth score (reference/dd2_paella.md §1.5):
the adapted teacher's trunk (`methods/dd2_adapt.py`) with a per-token DiffLoss MLP head that
predicts a rectified-flow velocity, trained data-free on sequences the teacher samples.

Each step, for B random classes y:
  q       ~ teacher(y) with its sampling settings (CFG `dd2.teacher_cfg`, top-k / top-p), as codes,
            fed as codebook vectors x_0 = c_q [B, L, C] (KV-cached sampling inside the step)
  log p_i = log softmax(filter(uncond + w(cond − uncond)))  of the teacher at every position,
            teacher-forced on x_0 (its clean prefix)                         [B, L, V]
  t_i     ~ U(t_min, 1 − t_min) per token; x_t = (1 − t)x_0 + tε
  v_θ     = head(x_t, t, z_i), z = trunk([y, x_0 1..L−1])                    [B, L, C]
  target  = GTS (`dd2.gts`): the velocity of Eq. (1)'s score, v(s(x_t, t, p_i)) — the exact
            conditional velocity E[ε − x_0 | x_t, q_<i] under the teacher's law;
            Monte Carlo (gts=False, the ablation): ε − x_0
  L       = mean ‖v_θ − target‖²
Choices the paper leaves open, ours: the loss in velocity space (the paper writes ‖s_ψ − s_Φ‖²,
which is the velocity error weighted by ((1 − t)/t)², unbounded near t = 0); t uniform on
[t_min, 1 − t_min] per token; sequences sampled online each step rather than pre-generated; the
student is conditioned on the class without label dropout (the teacher's CFG is in its targets);
the head's first C outputs are the velocity (MAR's head is 2C wide).
Sampling (`sampling/dd2.py`): per token `dd2.euler_steps` Euler steps (DD2 reports 10), the tokens
snapped to the nearest code for the VQ decoder.
Warm start: every weight of the adapted teacher run (`dd2.teacher_workdir`) except its logit layer;
the head starts fresh (its last layer at zero).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ardiff_jax.methods import Method
from ardiff_jax.methods import dd2_adapt
from ardiff_jax.methods import reconstruction as rec_lib
from ardiff_jax.methods import vq_tokenizer
from ardiff_jax.diffusion import rectified_flow as rf
from ardiff_jax.models import gpt as gpt_lib
from ardiff_jax.sampling import dd2 as dd2_sampling
from ardiff_jax.sampling.llamagen import filter_logits, sample_codes


def dd2_tune_config() -> ml_collections.ConfigDict:
  d = dd2_adapt.dd2_adapt_config()
  d.teacher_workdir = ""          # the adapted teacher run (configs/dd2_adapt_*.py)
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


def teacher_log_probs(teacher: gpt_lib.GPT, params, vectors: jax.Array, labels: jax.Array,
                      null: int, cfg: float, top_k: int, top_p: float, temperature: float
                      ) -> jax.Array:
  """The teacher's next-code law at every position, teacher-forced on codebook vectors
  [B, L, C]: CFG on the logits (LlamaGen: uncond + w(cond − uncond)), temperature, top-k /
  top-p -> log-probabilities [B, L, V] (−inf where filtered)."""
  logits_of = lambda y: teacher.apply({"params": params},
                                      teacher.apply({"params": params}, vectors, y),
                                      method=gpt_lib.GPT.logits)
  logits = logits_of(labels)
  if cfg > 1.0:
    uncond = logits_of(jnp.full_like(labels, null))
    logits = uncond + cfg * (logits - uncond)
  b, l, v = logits.shape
  logits = filter_logits(logits.reshape(b * l, v) / max(temperature, 1e-5), top_k, top_p)
  return jax.nn.log_softmax(logits, axis=-1).reshape(b, l, v)


def build_model(config: ml_collections.ConfigDict) -> gpt_lib.GPT:
  """The teacher's trunk over codebook vectors with a DiffLoss head of the vectors' width."""
  c = vq_tokenizer.build_vq(config.tokenizer).embed_dim
  return dd2_adapt.build_model(config).clone(vocab_size=0, token_dim=c, input_dim=c,
                                             head_width=config.dd2.head_width,
                                             head_depth=config.dd2.head_depth)


def load_teacher(workdir: str, restore_run_params):
  """The adapted teacher run's parameters (`configs/dd2_adapt_*.py`), checked to be one."""
  if not workdir:
    raise ValueError("dd2.teacher_workdir is empty: point it at the adapted teacher run "
                     "(configs/dd2_adapt_*.py)")
  params = restore_run_params(workdir)
  if "tok_mlp" not in params or "output" not in params:
    raise ValueError(f"dd2.teacher_workdir={workdir!r} is not an adapted teacher run "
                     f"(configs/dd2_adapt_*.py): its parameters hold {sorted(params)}")
  return params


def frozen_teacher_and_vq(config: ml_collections.ConfigDict):
  """(load_frozen, init_frozen, table_of, decode) shared by DD2's stages: the frozen weights are
  {"vq": the tokenizer's, "teacher": the adapted teacher's}; table_of(vq params) -> the codebook
  vectors [V, C]; decode(vq params, tokens [B, L, C]) -> uint8 images [B, H, W, 3], each token
  snapped to its nearest code."""
  teacher = dd2_adapt.build_model(config)
  vq = vq_tokenizer.build_vq(config.tokenizer)
  side, _, vocab = vq_tokenizer.code_geometry(config)
  ids = jnp.arange(vocab)
  table_of = lambda vq_params: vq.apply({"params": vq_params}, ids, method=vq.embed_codes)

  def load_frozen(restore_run_params):
    vq_run = restore_run_params(config.llamagen.tokenizer_workdir)
    return {"vq": vq_run["vq"], "teacher": load_teacher(config.dd2.teacher_workdir,
                                                        restore_run_params)}

  def init_frozen(rng):
    r_vq, r_teacher = jax.random.split(rng)
    size = config.data.image_size
    return {"vq": nn.meta.unbox(vq.init(r_vq, jnp.zeros((1, size, size, 3)))["params"]),
            "teacher": nn.meta.unbox(teacher.init(r_teacher, method=gpt_lib.GPT.init_all)["params"])}

  def decode(vq_params, tokens):
    codes = dd2_sampling.nearest_codes(tokens, table_of(vq_params))
    images = vq.apply({"params": vq_params}, codes.reshape(-1, side, side), method=vq.decode_codes)
    return rec_lib.to_uint8(jnp.clip(images, -1, 1))

  return load_frozen, init_frozen, table_of, decode


def check_warm_shapes(params, fresh, field: str, workdir: str) -> None:
  """Raises when a run's parameters do not fit this config's model (built with other arguments)."""
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(params) != shapes(fresh):
    raise ValueError(f"{field}={workdir!r} does not match this config's llamagen and dd2 sections: "
                     "build this config with that run's arguments")


def make_method(config: ml_collections.ConfigDict) -> Method:
  d = config.dd2
  model = build_model(config)
  teacher = dd2_adapt.build_model(config)
  _, seq_len, _ = vq_tokenizer.code_geometry(config)
  null = config.data.num_classes
  load_frozen, init_frozen, table_of, decode = frozen_teacher_and_vq(config)

  def init_params(rng):
    return model.init(rng, method=gpt_lib.GPT.init_all)["params"]

  def warm_start(fresh, restore_run_params):
    params = {k: v for k, v in load_teacher(d.teacher_workdir, restore_run_params).items()
              if k != "output"}
    for k in fresh:
      if k not in params:
        params[k] = fresh[k]               # the DiffLoss head
    check_warm_shapes(params, fresh, "dd2.teacher_workdir", d.teacher_workdir)
    return params

  def loss_fn(params, batch, rng, step, extras, frozen=None):
    del step
    r_label, r_sample, r_t, r_eps, r_dropout = jax.random.split(rng, 5)
    b = batch["label"].shape[0]
    labels = jax.random.randint(r_label, (b,), 0, null)        # data-free: random classes
    table = table_of(frozen["vq"])
    codes = sample_codes(teacher, frozen["teacher"], labels, r_sample,
                         cfg_scale=float(d.teacher_cfg), temperature=float(d.teacher_temperature),
                         top_k=int(d.teacher_top_k), top_p=float(d.teacher_top_p),
                         token_table=table)
    x0 = jax.lax.stop_gradient(table[codes])                                   # [B, L, C]
    t = jax.random.uniform(r_t, (b, seq_len), minval=d.t_min, maxval=1.0 - d.t_min)
    eps = jax.random.normal(r_eps, x0.shape)
    xt = rf.interpolate(x0, eps, t)
    if d.gts:
      log_p = teacher_log_probs(teacher, frozen["teacher"], x0, labels, null, float(d.teacher_cfg),
                                int(d.teacher_top_k), float(d.teacher_top_p),
                                float(d.teacher_temperature))
      target = jax.lax.stop_gradient(rf.mixture_velocity(xt, t, log_p, table, int(d.score_chunk)))
    else:
      target = eps - x0
    z = model.apply({"params": params}, x0, labels, deterministic=False, rngs={"dropout": r_dropout})
    v = dd2_sampling.head_velocity(model, params, xt.reshape(b * seq_len, -1), t.reshape(-1),
                                   z.reshape(b * seq_len, -1)).reshape(x0.shape)
    loss = jnp.mean(jnp.square(v - target))
    return loss, {"target_norm": jnp.mean(jnp.square(target))}, extras

  def generate(params, frozen, batch, rng):
    """Class-conditional samples: labels [B] -> uint8 images [B, H, W, 3]."""
    tokens = dd2_sampling.sample_euler_ar(model, params, batch["label"], rng, int(d.euler_steps))
    return decode(frozen["vq"], tokens)

  return Method(name="dd2_tune", model=model, init_params=init_params, loss_fn=loss_fn,
                batch_keys=("label",), generate=generate, generate_from="labels",
                load_frozen=load_frozen, init_frozen=init_frozen, loss_reads_frozen=True,
                warm_start=warm_start)
