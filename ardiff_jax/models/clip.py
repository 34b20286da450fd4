"""CLIP's text and image towers (Hugging Face `CLIPModel` / OpenCLIP architecture): Paella v2
conditions on CLIP-H's projected text and image embeddings (reference/dd2_paella.md §3.3).

Shape letters: B batch, T text tokens (77), D width, H heads, N patches, P projection width,
R image side (224), p patch side.

Text:   ids [B, T] -> token_embedding[ids] + position_embedding[:T]
        -> layers (causal) -> final_layer_norm -> h[b, argmax_t ids[b, t]] -> text_projection -> [B, P]
Image:  pixels [B, R, R, 3] (CLIP-normalised, `clip_pixels`) -> p×p stride-p conv (no bias)
        -> [class_embedding; patches] + position_embedding -> pre_layrnorm -> layers
        -> post_layernorm(h[:, 0]) -> visual_projection -> [B, P]
layer:  h += out_proj(Attn(layer_norm1(h)));  h += fc2(act(fc1(layer_norm2(h))))
        q, k, v, out projections with biases; logits q·kᵀ/√(D/H); act "gelu" (exact, OpenCLIP
        ViT-H) or "quick_gelu" x·σ(1.702x) (OpenAI's CLIPs), from the config's `hidden_act`.

Facts this follows:
  - The text tower is causal whatever the padding, so the pooled end-of-text state never sees the
    padding; no attention mask is needed. Pooling takes the position of the largest id, which is
    end-of-text (49407, the last of the vocabulary) in CLIP's tokenizer: OpenCLIP's
    `text.argmax(dim=-1)` and HF's legacy `eos_token_id == 2` branch.
  - Paella feeds `encode_text` / `encode_image` (the projected, unnormalised embeddings).
  - LayerNorm eps from the config (1e-5 for every released CLIP).
Dtypes: parameters float32; matmuls in `dtype`; residual stream, norms and softmax in float32;
outputs float32.

Module names mirror HF's parameter names (`models/clip_checkpoint.py` maps them mechanically):
  text:  embeddings/{token,position}_embedding, layers_{i}/{self_attn/{q,k,v,out}_proj,
         layer_norm1, mlp/{fc1,fc2}, layer_norm2}, final_layer_norm, text_projection
  image: embeddings/{class_embedding, patch_embedding, position_embedding}, pre_layrnorm (HF's
         spelling), layers_{i}/..., post_layernorm, visual_projection
Initialisation (when not loaded): normal(0.02) embeddings, xavier linear layers; the weights are
meant to be read from a checkpoint.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ardiff_jax.models import vit

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}
# CLIP's image normalisation (OpenAI's statistics; Paella's `clip_preprocess` uses the same).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_EMBED_INIT = nn.initializers.normal(0.02)


def clip_pixels(images: jax.Array, size: int = 224) -> jax.Array:
  """Images in [-1, 1], [B, S, S, 3] -> the image tower's input [B, size, size, 3] float32:
  Paella's `clip_preprocess` (Resize(224, bicubic), then Normalize with CLIP's mean and std).
  Ours: jax's antialiased bicubic (Keys a = −0.5; torchvision uses a = −0.75), a small difference
  in the resampled pixels; square inputs only, as Paella's random-cropped squares."""
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[-1] != 3:
    raise ValueError(f"clip_pixels expects square RGB images [B, S, S, 3], got {images.shape}")
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if images.shape[1] != size:
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic", antialias=True)
  return (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


class CLIPAttention(nn.Module):
  """x [B, L, D] (in `dtype`), allowed bool broadcastable to [B, H, L, L] or None -> [B, L, D]."""
  width: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
    b, n, _ = x.shape
    split = lambda a: a.reshape(b, n, self.num_heads, self.width // self.num_heads)
    q, k, v = (split(vit.dense(self.width, ("embed", "heads"), f"{m}_proj", self.dtype)(x))
               for m in "qkv")
    probs = vit.attention_weights(q, k, allowed).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.width)
    return vit.dense(self.width, ("heads", "embed"), "out_proj", self.dtype)(out)


class CLIPMLP(nn.Module):
  width: int
  hidden: int
  act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.act](vit.dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype)(x))
    return vit.dense(self.width, ("mlp", "embed"), "fc2", self.dtype)(h)


def _norm(name: str, eps: float) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class CLIPLayer(nn.Module):
  """Pre-LN transformer layer: x [B, L, D] float32 -> [B, L, D] float32."""
  width: int
  hidden: int
  num_heads: int
  act: str = "gelu"
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, allowed: jax.Array | None) -> jax.Array:
    h = _norm("layer_norm1", self.eps)(x).astype(self.dtype)
    x = x + CLIPAttention(self.width, self.num_heads, self.dtype, name="self_attn")(
        h, allowed).astype(jnp.float32)
    h = _norm("layer_norm2", self.eps)(x).astype(self.dtype)
    x = x + CLIPMLP(self.width, self.hidden, self.act, self.dtype, name="mlp")(h).astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _Tower(nn.Module):
  """The fields both towers share (HF's per-tower config plus the projection)."""
  width: int
  hidden: int
  num_layers: int
  num_heads: int
  projection_dim: int = 512
  act: str = "gelu"
  eps: float = 1e-5
  dtype: Any = jnp.float32


