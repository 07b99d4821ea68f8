"""Zero-shot classification with a SigLIP two-tower model.

Each class name is written into every prompt template (``"a photo of a {}."``) --
both first canonicalised as big_vision's zero-shot evaluator does (lower case, no
punctuation, the first alias: ``mame_jax.tokenizers.canonicalize_text``) -- the
text tower embeds the prompts, and a class's embedding is the mean of its
prompts' embeddings, L2-normalised again (CLIP's prompt ensembling, which
big_vision's SigLIP evaluators do too). Those embeddings are computed once per
list of class names and cached. Images go through the image tower by the
:class:`~mame_jax.eval.runner.Runner` -- so MaMe (exact or fixed mode) or ToMe in
the image tower works as in every other evaluation -- and their embeddings meet
the class embeddings through SigLIP's logits ``zimg @ zcls.T * exp(t) + b``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mame_jax import tokenizers
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
    activation: ``"sigmoid"`` (SigLIP's own pairwise probability) or
      ``"softmax"`` (over the classes; rows sum to 1: CLIP's); ``None`` (default):
      what the model was trained with, ``model.activation``.
    canonicalize: clean up class names and templates before tokenising, as
      big_vision's evaluator (``canonicalize=True``, ``first_class_name_only=True``
      there): ``"a photo of a {}."`` x ``"St. Bernard"`` -> ``"a photo of a st
      bernard"``. ``False``: the strings as given (the tokeniser still lower-cases).
  """

  def __init__(self, model, params, tokenizer, *, templates: Sequence[str] = TEMPLATES,
               activation: Optional[str] = None, text_batch: int = 256,
               canonicalize: bool = True):
    if activation is None:
      activation = getattr(model, "activation", "sigmoid")
    if activation not in ("sigmoid", "softmax"):
      raise ValueError(f"activation must be 'sigmoid' or 'softmax'; got {activation!r}")
    if not templates or any(t.count("{}") != 1 for t in templates):
      raise ValueError(f"templates must each hold exactly one '{{}}'; got {templates!r}")
    tokenizers.check_vocab(tokenizer, params)
    txt = model.txt
    if txt.max_len is not None and (tokenizer.length > txt.max_len or (
        tokenizer.length != txt.max_len and txt.fixed_length)):
      takes = "exactly" if txt.fixed_length else "at most"
      raise ValueError(f"tokenizer length {tokenizer.length}: the text tower takes "
                       f"{takes} {txt.max_len} tokens (its max_len)")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.canonicalize = bool(canonicalize)
    self.templates = tuple(tokenizers.canonical_template(t) if canonicalize else t
                           for t in templates)
    self.activation, self.text_batch = activation, text_batch
    self.runner = Runner(model.img, params["img"])
    # What two_towers.Model returns as ``out``: exp(t) and b.
    self._out = {"t": jnp.exp(params["t"])}
    if "b" in params:
      self._out["b"] = params["b"]
    self._embed_text = jax.jit(lambda p, ids: model.txt.apply({"params": p}, ids)[0])
    self._cache: dict = {}

  def with_merge(self, merge) -> "ZeroShot":
    """This classifier with the image tower running ``merge`` (a ``MergeConfig``,
    ``ToMeConfig`` or ``None``); the text tower and its cached class embeddings are
    shared, so switching costs no text embedding."""
    other = copy.copy(self)
    other.runner = Runner(self.model.img.clone(merge=merge), self.params["img"])
    return other

  def prompt_name(self, name: str) -> str:
    """A class name as it goes into the templates (canonicalised, first alias)."""
    return tokenizers.canonical_class_name(name) if self.canonicalize else name

  def prompts(self, class_names: Sequence[str]) -> list:
    """The texts the text tower embeds: every class (:meth:`prompt_name`) in every
    template, class-major (``C * len(templates)``)."""
    return [tokenizers.fill_template(t, self.prompt_name(c)) for c in class_names
            for t in self.templates]

  def class_embeddings(self, class_names: Sequence[str]) -> jax.Array:
    """``(C, E)``: per class the mean of its prompts' normalised embeddings,
    normalised again. Cached per tuple of class names (and templates)."""
    names = tuple(class_names)
    key = (names, self.templates)
    if key not in self._cache:
      ids = self.tokenizer(self.prompts(names))
      z = np.concatenate([
          np.asarray(text_lib.l2_normalize(
              self._embed_text(self.params["txt"], ids[i:i + self.text_batch])))
          for i in range(0, len(ids), self.text_batch)])
      z = z.reshape(len(names), len(self.templates), -1).mean(axis=1)
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


