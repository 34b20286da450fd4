"""T5 encoder (HF T5EncoderModel semantics) against an independent float64 NumPy implementation.

`reference_encoder` and `random_hf_state_dict` work on Hugging Face tensor names and layouts
([out, in] Linear weights); tests/convert/test_t5_convert.py reuses them.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ardiff_jax.models import t5

# Tiny sizes; 8 buckets with max_distance 6 reach the exact, the log and the capped range at T = 11.
TINY = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=6,
            layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dropout_rate=0.1)

# google/byt5-xl's config.json (encoder-relevant keys as published, plus the usual extras).
BYT5_XL = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 6720, "d_kv": 64, "d_model": 2560,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 12, "num_heads": 32,
    "num_layers": 36, "pad_token_id": 0, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "tokenizer_class": "ByT5Tokenizer", "vocab_size": 384,
}
BYT5_XL_ENCODER_PARAMS = 2_614_091_264


def bucket_loop(q_len, k_len, num_buckets, max_distance):
  """T5's bidirectional bucket, one (query, key) pair at a time, in Python float64."""
  out = np.zeros((q_len, k_len), np.int64)
  half = num_buckets // 2
  max_exact = half // 2
  for i in range(q_len):
    for j in range(k_len):
      rel = j - i
      b = half if rel > 0 else 0
      n = abs(rel)
      if n < max_exact:
        b += n
      else:
        b += min(max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                                 * (half - max_exact)), half - 1)
      out[i, j] = b
  return out


