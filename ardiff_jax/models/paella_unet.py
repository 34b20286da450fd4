"""Paella v2's token predictor (reference/dd2_paella.md §3.3; official `Paella` in
`src_distributed/modules.py`), a conv U-Net over VQ codes, NHWC.

Shape letters: B batch, h×w the code grid (multiples of patch_size·2^(levels−1)), V codebook size
(`num_labels`), S condition tokens, D widths (c_in, c_hidden[i], c_cond, ...), hd head width.

    codes [B,h,w] → Embed(V, c_in) → LN → PixelUnshuffle(p) → 1×1 conv → c_hidden[0] → LN2d
    down level i: (i>0: LN2d + 2×2/2 conv) then blocks[i] × level_config[i]   → skip_i
    up level i (lowest first): blocks[i] × level_config[i] (the level's first C block, on every
        level except the lowest, concatenates skip_i), then (i>0) LN2d + 2×2/2 transposed conv
        → c_hidden[i−1]
    clf: LN2d, 1×1 conv → c_out·p², PixelShuffle(p);  out: LN2d, bias-free 1×1 conv → V logits
Blocks: C = ConvNeXt-V2 ResBlock  x + Lin(Drop(GRN(GELU(Lin(LN(DWConv([x; skip])))))));
T = FiLM x·(1+a)+b, [a; b] = Lin(r_embed);  A = x + MHA(LN(x), kv=[LN(x) tokens; Lin(SiLU(c))]).
Every norm is a LayerNorm without affine, eps 1e-6, over channels, computed in float32, as is the
attention softmax; the residual stream is float32, the convs and linears run in `dtype`.
Attention has torch `nn.MultiheadAttention` semantics: one fused in-projection [D, 3D] (q from the
image tokens, k and v from the key sequence), bias, dropout on the attention probabilities (the
official code passes the block dropout to it), out-projection.

Conditions (`embed_conditions`): the official ByT5 hidden states through `byt5_mapper`
(text_dim → c_cond), the CLIP text / image embeddings through `clip_mapper` /
`clip_image_mapper` (clip_dim → clip_seq_len·c_cond, reshaped to clip_seq_len tokens), then
`seq_norm`. Ours: a class token (`num_classes` + 1 rows, the last one the null class), for
class-conditional data, placed first; and `c_mask` [B,S] (False = the token is absent and no
query attends to it), so a dropped source keeps fixed shapes while equalling the official code
that removes those tokens. Also ours: `mask_token` adds an input row, id V, for an absorbing-mask
(MaskGIT) baseline; the logits stay over the V codes.

Init (official `_init_weights` and what follows it): xavier-uniform weights, zero biases; the
condition mappers N(0, 0.02); the input 1×1 conv xavier-uniform with gain 0.02; the clf conv zero
(weight and bias, so the logits are exactly 0 at init); the in_mapper table N(0, √(1/V)) and the
out_mapper kernel a copy of its V code rows ([c_out, V] = table[:V].T, so c_in must equal c_out);
the FiLM mappers' weights zero; the last Linear of each C block scaled by √(1/Σ blocks). Our class
table N(0, 0.02).

Parameter names for the converter: `down_levels_{i}` is torch `down_blocks[i]`; `up_levels_{i}`
is torch `up_blocks[L−1−i]`; inside a level `res_{n}` / `film_{n}` / `attn_{n}` is block n of the
level's block list (torch index n + 1 in down levels i > 0, whose index 0 is `downsample`); the
up-level `upsample` is torch's last entry. Use `init_all` to create every parameter:
`model.init(rng, method=PaellaUNet.init_all)` (optionally with codes, r and a sources dict).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff_jax.models import vit
from ardiff_jax.feature_maps import layer_norm, pixel_shuffle, pixel_unshuffle

_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros_init()
_COND_INIT = nn.initializers.normal(0.02)
_CONV_AXES = (None, None, "conv_in", "conv_out")
_EPS = 1e-6

PRESETS: dict[str, dict] = {
    # The paper's 1B model (ByT5-XL text + CLIP-H text and image embeddings): official defaults.
    "paella_1b": dict(c_in=256, c_out=256, c_r=64, patch_size=2, c_cond=1024,
                      c_hidden=(640, 1280, 1280), nhead=(0, 16, 16), blocks=(6, 16, 6),
                      level_config=("CT", "CTA", "CTA"), text_dim=2560, clip_dim=1024),
    # CPU sizes (ours).
    "paella_small": dict(c_in=64, c_out=64, c_r=64, c_cond=128, c_hidden=(64, 128), nhead=(0, 4),
                         blocks=(2, 2), level_config=("CT", "CTA")),
    "paella_tiny": dict(c_in=32, c_out=32, c_r=64, c_cond=64, c_hidden=(32, 64), nhead=(0, 2),
                        blocks=(1, 1), level_config=("CT", "CTA")),
}


def make_paella_unet(preset: str, num_labels: int = 8192, **overrides) -> "PaellaUNet":
  if preset not in PRESETS:
    raise ValueError(f"unknown Paella preset {preset!r}; valid presets: {sorted(PRESETS)}")
  return PaellaUNet(num_labels=num_labels, **{**PRESETS[preset], **overrides})


def r_embedding(r: jax.Array, c_r: int, max_positions: int = 10000) -> jax.Array:
  """Sinusoidal noise-level embedding: r [B] in [0, 1] -> [B, c_r] float32 ([sin | cos] of
  r·max_positions at log-spaced frequencies exp(−k·log(max_positions)/(half−1)), k < half = c_r//2;
  one zero column appended when c_r is odd)."""
  half = c_r // 2
  freq = jnp.exp(-jnp.arange(half, dtype=jnp.float32) * (math.log(max_positions) / (half - 1)))
  arg = (r.astype(jnp.float32) * max_positions)[:, None] * freq[None, :]
  emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, c_r % 2)))


def _scaled(init, scale: float):
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * scale


def _conv(features: int, kernel: int, name: str, dtype, *, strides: int = 1, padding=0,
          groups: int = 1, init=_XAVIER, bias_init=_ZEROS, axes=_CONV_AXES) -> nn.Conv:
  """torch-style Conv2d (cross-correlation, symmetric zero padding) with logical axis names."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                 dtype=dtype, name=name, kernel_init=nn.with_logical_partitioning(init, axes),
                 bias_init=nn.with_logical_partitioning(bias_init, (axes[-1],)))


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2 GRN on x [B, h, w, D]: Gx = ‖x‖₂ over (h, w) per channel, Nx = Gx/(mean_D Gx +
  1e-6), out = γ·(x·Nx) + β + x with γ, β [D] zero-initialised. float32."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    gamma = self.param("gamma", nn.with_logical_partitioning(_ZEROS, ("norm",)), (d,))
    beta = self.param("beta", nn.with_logical_partitioning(_ZEROS, ("norm",)), (d,))
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)
    gx = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)   # finite gradient at 0
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + _EPS)
    return gamma * (x * nx) + beta + x


