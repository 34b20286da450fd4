"""CLIP's byte-level BPE tokenizer (OpenCLIP's `SimpleTokenizer`, HF's `CLIPTokenizer`), read from a
local CLIP checkpoint folder's vocab.json and merges.txt; nothing is downloaded.

    tok = ClipTokenizer.from_folder("/data/CLIP-ViT-H-14-laion2B-s32B-b79K")
    ids = tok(["a photo of a cat", ""])          # int32 [2, 77]: <sot> tokens <eot>, zero padded

Steps (OpenCLIP's `tokenize`):
  1. clean: ftfy's usual repairs, ours (`fix_text`): Unicode NFC, curly quotes straightened,
     full-width ASCII and the Latin ligatures (ﬁ, ﬂ...) spelled out, control characters dropped;
     then HTML entities unescaped (twice), whitespace runs collapsed to one space, stripped,
     lower-cased. Not done: ftfy's mojibake repair (text decoded with the wrong codec), which
     needs its tables; captions in proper UTF-8 never need it.
  2. split as CLIP's pattern 's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+ does:
     contractions, runs of letters, single numerals, runs of other non-space characters, the
     Unicode categories read from `unicodedata` (`pieces`; Python's `re` has no \\p{L}).
  3. each piece's UTF-8 bytes as the 256 printable stand-ins of `byte_alphabet`, the last one
     suffixed with </w>, merged pair by pair in merges.txt's order (lowest rank first).
  4. ids = [<|startoftext|>] + pieces + [<|endoftext|>]; longer than the context: cut, and the
     last id set to <|endoftext|>; padded with 0 (OpenCLIP's padding; the text tower is causal
     and pools at end-of-text, so the padding never reaches the embedding). Special-token text
     inside a caption ("<|endoftext|>") is plain text, as in OpenCLIP 3.
Compared once, outside the project, with OpenCLIP's `tokenize` on CLIP's released BPE file
(COCO-style sentences, contractions, numerals, HTML entities, non-Latin scripts, emoji, captions
past 77 tokens): the differences left are ftfy's mojibake, C1 and terminal-escape repairs and
OpenCLIP's own names for its special tokens.
"""
from __future__ import annotations

import functools
import html
import json
import os
import re
import unicodedata

import numpy as np

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
_CONTRACTIONS = ("'re", "'ve", "'ll", "'s", "'t", "'m", "'d")


@functools.lru_cache(maxsize=None)
def byte_alphabet() -> dict[int, str]:
  """Byte -> printable character: the 188 printable Latin-1 bytes stand for themselves, the other
  68 (controls, space, soft hyphen...) for chr(256 + n) in byte order (GPT-2's table)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


_QUOTES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"',
                         "‟": '"'})
_LIGATURES = {"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
              "Ĳ": "IJ", "ĳ": "ij", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj",
              "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj"}


def fix_text(text: str) -> str:
  """The part of `ftfy.fix_text` that needs no tables: NFC, straight quotes, full-width ASCII
  (U+FF01..U+FF5E) and the ideographic space as ASCII, ligatures spelled out, control characters
  other than tab and newlines dropped."""
  text = unicodedata.normalize("NFC", text).translate(_QUOTES)
  out = []
  for ch in text:
    code = ord(ch)
    if 0xFF01 <= code <= 0xFF5E:
      out.append(chr(code - 0xFEE0))
    elif code == 0x3000:
      out.append(" ")
    elif ch in _LIGATURES:
      out.append(_LIGATURES[ch])
    elif unicodedata.category(ch) == "Cc" and ch not in "\t\n\r":
      continue
    else:
      out.append(ch)
  return "".join(out)


def clean(text: str) -> str:
  """Step 1: repaired (`fix_text`), unescaped, whitespace collapsed and stripped, lower-cased."""
  text = html.unescape(html.unescape(fix_text(text)))
  return re.sub(r"\s+", " ", text).strip().lower()


def _kind(ch: str) -> str:
  """'L' letter, 'N' numeral, ' ' whitespace, '?' anything else."""
  if ch.isspace():
    return " "
  major = unicodedata.category(ch)[0]
  return major if major in "LN" else "?"


def pieces(text: str) -> list[str]:
  """Step 2 on cleaned text: the pattern's alternatives tried in order at each position, each
  greedy (a contraction only where a piece starts at its apostrophe)."""
  out, i, n = [], 0, len(text)
  while i < n:
    kind = _kind(text[i])
    if kind == " ":
      i += 1
      continue
    contraction = next((c for c in _CONTRACTIONS if text[i:i + len(c)].lower() == c), None)
    if contraction:
      j = i + len(contraction)
    elif kind == "N":
      j = i + 1
    else:
      j = i + 1
      while j < n and _kind(text[j]) == kind:
        j += 1
    out.append(text[i:j])
    i = j
  return out


class ClipTokenizer:
  """vocab {token: id} and merges [(a, b), ...] in rank order -> callable: captions -> int32 [B, T]."""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
               context_length: int = CONTEXT_LENGTH):
    for special in (SOT, EOT):
      if special not in vocab:
        raise ValueError(f"the CLIP vocabulary lacks {special!r}: not a CLIP vocab.json")
    self.vocab, self.context_length = vocab, context_length
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.sot, self.eot = vocab[SOT], vocab[EOT]
    self._cache: dict[str, list[str]] = {}

  @classmethod
  def from_folder(cls, path: str, context_length: int = CONTEXT_LENGTH) -> "ClipTokenizer":
    """vocab.json and merges.txt of a Hugging Face CLIP folder (merges.txt's '#version' line skipped)."""
    files = [os.path.join(path, f) for f in ("vocab.json", "merges.txt")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ValueError(f"{missing} do not exist: the CLIP tokenizer reads vocab.json and merges.txt "
                       f"from the local CLIP checkpoint folder {path!r} (nothing is downloaded)")
    with open(files[0], encoding="utf-8") as fh:
      vocab = json.load(fh)
    with open(files[1], encoding="utf-8") as fh:
      lines = [ln for ln in fh.read().split("\n") if ln and not ln.startswith("#version")]
    merges = []
    for ln in lines:
      pair = ln.split(" ")
      if len(pair) != 2:
        raise ValueError(f"merges.txt line {ln!r} is not two tokens: not a CLIP merges.txt")
      merges.append((pair[0], pair[1]))
    return cls(vocab, merges, context_length)

  def bpe(self, piece: str) -> list[str]:
    """Step 3 for one piece (already as byte stand-ins) -> its BPE tokens."""
    if piece in self._cache:
      return self._cache[piece]
    word = [*piece[:-1], piece[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """One caption -> its token ids, without <sot>/<eot>."""
    alphabet = byte_alphabet()
    ids = []
    for piece in pieces(clean(text)):
      for token in self.bpe("".join(alphabet[b] for b in piece.encode("utf-8"))):
        if token not in self.vocab:
          raise ValueError(f"BPE token {token!r} of {text!r} is not in the vocabulary: vocab.json "
                           "and merges.txt are not a matching CLIP pair")
        ids.append(self.vocab[token])
    return ids

  def __call__(self, captions: list[str]) -> np.ndarray:
    """Step 4: captions -> int32 [len(captions), context_length]."""
    out = np.zeros((len(captions), self.context_length), np.int32)
    for row, text in enumerate(captions):
      ids = [self.sot, *self.encode(text), self.eot][: self.context_length]
      ids[-1] = self.eot
      out[row, : len(ids)] = ids
    return out
