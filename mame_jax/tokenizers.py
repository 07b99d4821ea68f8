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

Zero-shot prompts are cleaned up before they reach the tokeniser, as big_vision's
zero-shot evaluator does (``evaluators/proj/image_text/prompt_engineering.py``,
``canonicalize=True`` and ``first_class_name_only=True`` by default there):
:func:`canonicalize_text` turns ``_`` into spaces, deletes ASCII punctuation
(``string.punctuation``; a comma is kept in class names, where it separates
aliases, and ``{}`` in templates), lower-cases (Python's ``str.lower``: all of
Unicode, unlike the tokeniser's ASCII-only step), collapses runs of whitespace to
one space and strips the ends. :func:`canonical_class_name` then keeps the name
before the first comma and :func:`fill_template` writes it into the template by
splitting at ``{}``, so ``"a photo of a {}."`` with ``"St. Bernard"`` becomes
``"a photo of a st bernard"``.
"""

from __future__ import annotations

import abc
import os
import pathlib
import re
import string
from typing import Mapping, Optional, Sequence

import numpy as np

STYLES = ("siglip", "siglip2")
# big_vision's SigLIP config pads with the literal 1: c4_en's / mc4's EOS id.
SIGLIP_PAD = 1
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(s: str) -> str:
  """``s`` with ASCII capitals lower-cased and everything else kept, as
  ``tf.strings.lower(s)`` (encoding "") does."""
  return s.translate(_ASCII_LOWER)


def canonicalize_text(text: str, *, keep: Optional[str] = None) -> str:
  """``text`` cleaned up for a zero-shot prompt, by big_vision's
  ``canonicalize_text``: ``_`` -> space, ASCII punctuation deleted except the exact
  string ``keep`` (``","`` for class names, ``"{}"`` for templates), lower-cased,
  whitespace collapsed, ends stripped."""
  if not isinstance(text, str):
    raise TypeError(f"canonicalize_text(text=...) expects a string; got {type(text).__name__}")
  text = text.replace("_", " ")
  drop = str.maketrans("", "", string.punctuation)
  if keep:  # split at ``keep`` so that its characters survive only as that string
    text = keep.join(part.translate(drop) for part in text.split(keep))
  else:
    text = text.translate(drop)
  return re.sub(r"\s+", " ", text.lower()).strip()


def canonical_class_name(name: str) -> str:
  """A class name as big_vision's zero-shot evaluator prompts it: canonicalised
  with the alias comma kept, then only the first alias (not stripped again:
  ``"a ,b"`` -> ``"a "``, as there)."""
  return canonicalize_text(name, keep=",").split(",")[0]


def canonical_template(template: str) -> str:
  """A prompt template canonicalised with its ``{}`` kept:
  ``"a photo of a {}."`` -> ``"a photo of a {}"``."""
  return canonicalize_text(template, keep="{}")


def fill_template(template: str, name: str) -> str:
  """``template`` with ``name`` in place of its one ``{}`` (split and joined, not
  ``str.format``, so other braces are plain text)."""
  parts = template.split("{}")
  if len(parts) != 2:
    raise ValueError(f"a prompt template must hold exactly one '{{}}'; got {template!r}")
  return parts[0] + name + parts[1]


def sticky_eos(ids: Sequence[int], length: int, pad: int) -> np.ndarray:
  """``ids`` (ending in EOS) to exactly ``length``: truncated to its first
  ``length - 1`` ids plus its last (the EOS), or padded with ``pad``. ``(length,)``."""
  ids = list(ids)
  if len(ids) >= length:
    ids = ids[:length - 1] + ids[-1:]
  else:
    ids = ids + [pad] * (length - len(ids))
  return np.asarray(ids, np.int32)


class _Texts(abc.ABC):
  """What every tokenizer here shares: ``encode(text)`` (one text's ids, ending
  in its end token) is the subclass's; calling it on texts gives ``(N, length)``
  int32 rows, each to ``length`` by :func:`sticky_eos`."""

  length: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list:
    """One text's ids before truncation and padding, ending in the end token."""

  def __call__(self, texts) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    rows = [sticky_eos(self.encode(t), self.length, self.pad_id) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, self.length), np.int32)

  def check(self, params) -> None:
    """:func:`check_vocab` of this tokenizer against ``params``."""
    check_vocab(self, params)