class ResBlock(nn.Module):
  """C block: x [B, h, w, D] (+ skip [B, h, w, D']) -> [B, h, w, D] float32. The depthwise conv
  maps D + D' -> D with D groups (contiguous, as torch: with a skip of width D each output channel
  sees two adjacent channels of [x; skip]); the residual is x before the concatenation."""
  c: int
  kernel_size: int = 3
  dropout: float = 0.0
  out_scale: float = 1.0           # √(1/Σ blocks) on the last Linear's init
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, x_skip=None, deterministic: bool = True):
    res = x.astype(jnp.float32)
    if x_skip is not None:
      x = jnp.concatenate([x.astype(jnp.float32), x_skip.astype(jnp.float32)], axis=-1)
    if x.shape[-1] % self.c:
      raise ValueError(f"ResBlock({self.c}): input channels {x.shape[-1]} (with skip) are not a "
                       f"multiple of {self.c}")
    h = _conv(self.c, self.kernel_size, "depthwise", self.dtype, padding=self.kernel_size // 2,
              groups=self.c, axes=(None, None, None, "conv_out"))(x)
    h = layer_norm(h)
    h = vit.dense(4 * self.c, ("embed", "mlp"), "fc1", self.dtype)(h)
    h = GlobalResponseNorm(name="grn")(nn.gelu(h, approximate=False))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = vit.dense(self.c, ("mlp", "embed"), "fc2", self.dtype,
                  init=_scaled(_XAVIER, self.out_scale))(h)
    return res + h.astype(jnp.float32)


