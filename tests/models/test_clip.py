"""CLIP towers (HF CLIPModel semantics) read from a Hugging Face folder, against an independent
float64 NumPy CLIP on the very tensors written; CLIP's BPE tokenizer on a hand-made vocabulary."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ardiff_jax.data import clip_bpe
from ardiff_jax.models import clip, clip_checkpoint
from tests.helpers import write_hf_folder

TEXT = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, hidden_act="gelu", layer_norm_eps=1e-5)
VISION = dict(image_size=12, patch_size=4, hidden_size=20, intermediate_size=28, num_hidden_layers=2,
              num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CONFIG = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 8,
          "text_config": TEXT, "vision_config": VISION, "logit_scale_init_value": 2.6592}
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json (the sizes), Paella's CLIP-H.
CLIP_H = {"model_type": "clip", "projection_dim": 1024,
          "text_config": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16,
                              max_position_embeddings=77, hidden_act="gelu"),
          "vision_config": dict(image_size=224, patch_size=14, hidden_size=1280,
                                intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=16, hidden_act="gelu")}


def _layer_shapes(prefix, d, f):
  shapes = {}
  for n in ("q", "k", "v", "out"):
    shapes[f"{prefix}.self_attn.{n}_proj.weight"] = (d, d)
    shapes[f"{prefix}.self_attn.{n}_proj.bias"] = (d,)
  for n in ("layer_norm1", "layer_norm2"):
    shapes[f"{prefix}.{n}.weight"] = shapes[f"{prefix}.{n}.bias"] = (d,)
  shapes.update({f"{prefix}.mlp.fc1.weight": (f, d), f"{prefix}.mlp.fc1.bias": (f,),
                 f"{prefix}.mlp.fc2.weight": (d, f), f"{prefix}.mlp.fc2.bias": (d,)})
  return shapes


def hf_shapes(cfg):
  """{HF CLIPModel tensor name: shape}."""
  t, v, p = cfg["text_config"], cfg["vision_config"], cfg["projection_dim"]
  dt, dv = t["hidden_size"], v["hidden_size"]
  grid = v["image_size"] // v["patch_size"]
  shapes = {"text_model.embeddings.token_embedding.weight": (t["vocab_size"], dt),
            "text_model.embeddings.position_embedding.weight": (t["max_position_embeddings"], dt),
            "text_model.final_layer_norm.weight": (dt,), "text_model.final_layer_norm.bias": (dt,),
            "text_projection.weight": (p, dt),
            "vision_model.embeddings.class_embedding": (dv,),
            "vision_model.embeddings.patch_embedding.weight": (dv, 3, v["patch_size"], v["patch_size"]),
            "vision_model.embeddings.position_embedding.weight": (grid * grid + 1, dv),
            "visual_projection.weight": (p, dv)}
  for tower in ("pre_layrnorm", "post_layernorm"):
    shapes[f"vision_model.{tower}.weight"] = shapes[f"vision_model.{tower}.bias"] = (dv,)
  for name, c, d in (("text_model", t, dt), ("vision_model", v, dv)):
    for i in range(c["num_hidden_layers"]):
      shapes.update(_layer_shapes(f"{name}.encoder.layers.{i}", d, c["intermediate_size"]))
  return shapes


def random_hf_state_dict(cfg, seed=0):
  """Random float32 tensors under HF names: norm weights around 1, the rest ~ N(0, 0.3²)."""
  rng = np.random.default_rng(seed)
  return {name: ((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                 + 0.3 * rng.normal(size=shape)).astype(np.float32)
          for name, shape in hf_shapes(cfg).items()}


# ------------------------------------------------------------- float64 NumPy reference
def _ln(x, sd, name, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _linear(x, sd, name):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _act(x, kind):
  return 0.5 * x * (1 + erf(x / math.sqrt(2))) if kind == "gelu" else x / (1 + np.exp(-1.702 * x))


def _layers(x, sd, prefix, c, causal):
  heads, n = c["num_attention_heads"], x.shape[1]
  hd = c["hidden_size"] // heads
  for i in range(c["num_hidden_layers"]):
    p = f"{prefix}.encoder.layers.{i}"
    h = _ln(x, sd, p + ".layer_norm1")
    q, k, v = (_linear(h, sd, f"{p}.self_attn.{m}_proj").reshape(len(x), n, heads, hd)
               for m in "qkv")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if causal:
      logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + _linear(np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(len(x), n, -1), sd,
                    p + ".self_attn.out_proj")
    h = _act(_linear(_ln(x, sd, p + ".layer_norm2"), sd, p + ".mlp.fc1"), c["hidden_act"])
    x = x + _linear(h, sd, p + ".mlp.fc2")
  return x


def reference_text(sd, cfg, ids):
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  c = cfg["text_config"]
  x = (sd["text_model.embeddings.token_embedding.weight"][ids]
       + sd["text_model.embeddings.position_embedding.weight"][: ids.shape[1]])
  x = _ln(_layers(x, sd, "text_model", c, causal=True), sd, "text_model.final_layer_norm")
  eot = np.argmax(ids, axis=1)
  return _linear(x[np.arange(len(ids)), eot], sd, "text_projection")


def reference_image(sd, cfg, pixels):
  """pixels [B, R, R, 3] float64."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  c = cfg["vision_config"]
  p, d = c["patch_size"], c["hidden_size"]
  b, r = pixels.shape[:2]
  g = r // p
  # patch (i, j), channel c, offset (u, v) -> the conv as one matrix product
  patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * p * p)
  w = sd["vision_model.embeddings.patch_embedding.weight"].reshape(d, 3 * p * p)
  x = np.concatenate([np.broadcast_to(sd["vision_model.embeddings.class_embedding"], (b, 1, d)),
                      patches @ w.T], axis=1) + sd["vision_model.embeddings.position_embedding.weight"]
  x = _layers(_ln(x, sd, "vision_model.pre_layrnorm"), sd, "vision_model", c, causal=False)
  return _linear(_ln(x[:, 0], sd, "vision_model.post_layernorm"), sd, "visual_projection")