class Tokenizer(_Texts):
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

  def __repr__(self):
    return (f"Tokenizer({self.path!r}, length={self.length}, style={self.style!r}, "
            f"vocab_size={self.vocab_size})")


# The special ids of the released vocabularies: T5's c4_en (SigLIP) and Gemma's (SigLIP 2).
SPECIAL_IDS = {"siglip": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
               "siglip2": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)}


def train_tokenizer(words: Sequence[str], model_prefix, *, vocab_size: int = 64,
                    style: str = "siglip", lines: int = 400, seed: int = 0) -> pathlib.Path:
  """A small SentencePiece model (unigram) for offline stand-ins and tests, trained on
  ``lines`` random 8-word sentences drawn from ``words``, with the special ids of
  ``style``'s released vocabulary (:data:`SPECIAL_IDS`). ``vocab_size`` is an upper
  bound (a few words cannot fill a large one); :attr:`Tokenizer.vocab_size` tells the
  size it got. Returns the ``.model`` path (``model_prefix + ".model"``)."""
  import sentencepiece  # pylint: disable=import-outside-toplevel
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}; got {style!r}")
  words = [w for w in words if w.strip()]
  if not words:
    raise ValueError("train_tokenizer needs at least one word")
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  corpus = prefix.with_suffix(".txt")
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(lines)),
                    encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=int(vocab_size),
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
      **SPECIAL_IDS[style])
  return pathlib.Path(str(prefix) + ".model")


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


# ------------------------------------------------------------------------------------
# CLIP: byte-level BPE from the checkpoint's own tokenizer.json.

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_LENGTH = 77  # OpenAI CLIP's context length


class CLIPTokenizer(_Texts):
  """CLIP's BPE tokeniser, read from a ``tokenizer.json`` (the ``tokenizers``
  package; a CLIP folder's own file, with its normaliser -- lower case, whitespace
  cleaned -- and byte-level pre-tokeniser).

  ``tokenizer(texts) -> (N, length)`` int32: ``[<|startoftext|>, ids...,
  <|endoftext|>]`` padded with ``pad_id`` (default: the end-of-text id, as
  transformers' CLIP tokenisers pad), and a text too long keeps its first
  ``length - 2`` ids and still ends with ``<|endoftext|>`` (OpenAI's
  ``clip.tokenize(..., truncate=True)``), so the text tower always finds its
  end-of-text token. The start and end tokens are added here, not by the file's
  post-processor, so a file without one gives the same ids.

  Args:
    path: the ``tokenizer.json``, or a folder holding one.
    length: tokens per text; at most the text tower's ``max_len`` (77 for
      OpenAI's), which takes any length up to it.
    pad_id: the padding id; ``None``: the end-of-text id.
  """

  def __init__(self, path, length: int = CLIP_LENGTH, pad_id: Optional[int] = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("CLIPTokenizer needs the tokenizers package: "
                        "pip install 'mame-jax[text]' (or tokenizers)") from e
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"CLIP tokenizer {path!r}: no such file (expected a "
                              "tokenizer.json)")
    if int(length) < 2:
      raise ValueError(f"length must be >= 2 (start and end tokens); got {length!r}")
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    self.path, self.length = path, int(length)
    self.bos_id, self.eos_id = self.tok.token_to_id(CLIP_BOS), self.tok.token_to_id(CLIP_EOS)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"{path}: the vocabulary has no {CLIP_BOS!r} / {CLIP_EOS!r} token; "
                       "not a CLIP tokenizer")
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)

  @property
  def vocab_size(self) -> int:
    """Tokens in the vocabulary, added ones included: the rows the embedding
    table must have."""
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list:
    """One text's ids before truncation and padding, with the start and end tokens."""
    if not isinstance(text, str):
      raise TypeError(f"texts must be strings; got {type(text).__name__}")
    ids = self.tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + list(ids) + [self.eos_id]

  def __repr__(self):
    return (f"CLIPTokenizer({self.path!r}, length={self.length}, "
            f"vocab_size={self.vocab_size})")