class TimestepBlock(nn.Module):
  """T block (FiLM): x [B, h, w, D], r_embed [B, c_r] -> x·(1+a) + b, [a; b] = Linear(r_embed)
  with a zero-initialised weight (identity at init)."""
  c: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, r_embed):
    ab = vit.dense(2 * self.c, (None, "embed"), "mapper", self.dtype, init=_ZEROS)(r_embed)
    a, b = jnp.split(ab.astype(jnp.float32)[:, None, None, :], 2, axis=-1)
    return x.astype(jnp.float32) * (1 + a) + b


class MultiHeadAttention(nn.Module):
  """torch nn.MultiheadAttention(D, H, bias=True): q [B, Q, D], kv [B, K, D], key_mask [B, K]
  bool (True = may be attended) -> [B, Q, D]. Fused in-projection [D, 3D] (q | k | v columns),
  scale hd^-½, float32 softmax, dropout on the probabilities, out-projection."""
  c: int
  nhead: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q, kv, key_mask=None, deterministic: bool = True):
    c, hd = self.c, self.c // self.nhead
    w = self.param("in_proj_kernel", nn.with_logical_partitioning(_XAVIER, ("embed", "heads")),
                   (c, 3 * c))
    bias = self.param("in_proj_bias", nn.with_logical_partitioning(_ZEROS, ("heads",)), (3 * c,))
    w, bias = w.astype(self.dtype), bias.astype(self.dtype)
    proj = lambda x, i: jnp.dot(x.astype(self.dtype), w[:, i * c:(i + 1) * c]) \
        + bias[i * c:(i + 1) * c]
    heads = lambda x: x.reshape(x.shape[:2] + (self.nhead, hd))
    qh, kh, vh = heads(proj(q, 0)), heads(proj(kv, 1)), heads(proj(kv, 2))
    probs = vit.attention_weights(qh, kh, None if key_mask is None else key_mask[:, None, None, :])
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh).reshape(q.shape[:2] + (c,))
    return vit.dense(c, ("heads", "embed"), "out_proj", self.dtype)(out)


class AttnBlock(nn.Module):
  """A block: x [B, h, w, D], cond [B, S, c_cond], cond_mask [B, S] bool or None ->
  x + MHA(LN(x), keys [LN(x) tokens; kv_mapper(cond)]) (only the condition keys without
  self_attn), kv_mapper = SiLU then Linear(c_cond -> D). float32 out."""
  c: int
  nhead: int
  self_attn: bool = True
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond, cond_mask=None, deterministic: bool = True):
    b, h, w, c = x.shape
    kv = vit.dense(c, (None, "embed"), "kv_mapper", self.dtype)(nn.silu(cond.astype(jnp.float32)))
    tokens = layer_norm(x).reshape(b, h * w, c)
    mask = cond_mask
    if self.self_attn:
      kv = jnp.concatenate([tokens.astype(kv.dtype), kv], axis=1)
      if cond_mask is not None:
        mask = jnp.concatenate([jnp.ones((b, h * w), bool), cond_mask.astype(bool)], axis=1)
    out = MultiHeadAttention(c, self.nhead, self.dropout, self.dtype, name="attention")(
        tokens, kv, mask, deterministic)
    return x.astype(jnp.float32) + out.reshape(b, h, w, c).astype(jnp.float32)