def _folder(path, sd, weights="model.safetensors", config=CONFIG):
  return write_hf_folder(path, sd, config, weights)


def _ids(vocab=50, length=12):
  """Three captions of different lengths: sot (vocab − 2), tokens, eot (vocab − 1), zero padding."""
  rng = np.random.default_rng(1)
  ids = np.zeros((3, length), np.int32)
  for row, n in enumerate((3, 7, length - 2)):
    ids[row, : n + 2] = [vocab - 2, *rng.integers(1, vocab - 2, size=n), vocab - 1]
  return ids


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_load_matches_numpy_forward(tmp_path, weights):
  sd = random_hf_state_dict(CONFIG, seed=2)
  extra = {"logit_scale": np.array(2.6, np.float32),
           "text_model.embeddings.position_ids": np.arange(12)[None].astype(np.int64)}
  model, params = clip_checkpoint.load_hf_clip(_folder(tmp_path, {**sd, **extra}, weights))
  ids = _ids()
  got = model.apply({"params": params}, jnp.asarray(ids), method=clip.CLIP.text)
  np.testing.assert_allclose(np.asarray(got), reference_text(sd, CONFIG, ids), rtol=2e-4, atol=2e-4)
  pixels = np.random.default_rng(3).normal(size=(2, 12, 12, 3))
  got = model.apply({"params": params}, jnp.asarray(pixels, jnp.float32), method=clip.CLIP.image)
  np.testing.assert_allclose(np.asarray(got), reference_image(sd, CONFIG, pixels), rtol=2e-4, atol=2e-4)


def test_text_ignores_padding_and_pixels_normalise():
  """The causal tower pooled at end-of-text: what follows it never matters. clip_pixels maps
  [-1, 1] to CLIP's normalised [0, 1] pixels."""
  model = clip.clip_from_config(CONFIG)
  params = model.init(jax.random.key(0), *model.init_inputs())["params"]
  ids = _ids()
  noisy = ids.copy()
  noisy[0, 6:] = 7
  text = lambda x: np.asarray(model.apply({"params": params}, jnp.asarray(x), method=clip.CLIP.text))
  np.testing.assert_array_equal(text(ids)[0], text(noisy)[0])
  white = clip.clip_pixels(jnp.ones((1, 12, 12, 3)), size=12)
  np.testing.assert_allclose(np.asarray(white[0, 0, 0]),
                             (1 - np.array(clip.PIXEL_MEAN)) / np.array(clip.PIXEL_STD), rtol=1e-6)
  assert clip.clip_pixels(jnp.zeros((2, 16, 16, 3)), size=12).shape == (2, 12, 12, 3)