# ----------------------------------------------------------------------------
# A classifier for notebooks and demos: the real SigLIP, or a random stand-in.


def random_two_towers(vocab_size: int, *, image_size: int = 224, depth: int = 4,
                      width: int = 192, text_length: int = 16, seed: int = 0):
  """``(model, params)``: a small randomly initialised SigLIP-shaped two-tower model
  -- the image tower a ViT with 16-px patches, no class token and the MAP head, as
  SigLIP's (so MaMe runs with ``num_special = 0``); the text tower 1 block of width
  64 over ``vocab_size`` ids, ``text_length`` tokens; ``t = log 10``, ``b = -10``
  (SigLIP's initial values)."""
  from mame_jax.models import load, vit  # pylint: disable=import-outside-toplevel
  img = vit.Model(None, width=width, depth=depth, num_heads=max(1, width // 64),
                  mlp_dim=4 * width, patch_size=16, pool_type="map", class_token=False)
  txt = text_lib.Model(width, width=64, depth=1, mlp_dim=128, num_heads=2,
                       vocab_size=int(vocab_size), max_len=text_length, normalize=False)
  model = two_towers.Model(img=img, txt=txt, temperature_init=10.0, bias_init=-10.0)
  # NumPy draws (load.random_params): no initialiser to compile or dispatch.
  ids = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
  params = {"img": load.random_params(img, image_size, seed),
            "txt": load.random_params(txt, seed=seed, inputs=(ids,)),
            "t": jnp.full((1,), np.log(10.0), jnp.float32),
            "b": jnp.full((1,), -10.0, jnp.float32)}
  return model, params


def pretrained_or_random(checkpoint: str = "siglip_b16_512",
                         tokenizer: str = "siglip_tokenizer", *, style: str = "siglip",
                         length: int = 64, words: Sequence[str] = (), workdir=".",
                         offline: Optional[bool] = None, timeout: float = 10.0,
                         templates: Sequence[str] = TEMPLATES, fallback_depth: int = 2):
  """``(ZeroShot, note)``: the SigLIP checkpoint and its tokeniser (anything
  ``load_model`` / ``load.fetch`` take: known names, URLs, files) when they can be
  had; else -- offline (``$MAME_JAX_OFFLINE=1``, or ``offline=True``) or when a
  download fails -- :func:`random_two_towers` with a SentencePiece model trained
  here (``mame_jax.tokenizers.train_tokenizer``, in ``workdir``) on ``words`` and the
  templates' words; ``fallback_depth`` image blocks (shallow: on a CPU compiling
  the merged tower costs more than running it). ``note`` is one line saying which (the fallback's contains
  "randomly initialised")."""
  from mame_jax.models import load  # pylint: disable=import-outside-toplevel
  if offline is None:
    offline = load.is_offline()
  why = f"offline ({load.OFFLINE_ENV}=1)"
  if not offline:
    try:
      model, params = load.load_model(checkpoint, tower="both", timeout=timeout)
      tok = tokenizers.Tokenizer(load.fetch(tokenizer, timeout=timeout), length, style)
      return (ZeroShot(model, params, tok, templates=templates),
              f"checkpoint {checkpoint} with tokenizer {tokenizer}")
    except (OSError, load.ChecksumError) as e:
      why = f"could not get {checkpoint} / {tokenizer} ({load._one_line(e)})"  # pylint: disable=protected-access
  vocab = sorted({w for t in (*words, *templates) for w in
                  tokenizers.canonicalize_text(t.replace("{}", " ")).split()})
  spm = tokenizers.train_tokenizer(vocab, os.path.join(os.fspath(workdir), "offline_spm"),
                                   style=style)
  tok = tokenizers.Tokenizer(spm, 16, style)
  model, params = random_two_towers(tok.vocab_size, text_length=16, depth=fallback_depth)
  img = model.img
  note = (f"{why}: using randomly initialised two towers (image tower width {img.width}, "
          f"depth {img.depth}, MAP head) and a {tok.vocab_size}-piece SentencePiece model "
          f"trained here on {len(vocab)} words, instead of {checkpoint}: the labels are "
          "not a trained model's")
  return ZeroShot(model, params, tok, templates=templates), note