class ConvTranspose2x2(nn.Module):
  """torch ConvTranspose2d(k=2, stride=2): x [B, h, w, D] -> [B, 2h, 2w, D'],
  out[2y+i, 2x+j] = x[y, x] · K[i, j] + b with kernel K [2, 2, D, D'] (= torch weight [D, D', 2, 2]
  transposed), xavier-uniform, zero bias."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    k = self.param("kernel", nn.with_logical_partitioning(_XAVIER, _CONV_AXES),
                   (2, 2, c, self.features))
    bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, ("conv_out",)), (self.features,))
    y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), k.astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class _Level(nn.Module):
  """One U-Net level at width c: optional downsample (LN2d + 2×2/2 conv), blocks × level_config,
  optional upsample (LN2d + ConvTranspose2x2 to `upsample_to`). x [B, h, w, ·] -> float32."""
  c: int
  level_config: str
  blocks: int
  nhead: int
  kernel_size: int
  dropout: float
  self_attn: bool
  out_scale: float
  downsample: bool = False
  upsample_to: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, r_embed, cond, cond_mask, skip=None, deterministic: bool = True):
    if self.downsample:
      x = _conv(self.c, 2, "downsample", self.dtype, strides=2)(layer_norm(x)).astype(jnp.float32)
    n = 0
    for _ in range(self.blocks):
      for kind in self.level_config:
        if kind == "C":      # official: the skip enters block 0 of the level, when it is a C block
          x = ResBlock(self.c, self.kernel_size, self.dropout, self.out_scale, self.dtype,
                       name=f"res_{n}")(x, skip if n == 0 else None, deterministic)
        elif kind == "T":
          x = TimestepBlock(self.c, self.dtype, name=f"film_{n}")(x, r_embed)
        else:
          x = AttnBlock(self.c, self.nhead, self.self_attn, self.dropout, self.dtype,
                        name=f"attn_{n}")(x, cond, cond_mask, deterministic)
        n += 1
    if self.upsample_to:
      x = ConvTranspose2x2(self.upsample_to, self.dtype, name="upsample")(layer_norm(x))
      x = x.astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", None, None, "embed"))


class PaellaUNet(nn.Module):
  """(codes [B, h, w] int32, r [B], c [B, S, c_cond], c_mask [B, S] bool | None)
  -> logits [B, h, w, V] float32. `embed_conditions` builds c from the condition sources."""
  num_labels: int = 8192
  c_in: int = 256
  c_out: int = 256
  c_r: int = 64
  patch_size: int = 2
  c_cond: int = 1024
  c_hidden: Sequence[int] = (640, 1280, 1280)
  nhead: Sequence[int] = (0, 16, 16)
  blocks: Sequence[int] = (6, 16, 6)
  level_config: Sequence[str] = ("CT", "CTA", "CTA")
  kernel_size: int = 3
  dropout: float = 0.1
  self_attn: bool = True
  num_classes: int = 0           # > 0: one class token (ours), num_classes + 1 rows (last = null)
  text_dim: int = 0              # > 0: text-encoder hidden states [B, T, text_dim] (ByT5-XL 2560)
  clip_dim: int = 0              # > 0: CLIP text and image embeddings [B, clip_dim] (CLIP-H 1024)
  clip_seq_len: int = 4
  mask_token: bool = False       # ours: one extra input row, id V, an absorbing [MASK] (MaskGIT)
  dtype: jnp.dtype = jnp.float32

  def _check(self):
    n = len(self.c_hidden)
    if not (len(self.nhead) == len(self.blocks) == len(self.level_config) == n):
      raise ValueError(f"c_hidden, nhead, blocks and level_config need one entry per level; got "
                       f"{len(self.c_hidden)}, {len(self.nhead)}, {len(self.blocks)}, "
                       f"{len(self.level_config)}")
    for i, (cfg, c, h) in enumerate(zip(self.level_config, self.c_hidden, self.nhead)):
      if set(cfg) - set("CTA") or not cfg:
        raise ValueError(f"level_config[{i}]={cfg!r}: use the block types 'C', 'T', 'A'")
      if i < n - 1 and not cfg.startswith("C"):
        raise ValueError(f"level_config[{i}]={cfg!r}: the skip of level {i} enters its first up "
                         "block, which must be a 'C' block (the official code drops it otherwise)")
      if "A" in cfg and (h <= 0 or c % h):
        raise ValueError(f"level {i} has attention: nhead[{i}]={h} must be > 0 and divide "
                         f"c_hidden[{i}]={c}")
    if self.c_in != self.c_out:
      raise ValueError(f"c_in={self.c_in} != c_out={self.c_out}: the out_mapper kernel is "
                       "initialised as a copy of the in_mapper table, so they must match")

  def setup(self):
    self._check()
    levels, p = len(self.c_hidden), self.patch_size
    if self.num_classes:
      self.class_embedding = nn.Embed(
          self.num_classes + 1, self.c_cond,
          embedding_init=nn.with_logical_partitioning(_COND_INIT, ("vocab", "embed")))
    if self.text_dim:
      self.byt5_mapper = vit.dense(self.c_cond, (None, "embed"), None, self.dtype, init=_COND_INIT)
    if self.clip_dim:
      width = self.c_cond * self.clip_seq_len
      self.clip_mapper = vit.dense(width, (None, "embed"), None, self.dtype, init=_COND_INIT)
      self.clip_image_mapper = vit.dense(width, (None, "embed"), None, self.dtype, init=_COND_INIT)
    table = self.param(
        "in_mapper_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(math.sqrt(1 / self.num_labels)),
                                     ("vocab", "embed")),
        (self.num_labels + int(self.mask_token), self.c_in))
    self.in_mapper_embedding = table
    # The official out_mapper starts as a copy of the in_mapper table (its V code rows): the init
    # returns table[:V].T.
    copy = lambda key, shape, dtype=jnp.float32: table[:self.num_labels].T.astype(dtype)
    self.out_mapper_kernel = self.param(
        "out_mapper_kernel", nn.with_logical_partitioning(copy, ("embed", "vocab")),
        (self.c_out, self.num_labels))
    self.embedding = _conv(self.c_hidden[0], 1, None, self.dtype,
                           init=nn.initializers.variance_scaling(0.02 ** 2, "fan_avg", "uniform"))
    common = dict(kernel_size=self.kernel_size, dropout=self.dropout, self_attn=self.self_attn,
                  out_scale=math.sqrt(1 / sum(self.blocks)), dtype=self.dtype)
    self.down_levels = [
        _Level(self.c_hidden[i], self.level_config[i], self.blocks[i], self.nhead[i],
               downsample=i > 0, **common) for i in range(levels)]
    self.up_levels = [
        _Level(self.c_hidden[i], self.level_config[i], self.blocks[i], self.nhead[i],
               upsample_to=self.c_hidden[i - 1] if i > 0 else 0, **common) for i in range(levels)]
    self.clf = _conv(self.c_out * p * p, 1, None, self.dtype, init=_ZEROS)

  def embed_conditions(self, labels=None, text=None, clip_text=None, clip_image=None):
    """Condition tokens c [B, S, c_cond] float32: [class token (labels [B] int, num_classes =
    null) | text_mapper(text [B, T, text_dim]) | clip_seq_len tokens from clip_text [B, clip_dim]
    | clip_seq_len tokens from clip_image [B, clip_dim]], each present iff given, then LayerNorm
    without affine (official `seq_norm`)."""
    sources = dict(labels=(labels, self.num_classes, "num_classes"),
                   text=(text, self.text_dim, "text_dim"),
                   clip_text=(clip_text, self.clip_dim, "clip_dim"),
                   clip_image=(clip_image, self.clip_dim, "clip_dim"))
    for name, (value, size, field) in sources.items():
      if value is not None and not size:
        raise ValueError(f"embed_conditions got {name} but the model has {field}=0")
    if all(v is None for v, _, _ in sources.values()):
      raise ValueError("embed_conditions needs at least one condition source "
                       "(labels, text, clip_text or clip_image)")
    seq = []
    if labels is not None:
      seq.append(self.class_embedding(labels.astype(jnp.int32))[:, None, :].astype(jnp.float32))
    if text is not None:
      if text.ndim != 3 or text.shape[-1] != self.text_dim:
        raise ValueError(f"text must be [B, T, {self.text_dim}], got {text.shape}")
      seq.append(self.byt5_mapper(text))
    for value, mapper, name in ((clip_text, "clip_mapper", "clip_text"),
                                (clip_image, "clip_image_mapper", "clip_image")):
      if value is not None:
        if value.ndim != 2 or value.shape[-1] != self.clip_dim:
          raise ValueError(f"{name} must be [B, {self.clip_dim}], got {value.shape}")
        seq.append(getattr(self, mapper)(value).reshape(value.shape[0], self.clip_seq_len,
                                                        self.c_cond))
    batches = {s.shape[0] for s in seq}
    if len(batches) > 1:
      raise ValueError(f"condition sources disagree on the batch size: {sorted(batches)}")
    return layer_norm(jnp.concatenate([s.astype(jnp.float32) for s in seq], axis=1))

  def __call__(self, x, r, c, c_mask=None, deterministic: bool = True):
    """x [B, h, w] int32 codes, r [B] noise level in [0, 1], c [B, S, c_cond], c_mask [B, S] bool
    (False: token absent) -> logits [B, h, w, V] float32. With self_attn=False a row whose
    condition tokens are all masked attends uniformly to them (the official code has no such
    case: it always has the ByT5 tokens)."""
    levels, p = len(self.c_hidden), self.patch_size
    factor = p * 2 ** (levels - 1)
    if x.ndim != 3 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"codes must be [B, h, w] with h and w multiples of patch_size·2^(levels−1)"
                       f" = {factor}; got shape {x.shape}")
    if c_mask is not None and c_mask.shape != c.shape[:2]:
      raise ValueError(f"c_mask {c_mask.shape} must be [B, S] = {c.shape[:2]}")
    r_embed = r_embedding(r, self.c_r)
    h = layer_norm(jnp.take(self.in_mapper_embedding, x.astype(jnp.int32), axis=0))
    h = layer_norm(self.embedding(pixel_unshuffle(h, p)))
    h = nn.with_logical_constraint(h, ("batch", None, None, "embed"))
    skips = []
    for level in self.down_levels:
      h = level(h, r_embed, c, c_mask, deterministic=deterministic)
      skips.append(h)
    for i in reversed(range(levels)):   # the up pass starts from the lowest level's output
      skip = skips[i] if i < levels - 1 else None
      h = self.up_levels[i](h, r_embed, c, c_mask, skip, deterministic=deterministic)
    h = pixel_shuffle(self.clf(layer_norm(h)), p)
    logits = jnp.dot(layer_norm(h).astype(self.dtype), self.out_mapper_kernel.astype(self.dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", None, None, "vocab"))

  def init_all(self, x=None, r=None, sources: dict | None = None):
    """Runs every parameter's init: `embed_conditions(**sources)` plus zero inputs for each other
    configured source, then __call__. x [B, h, w] codes (default zeros [1, n, n], n the smallest
    valid grid), r [B] (default zeros)."""
    size = self.patch_size * 2 ** (len(self.c_hidden) - 1)
    x = jnp.zeros((1, size, size), jnp.int32) if x is None else x
    batch = x.shape[0]
    r = jnp.zeros((batch,)) if r is None else r
    kw = dict(sources or {})
    if self.num_classes:
      kw.setdefault("labels", jnp.zeros((batch,), jnp.int32))
    if self.text_dim:
      kw.setdefault("text", jnp.zeros((batch, 1, self.text_dim), jnp.float32))
    if self.clip_dim:
      kw.setdefault("clip_text", jnp.zeros((batch, self.clip_dim), jnp.float32))
      kw.setdefault("clip_image", jnp.zeros((batch, self.clip_dim), jnp.float32))
    if not kw:
      raise ValueError("PaellaUNet needs a condition source: set num_classes, text_dim or clip_dim")
    return self(x, r, self.embed_conditions(**kw))