def test_clip_h_parameter_count():
  """ViT-H/14's 986,109,440 weights (OpenCLIP lists 986.11M, which adds the one logit scale):
  the closed form of the HF tensor shapes equals the model's."""
  closed_form = sum(math.prod(s) for s in hf_shapes(CLIP_H).values())
  assert closed_form == 986_109_440
  assert clip.num_params(clip.clip_from_config(CLIP_H)) == closed_form


def test_loader_errors(tmp_path):
  """CLIP's own cases; missing tensors and the folder's files are the shared reader's
  (models/hf_checkpoint.py), tested through the T5 loader."""
  with pytest.raises(ValueError, match="not a directory.*CLIPModel.*nothing is downloaded"):
    clip_checkpoint.load_hf_clip(str(tmp_path / "nowhere"))
  sd = random_hf_state_dict(CONFIG)
  d = tmp_path / "shape"
  d.mkdir()
  conv = "vision_model.embeddings.patch_embedding.weight"
  with pytest.raises(ValueError, match=rf"tensor {conv} has shape \[4, 4, 3, 20\], expected \[20, 3, 4, 4\]"):
    clip_checkpoint.load_hf_clip(_folder(d, {**sd, conv: sd[conv].transpose(2, 3, 1, 0).copy()}))
  d = tmp_path / "extra"
  d.mkdir()
  extra = "text_model.encoder.layers.2.mlp.fc1.bias"
  with pytest.raises(ValueError, match=f"unexpected tensors.*{extra}"):
    clip_checkpoint.load_hf_clip(_folder(d, {**sd, extra: np.ones(24, np.float32)}))
  with pytest.raises(ValueError, match="text_config lacks"):
    clip.clip_from_config({**CONFIG, "text_config": {"hidden_size": 4}})


# ------------------------------------------------------------------------ tokenizer
def _tiny_tokenizer(tmp_path, context_length=8):
  """A vocabulary of the 256 byte stand-ins, each with </w>, and three merges."""
  chars = list(clip_bpe.byte_alphabet().values())
  merges = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>")]
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [clip_bpe.SOT, clip_bpe.EOT]
  (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  return clip_bpe.ClipTokenizer.from_folder(str(tmp_path), context_length), {t: i for i, t in enumerate(tokens)}


def test_tokenizer_merges_specials_truncation(tmp_path):
  tok, vocab = _tiny_tokenizer(tmp_path)
  sot, eot = vocab[clip_bpe.SOT], vocab[clip_bpe.EOT]
  # "cat" -> c a t</w> -> ca t</w> -> cat</w>; "A" lower-cased -> a</w> (one symbol, no merge);
  # "of" -> o f</w> -> of</w>; "&amp;" unescaped -> &</w>.
  ids = tok(["  A  CAT of&amp;", ""])
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  expected = [sot, vocab["a</w>"], vocab["cat</w>"], vocab["of</w>"], vocab["&</w>"], eot, 0, 0]
  np.testing.assert_array_equal(ids[0], expected)
  np.testing.assert_array_equal(ids[1], [sot, eot, 0, 0, 0, 0, 0, 0])
  # "cab": c a b</w> -> ca b</w> (no merge of ca + b</w>); a space (byte 32) never appears.
  np.testing.assert_array_equal(tok.encode("cab"), [vocab["ca"], vocab["b</w>"]])
  long = tok(["cat " * 20])[0]
  np.testing.assert_array_equal(long, [sot] + [vocab["cat</w>"]] * 6 + [eot])
  # Non-ASCII text goes through its UTF-8 bytes' stand-ins.
  alphabet = clip_bpe.byte_alphabet()
  np.testing.assert_array_equal(tok.encode("é"), [vocab[alphabet[0xC3]], vocab[alphabet[0xA9] + "</w>"]])
  assert clip_bpe.pieces(clip_bpe.clean("It’s 12 dogs, __ok! x² ?'s")) == [
      "it", "'s", "1", "2", "dogs", ",", "__", "ok", "!", "x", "²", "?'", "s"]
  assert clip_bpe.clean("ﬁne  ＣＡＴ\x07 &amp;") == "fine cat &"


def test_byte_alphabet_is_a_bijection_of_printables():
  table = clip_bpe.byte_alphabet()
  assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
  assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
  assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab.json.*merges.txt.*nothing is downloaded"):
    clip_bpe.ClipTokenizer.from_folder(str(tmp_path))
  (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(ValueError, match="lacks '<\\|startoftext\\|>'"):
    clip_bpe.ClipTokenizer.from_folder(str(tmp_path))
