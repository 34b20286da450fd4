"""Captions as token ids, in the data layer so that a pipeline can batch them: ByT5's byte ids
(`byte_ids`) and, through `data/clip_bpe.py`, CLIP's BPE ids.

ByT5's tokenizer is its vocabulary: id = UTF-8 byte + 3 (0 pad, 1 </s>, 2 <unk>), then </s>.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ardiff_jax.data import clip_bpe

PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3      # ByT5: pad, </s>, <unk>, then the 256 byte values
VOCAB = 256 + BYTE_OFFSET


def byte_ids(texts: Sequence[str], max_len: int) -> np.ndarray:
  """ByT5's ids of each text: UTF-8 bytes + 3, then </s>, padded with 0 to `max_len` (longer
  texts are cut so that </s> stays last). -> int32 [N, max_len]."""
  out = np.full((len(texts), max_len), PAD_ID, np.int32)
  for row, text in enumerate(texts):
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")][:max_len - 1] + [EOS_ID]
    out[row, :len(ids)] = ids
  return out


def caption_encoder(max_ids: int, clip_folder: str = "") -> Callable[[str], dict[str, np.ndarray]]:
  """caption -> {"caption_ids": ByT5 ids int32 [max_ids], and with a CLIP folder "clip_ids":
  CLIP's BPE ids int32 [77] (its vocab.json and merges.txt)}: what a captioned source's items
  carry (`data.caption_max_ids`, `data.clip_tokenizer`)."""
  if max_ids < 2:
    raise ValueError(f"data.caption_max_ids={max_ids}: a caption needs at least one byte and </s>")
  clip = clip_bpe.ClipTokenizer.from_folder(clip_folder) if clip_folder else None

  def encode(caption: str) -> dict[str, np.ndarray]:
    out = {"caption_ids": byte_ids([caption], max_ids)[0]}
    if clip is not None:
      out["clip_ids"] = clip([caption])[0]
    return out

  return encode