def hf_shapes(cfg):
  """{HF encoder tensor name: shape} of a T5 config."""
  d, h, k, f = cfg["d_model"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"]
  shapes = {"shared.weight": (cfg["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                (cfg.get("relative_attention_num_buckets", 32), h)}
  ffn = ("wi_0", "wi_1") if cfg["feed_forward_proj"] == "gated-gelu" else ("wi",)
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    shapes[p + "0.layer_norm.weight"] = (d,)
    shapes[p + "1.layer_norm.weight"] = (d,)
    for n in "qkv":
      shapes[p + f"0.SelfAttention.{n}.weight"] = (h * k, d)
    shapes[p + "0.SelfAttention.o.weight"] = (d, h * k)
    for n in ffn:
      shapes[p + f"1.DenseReluDense.{n}.weight"] = (f, d)
    shapes[p + "1.DenseReluDense.wo.weight"] = (d, f)
  return shapes


def random_hf_state_dict(cfg, seed=0):
  """Random non-zero float32 tensors under HF names: norms around 1, the rest ~ N(0, 0.3²)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in hf_shapes(cfg).items():
    if name.endswith("layer_norm.weight"):
      sd[name] = 1.0 + 0.3 * rng.normal(size=shape)
    elif name == "shared.weight":
      sd[name] = rng.normal(size=shape)
    else:
      sd[name] = 0.3 * rng.normal(size=shape)
    sd[name] = sd[name].astype(np.float32)
  return sd


def reference_encoder(sd, cfg, ids, mask=None):
  """float64 HF T5EncoderModel.last_hidden_state [B, T, D] from HF-named tensors."""
  w = lambda n: np.asarray(sd[n], np.float64)
  h_, k_ = cfg["num_heads"], cfg["d_kv"]
  eps = cfg.get("layer_norm_epsilon", 1e-6)
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  b, t = ids.shape
  x = w("shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight")[ids]
  buckets = bucket_loop(t, t, cfg.get("relative_attention_num_buckets", 32),
                        cfg.get("relative_attention_max_distance", 128))
  bias = w("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")[buckets]
  bias = bias.transpose(2, 0, 1)[None]                                       # [1, H, T, T]
  if mask is not None:
    bias = bias + np.where(mask, 0.0, float(np.finfo(np.float32).min))[:, None, None, :]
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    h = rms(x, w(p + "0.layer_norm.weight"))
    q, k, v = ((h @ w(p + f"0.SelfAttention.{n}.weight").T).reshape(b, t, h_, k_) for n in "qkv")
    s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias                            # no 1/sqrt(d_kv)
    e = np.exp(s - s.max(-1, keepdims=True))
    a = e / e.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, h_ * k_)
    x = x + o @ w(p + "0.SelfAttention.o.weight").T
    h = rms(x, w(p + "1.layer_norm.weight"))
    if cfg["feed_forward_proj"] == "gated-gelu":
      g = h @ w(p + "1.DenseReluDense.wi_0.weight").T
      g = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
      ff = g * (h @ w(p + "1.DenseReluDense.wi_1.weight").T)
    else:
      ff = np.maximum(h @ w(p + "1.DenseReluDense.wi.weight").T, 0.0)
    x = x + ff @ w(p + "1.DenseReluDense.wo.weight").T
  return rms(x, w("encoder.final_layer_norm.weight"))


def params_from_hf(sd, cfg):
  """Our parameter tree from HF-named tensors (written here independently of models/t5_checkpoint.py)."""
  ffn = ("wi_0", "wi_1") if cfg["feed_forward_proj"] == "gated-gelu" else ("wi",)
  params = {"shared": {"embedding": sd["shared.weight"]},
            "relative_attention_bias":
                sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
            "final_layer_norm": {"weight": sd["encoder.final_layer_norm.weight"]}}
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    params[f"block_{i}"] = {
        "attention_norm": {"weight": sd[p + "0.layer_norm.weight"]},
        "attention": {n: {"kernel": sd[p + f"0.SelfAttention.{n}.weight"].T} for n in "qkvo"},
        "ffn_norm": {"weight": sd[p + "1.layer_norm.weight"]},
        "ffn": {n: {"kernel": sd[p + f"1.DenseReluDense.{n}.weight"].T} for n in ffn + ("wo",)},
    }
  return params


def _ids_and_mask(seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY["vocab_size"], size=(2, 11)).astype(np.int32)
  ids[1, 7:] = 0                                              # row 1: 7 tokens, 4 pads
  return ids, ids != 0


def test_relative_position_buckets_match_loop():
  for args in [(11, 11, 8, 6), (5, 9, 32, 128), (9, 5, 32, 128), (3, 400, 32, 128),
               (300, 40, 32, 128), (70, 70, 16, 20)]:
    got = t5.relative_position_buckets(*args)
    assert got.dtype == np.int32 and got.shape == args[:2]
    np.testing.assert_array_equal(got, bucket_loop(*args), err_msg=str(args))
  b = t5.relative_position_buckets(1, 400)[0]                  # query 0, keys after it
  assert b[0] == 0 and b[1] == 17 and b[7] == 23 and b[8] == 24 and b[399] == 31
  b = t5.relative_position_buckets(400, 1)[:, 0]               # keys before the query
  assert b[1] == 1 and b[8] == 8 and b[399] == 15


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_forward_matches_numpy(proj):
  cfg = {**TINY, "feed_forward_proj": proj}
  model = t5.encoder_from_config(cfg)
  ids, mask = _ids_and_mask()
  variables = model.init(jax.random.key(0), ids, mask)
  ours = traverse_util.flatten_dict(nn.unbox(variables["params"]))
  sd = random_hf_state_dict(cfg)
  params = params_from_hf(sd, cfg)
  theirs = traverse_util.flatten_dict(params)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert got.dtype == jnp.float32 and got.shape == (2, 11, TINY["d_model"])
  want = reference_encoder(sd, cfg, ids, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  # Padding keys do not reach the real rows: row 1 equals its 7-token sequence alone.
  alone = model.apply({"params": params}, jnp.asarray(ids[1:, :7]))
  np.testing.assert_allclose(np.asarray(got[1, :7]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
  # Without a mask, the pads are attended to and row 1 changes.
  unmasked = model.apply({"params": params}, jnp.asarray(ids))
  assert np.abs(np.asarray(unmasked[1, :7]) - np.asarray(alone[0])).max() > 1e-3


def test_dropout_and_bf16_compute():
  model = t5.encoder_from_config(TINY)
  ids, mask = _ids_and_mask()
  params = params_from_hf(random_hf_state_dict(TINY), TINY)
  ref = model.apply({"params": params}, ids, mask)
  drop = model.apply({"params": params}, ids, mask, deterministic=False,
                     rngs={"dropout": jax.random.key(3)})
  assert np.abs(np.asarray(drop) - np.asarray(ref)).max() > 1e-3
  bf16 = t5.encoder_from_config(TINY, dtype=jnp.bfloat16).apply({"params": params}, ids, mask)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(ref), atol=0.15)


def test_logical_axis_names():
  model = t5.encoder_from_config(TINY)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  names = {k: v.names for k, v in traverse_util.flatten_dict(boxed).items()}
  assert names[("shared", "embedding")] == ("vocab", "embed")
  assert names[("relative_attention_bias",)] == (None, None)
  assert names[("final_layer_norm", "weight")] == ("norm",)
  for n in "qkv":
    assert names[("block_1", "attention", n, "kernel")] == ("embed", "heads")
  assert names[("block_1", "attention", "o", "kernel")] == ("heads", "embed")
  assert names[("block_0", "ffn", "wi_0", "kernel")] == names[("block_0", "ffn", "wi_1", "kernel")] \
      == ("embed", "mlp")
  assert names[("block_0", "ffn", "wo", "kernel")] == ("mlp", "embed")
  assert names[("block_0", "ffn_norm", "weight")] == ("norm",)


def test_byt5_xl_config_sizes_and_parameter_count():
  model = t5.encoder_from_config(BYT5_XL)
  sizes = (model.d_model, model.d_kv, model.d_ff, model.num_layers, model.num_heads)
  assert sizes == (2560, 64, 6720, 36, 32)
  assert (model.vocab_size, model.feed_forward_proj) == (384, "gated-gelu")
  assert model.relative_attention_max_distance == 128       # absent from ByT5's file: HF default
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
  v, d, k, h, f, layers, buckets = 384, 2560, 64, 32, 6720, 36, 32
  closed = v * d + buckets * h + d + layers * (4 * d * h * k + 3 * d * f + 2 * d)
  assert n == closed == BYT5_XL_ENCODER_PARAMS
  out = jax.eval_shape(model.apply, abstract, jnp.zeros((2, 768), jnp.int32))
  assert out.shape == (2, 768, 2560) and out.dtype == jnp.float32


def test_config_errors():
  with pytest.raises(ValueError, match="feed_forward_proj='gated-swish'"):
    t5.encoder_from_config({**TINY, "feed_forward_proj": "gated-swish"})
  with pytest.raises(ValueError, match=r"lacks \['d_kv'\]"):
    t5.encoder_from_config({k: v for k, v in TINY.items() if k != "d_kv"})
  with pytest.raises(ValueError, match="umt5"):
    t5.encoder_from_config({**TINY, "model_type": "umt5"})
  small = t5.encoder_from_config({"vocab_size": 384, "d_model": 1472, "d_kv": 64, "d_ff": 3584,
                                  "num_layers": 12, "num_heads": 6})
  assert small.feed_forward_proj == "relu" and small.relative_attention_num_buckets == 32
