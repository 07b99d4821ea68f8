"""SigLIP / SigLIP 2 text tokenisation with SentencePiece, by big_vision's rules.

``Tokenizer(spm_path, length, style)(["a photo of a cat", ...]) -> (N, length) int32``.

The two styles are what big_vision's SigLIP colabs run before the text tower
(``pp/ops_text.py``'s ``tokenize`` and ``pp/proj/paligemma/ops.py``'s ``tok``):

* ``"siglip"`` (SigLIP, the T5 ``c4_en`` / ``mc4`` vocabularies):
  ``tokenize(max_len=L, eos="sticky", pad_value=1)`` -- lower-cased, no BOS, the
  EOS id appended, padded with 1 (those vocabularies' EOS id).
* ``"siglip2"`` (SigLIP 2, the Gemma vocabulary):
  ``lower|tok(length=L, bos="no", eos="sticky")`` -- lower-cased, no BOS, the EOS
  id appended, padded with the vocabulary's pad id (0 for Gemma).

In both, EOS is "sticky": a text of ``L`` or more tokens keeps its first ``L - 1``
and ends with the EOS, so the last position -- the one the text tower pools --
always holds EOS or padding after it. Lower-casing is ASCII only, as
``tf.strings.lower`` without an encoding does (``"É"`` stays ``"É"``).

A vocabulary that does not match the checkpoint's embedding table would index
past it or read the wrong rows; :func:`check_vocab` compares the two.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

STYLES = ("siglip", "siglip2")
# big_vision's SigLIP config pads with the literal 1: c4_en's / mc4's EOS id.
SIGLIP_PAD = 1
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(s: str) -> str:
  """``s`` with ASCII capitals lower-cased and everything else kept, as
  ``tf.strings.lower(s)`` (encoding "") does."""
  return s.translate(_ASCII_LOWER)


def sticky_eos(ids: Sequence[int], length: int, pad: int) -> np.ndarray:
  """``ids`` (ending in EOS) to exactly ``length``: truncated to its first
  ``length - 1`` ids plus its last (the EOS), or padded with ``pad``. ``(length,)``."""
  ids = list(ids)
  if len(ids) >= length:
    ids = ids[:length - 1] + ids[-1:]
  else:
    ids = ids + [pad] * (length - len(ids))
  return np.asarray(ids, np.int32)


class Tokenizer:
  """A SentencePiece model applied by the rules of ``style`` (module docstring).

  Args:
    spm_path: the SentencePiece ``.model`` file (SigLIP: T5's ``c4_en`` 32k or
      ``mc4`` 250k; SigLIP 2: Gemma's 256k).
    length: tokens per text; the text tower's ``max_len`` (64 for the released
      models).
    style: ``"siglip"`` or ``"siglip2"``.

  ``tokenizer(texts)``: a string or a list of strings -> ``(N, length)`` int32.
  """

  def __init__(self, spm_path, length: int = 64, style: str = "siglip"):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("mame_jax.tokenizers needs sentencepiece: "
                        "pip install 'mame-jax[text]' (or sentencepiece)") from e
    if style not in STYLES:
      raise ValueError(f"style must be one of {STYLES}; got {style!r}")
    if int(length) < 1:
      raise ValueError(f"length must be a positive token count; got {length!r}")
    path = os.fspath(spm_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model {path!r}: no such file")
    self.path, self.length, self.style = path, int(length), style
    self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"{path}: the SentencePiece model has no EOS piece; SigLIP "
                       "tokenisation appends one to every text")
    if style == "siglip":
      self.pad_id = SIGLIP_PAD
    else:
      self.pad_id = self.sp.pad_id()
      if self.pad_id < 0:
        raise ValueError(f"{path}: the SentencePiece model has no pad piece, which "
                         "style='siglip2' pads with")

  @property
  def vocab_size(self) -> int:
    """Pieces in the vocabulary: the rows the embedding table must have."""
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list:
    """One text's ids before truncation and padding: lower-cased, EOS appended."""
    if not isinstance(text, str):
      raise TypeError(f"texts must be strings; got {type(text).__name__}")
    return list(self.sp.encode(ascii_lower(text), out_type=int)) + [self.eos_id]

  def __call__(self, texts) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    rows = [sticky_eos(self.encode(t), self.length, self.pad_id) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, self.length), np.int32)

  def check(self, params) -> None:
    """:func:`check_vocab` of this tokenizer against ``params``."""
    check_vocab(self, params)

  def __repr__(self):
    return (f"Tokenizer({self.path!r}, length={self.length}, style={self.style!r}, "
            f"vocab_size={self.vocab_size})")


def _embedding_rows(params) -> int:
  node = params
  if isinstance(node, Mapping) and "txt" in node:  # two towers -> the text tower
    node = node["txt"]
  try:
    return int(np.shape(node["Embed_0"]["embedding"])[0])
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError("check_vocab: params hold no text tower (expected "
                     "txt/Embed_0/embedding or Embed_0/embedding)") from e


def check_vocab(tokenizer: Tokenizer, params) -> None:
  """Raises ``ValueError`` unless ``tokenizer``'s vocabulary has as many pieces as
  the text tower's embedding table has rows. ``params``: two-tower params
  (``{img, txt, t, ...}``) or a text tower's."""
  rows = _embedding_rows(params)
  if tokenizer.vocab_size != rows:
    raise ValueError(
        f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size} pieces but the "
        f"checkpoint's text embedding has {rows} rows (txt/Embed_0/embedding); use the "
        "vocabulary the model was trained with (SigLIP: c4_en 32000 / mc4 250000; "
        "SigLIP 2: Gemma 256000)")
