"""Zero-shot classification with a SigLIP two-tower model.

Each class name is written into every prompt template (``"a photo of a {}."``), the
text tower embeds the prompts, and a class's embedding is the mean of its
prompts' embeddings, L2-normalised again (CLIP's prompt ensembling, which
big_vision's SigLIP evaluators do too). Those embeddings are computed once per
list of class names and cached. Images go through the image tower by the
:class:`~mame_jax.eval.runner.Runner` -- so MaMe (exact or fixed mode) or ToMe in
the image tower works as in every other evaluation -- and their embeddings meet
the class embeddings through SigLIP's logits ``zimg @ zcls.T * exp(t) + b``.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax.eval import imagenet_classes
from mame_jax.eval.runner import Runner
from mame_jax.models import text as text_lib
from mame_jax.models import two_towers

TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
             "a photo of the small {}.", "a close-up photo of a {}.", "itap of a {}.")


class ZeroShot:
  """``ZeroShot(model, params, tokenizer)``; ``classify(images, class_names) ->
  (B, C)`` probabilities.

  Args:
    model, params: a ``two_towers.Model`` and its params (``mame_jax.load_model``
      on a SigLIP file; a merge there is the image tower's).
    tokenizer: a ``mame_jax.tokenizers.Tokenizer`` of the model's vocabulary and
      text length (checked here).
    templates: prompt templates, each with one ``{}``.
    activation: ``"sigmoid"`` (SigLIP's own pairwise probability, default) or
      ``"softmax"`` (over the classes; rows sum to 1).
  """

  def __init__(self, model, params, tokenizer, *, templates: Sequence[str] = TEMPLATES,
               activation: str = "sigmoid", text_batch: int = 256):
    from mame_jax.tokenizers import check_vocab  # pylint: disable=import-outside-toplevel
    if activation not in ("sigmoid", "softmax"):
      raise ValueError(f"activation must be 'sigmoid' or 'softmax'; got {activation!r}")
    if not templates or any(t.count("{}") != 1 for t in templates):
      raise ValueError(f"templates must each hold exactly one '{{}}'; got {templates!r}")
    check_vocab(tokenizer, params)
    if model.txt.max_len is not None and tokenizer.length != model.txt.max_len:
      raise ValueError(f"tokenizer length {tokenizer.length} != the text tower's "
                       f"max_len {model.txt.max_len}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.templates, self.activation, self.text_batch = tuple(templates), activation, text_batch
    self.runner = Runner(model.img, params["img"])
    # What two_towers.Model returns as ``out``: exp(t) and b.
    self._out = {"t": jnp.exp(params["t"])}
    if "b" in params:
      self._out["b"] = params["b"]
    self._embed_text = jax.jit(lambda p, ids: model.txt.apply({"params": p}, ids)[0])
    self._cache: dict = {}

  def class_embeddings(self, class_names: Sequence[str]) -> jax.Array:
    """``(C, E)``: per class the mean of its prompts' normalised embeddings,
    normalised again. Cached per tuple of class names."""
    key = tuple(class_names)
    if key not in self._cache:
      prompts = [t.format(c) for c in key for t in self.templates]
      ids = self.tokenizer(prompts)
      z = np.concatenate([
          np.asarray(text_lib.l2_normalize(
              self._embed_text(self.params["txt"], ids[i:i + self.text_batch])))
          for i in range(0, len(ids), self.text_batch)])
      z = z.reshape(len(key), len(self.templates), -1).mean(axis=1)
      self._cache[key] = text_lib.l2_normalize(z)
    return self._cache[key]

  def head(self, class_names: Sequence[str]):
    """``(head_logits, head_params)`` for ``mame_jax.eval.loop.evaluate(head=...,
    head_params=...)``: the image tower's ``(B, E)`` output -> ``(B, C)`` logits
    against the (cached) class embeddings. ``head_params`` holds those embeddings
    and exp(t), b, passed as arguments so the compiled program does not carry
    them as constants."""
    return head_logits, {"zcls": self.class_embeddings(class_names), **self._out}

  def logits(self, images, class_names: Sequence[str]) -> jax.Array:
    """``(B, C)`` SigLIP logits of every image against every class."""
    zimg, _ = self.runner(images)
    return head_logits(self.head(class_names)[1], zimg)

  def classify(self, images, class_names: Sequence[str],
               activation: Optional[str] = None) -> jax.Array:
    """``images (B, H, W, 3)`` in [-1, 1] -> ``(B, C)`` probabilities."""
    z = self.logits(images, class_names)
    if (activation or self.activation) == "softmax":
      return jax.nn.softmax(z, axis=-1)
    return jax.nn.sigmoid(z)


def head_logits(head_params, zimg) -> jax.Array:
  """``(B, E)`` image-tower output -> ``(B, C)`` SigLIP logits
  ``normalize(zimg) @ zcls.T * exp(t) + b`` (``head_params`` from
  :meth:`ZeroShot.head`); jit-able, so the timed program of an evaluation is the
  image tower plus this product."""
  out = {k: v for k, v in head_params.items() if k != "zcls"}
  return two_towers.logits(text_lib.l2_normalize(zimg), head_params["zcls"], out)


def _read_lines(path: str, what: str) -> list:
  """The non-empty lines of a text file (or the strings of a JSON list)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r}: no such file")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    items = json.loads(text)
    if not all(isinstance(i, str) for i in items):
      raise ValueError(f"{what} {path!r}: expected a JSON list of strings")
  else:
    items = [line.strip() for line in text.splitlines()]
  items = [i for i in items if i]
  if not items:
    raise ValueError(f"{what} {path!r} holds no names")
  return items


def class_names_from(spec: str, source=None) -> tuple:
  """``config.zeroshot.classes`` -> class names in label order: ``"imagenet"``
  (:data:`~mame_jax.eval.imagenet_classes.IMAGENET_CLASSES`), ``"data"`` (the
  class folders of ``source``, a ``mame_jax.eval.data.Source``, in their label
  order) or a file (one name per line, or a JSON list)."""
  if spec in imagenet_classes.CLASSES:
    return imagenet_classes.CLASSES[spec]
  if spec == "data":
    names = getattr(source, "label_names", None)
    if not names:
      raise ValueError("zeroshot.classes='data' needs data with named classes (a folder of "
                       f"class folders); {getattr(source, 'name', source)!r} has none")
    return tuple(names)
  return tuple(_read_lines(spec, "zeroshot.classes"))


def templates_from(spec: str) -> tuple:
  """``config.zeroshot.templates`` -> prompt templates: ``"clip"`` (the CLIP
  paper's 80), ``"big_vision"`` (those and ``"{}"``) or a file, one template with
  one ``{}`` per line."""
  if spec in imagenet_classes.TEMPLATES:
    return imagenet_classes.TEMPLATES[spec]
  return tuple(_read_lines(spec, "zeroshot.templates"))