class CLIPTextTower(_Tower):
  """ids int32 [B, T] (start-of-text, tokens, end-of-text, zero padding) -> float32 [B, P]:
  OpenCLIP's `encode_text`, HF's `get_text_features`."""
  vocab_size: int = 49408
  max_positions: int = 77

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    t = ids.shape[-1]
    if t > self.max_positions:
      raise ValueError(f"CLIP text of {t} tokens: the tower has {self.max_positions} positions")
    token = self.param("embeddings_token_embedding",
                       nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")),
                       (self.vocab_size, self.width), jnp.float32)
    position = self.param("embeddings_position_embedding",
                          nn.with_logical_partitioning(_EMBED_INIT, (None, "embed")),
                          (self.max_positions, self.width), jnp.float32)
    x = token[ids] + position[:t]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    for i in range(self.num_layers):
      x = CLIPLayer(self.width, self.hidden, self.num_heads, self.act, self.eps, self.dtype,
                    name=f"layers_{i}")(x, causal)
    x = _norm("final_layer_norm", self.eps)(x)
    pooled = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]
    return vit.dense(self.projection_dim, ("embed", None), "text_projection", jnp.float32,
                     use_bias=False)(pooled)


class CLIPImageTower(_Tower):
  """pixels float32 [B, R, R, 3] (`clip_pixels`) -> float32 [B, P]: OpenCLIP's `encode_image`,
  HF's `get_image_features`."""
  image_size: int = 224
  patch_size: int = 14

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    if pixels.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"CLIP image tower of {self.image_size} px got pixels {pixels.shape}; "
                       "pass images through clip_pixels(images, size)")
    grid = self.image_size // self.patch_size
    patches = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                      padding="VALID", use_bias=False, dtype=self.dtype,
                      kernel_init=nn.with_logical_partitioning(vit.XAVIER, (None, None, None, "embed")),
                      name="embeddings_patch_embedding")(pixels.astype(self.dtype))
    cls = self.param("embeddings_class_embedding",
                     nn.with_logical_partitioning(_EMBED_INIT, ("embed",)), (self.width,), jnp.float32)
    position = self.param("embeddings_position_embedding",
                          nn.with_logical_partitioning(_EMBED_INIT, (None, "embed")),
                          (grid * grid + 1, self.width), jnp.float32)
    b = pixels.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)),
                         patches.reshape(b, grid * grid, self.width).astype(jnp.float32)], axis=1)
    x = _norm("pre_layrnorm", self.eps)(x + position)
    for i in range(self.num_layers):
      x = CLIPLayer(self.width, self.hidden, self.num_heads, self.act, self.eps, self.dtype,
                    name=f"layers_{i}")(x, None)
    pooled = _norm("post_layernorm", self.eps)(x[:, 0])
    return vit.dense(self.projection_dim, ("embed", None), "visual_projection", jnp.float32,
                     use_bias=False)(pooled)


class CLIP(nn.Module):
  """Both towers; `text(ids)` and `image(pixels)` are the methods to apply. Fields: HF CLIPConfig's
  (`clip_from_config`)."""
  text_tower: CLIPTextTower
  image_tower: CLIPImageTower

  def setup(self):
    self.text_model = self.text_tower.clone(name="text_model")
    self.vision_model = self.image_tower.clone(name="vision_model")

  def text(self, ids: jax.Array) -> jax.Array:
    return self.text_model(ids)

  def image(self, pixels: jax.Array) -> jax.Array:
    return self.vision_model(pixels)

  def __call__(self, ids: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both embeddings (initialises both towers): ([B, P], [B', P])."""
    return self.text(ids), self.image(pixels)

  def init_inputs(self) -> tuple[jax.Array, jax.Array]:
    """Dummy (ids [1, T], pixels [1, R, R, 3]) for `init`."""
    v = self.image_tower
    return (jnp.zeros((1, self.text_tower.max_positions), jnp.int32),
            jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
_VISION_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads")


def clip_from_config(cfg: dict, dtype: Any = jnp.float32) -> CLIP:
  """A CLIP from a Hugging Face CLIPConfig dict (config.json of a `CLIPModel` checkpoint, e.g.
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Sizes must be present; the rest defaults as HF's."""
  if cfg.get("model_type", "clip") != "clip":
    raise ValueError(f"config model_type={cfg.get('model_type')!r}: expected a CLIPModel config ('clip')")
  text, vision = cfg.get("text_config"), cfg.get("vision_config")
  if not isinstance(text, dict) or not isinstance(vision, dict):
    raise ValueError("a CLIP config.json has text_config and vision_config sections")
  for section, keys, name in ((text, _TEXT_KEYS, "text_config"), (vision, _VISION_KEYS, "vision_config")):
    missing = [k for k in keys if k not in section]
    if missing:
      raise ValueError(f"CLIP {name} lacks {missing}: expected {list(keys)}")
  projection = int(cfg.get("projection_dim", 512))
  for section in (text, vision):
    if section.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
      raise ValueError(f"hidden_act={section['hidden_act']!r}: expected one of {sorted(ACTIVATIONS)}")
  common = lambda s: dict(width=int(s["hidden_size"]), hidden=int(s["intermediate_size"]),
                          num_layers=int(s["num_hidden_layers"]),
                          num_heads=int(s["num_attention_heads"]), projection_dim=projection,
                          act=s.get("hidden_act", "quick_gelu"),
                          eps=float(s.get("layer_norm_eps", 1e-5)), dtype=dtype)
  return CLIP(
      text_tower=CLIPTextTower(vocab_size=int(text["vocab_size"]),
                               max_positions=int(text.get("max_position_embeddings", 77)),
                               **common(text)),
      image_tower=CLIPImageTower(image_size=int(vision["image_size"]),
                                 patch_size=int(vision["patch_size"]), **common(vision)))


def num_params(model: CLIP) -> int:
  """Parameter count from the abstract shapes (no allocation)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs()))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes))))
