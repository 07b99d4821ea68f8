"""``mame-jax eval``: Table 1 in one process (see ``mame_jax.eval.loop``), and
Table 3 -- zero-shot classification with a SigLIP two-tower checkpoint -- when
``--config.zeroshot.tokenizer`` is set (see :func:`zero_shot`). A VideoMAE
checkpoint (a transformers folder) with a folder of video class folders gives
Table 6 (``mame_jax.eval.video``; frames and views from ``--config.video.*``).
``--match-gflops-of-tau TAU`` (``eval.match_tau``) sets ToMe, EViT and DiffRate to
the GFLOPs of MaMe at TAU first (:func:`flop_match`, ``mame_jax.eval.matching``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

import jax

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval import data as data_lib
from mame_jax.eval import loop, matching, methods, report
from mame_jax.eval import video as video_lib
from mame_jax.models.merging import parse_layers
from mame_jax.models.vit import image_size_of


def parse(argv: Optional[Sequence[str]] = None):
  """``mame-jax eval`` arguments -> the resolved config (``common.eval_config``
  < ``--config`` < ``--config.a.b=v`` < short flags); exits 2 on a bad one."""
  parser = argparse.ArgumentParser(
      prog="mame-jax eval", description=loop.__doc__.split("\n\n")[0],
      argument_default=argparse.SUPPRESS)
  shorthands = flags_lib.add_common_flags(parser, ("auto",) + data_lib.PREPROCESS)
  parser.add_argument("--match-gflops-of-tau", type=float, metavar="TAU",
                      help="eval.match_tau: measure MaMe at TAU on the first batch, then set "
                           "ToMe's r, EViT's keep rate and DiffRate's published schedule to "
                           "its GFLOPs (they replace the --tome-r / --evit / --diffrate rows)")
  shorthands["match_gflops_of_tau"] = "eval.match_tau"
  config, _ = flags_lib.resolve("mame-jax eval", parser, argv, common.eval_config(),
                                shorthands)
  return config


def zero_shot(config):
  """Zero-shot mode (``config.zeroshot.tokenizer`` set): ``(image tower, its
  params, data, {"head": ..., "head_params": ...})`` for ``loop.evaluate``. The
  two towers are loaded, the class embeddings (``zeroshot.classes`` x
  ``zeroshot.templates``) computed once, and every row merges in the image tower
  (no class token there: the MAP head pools, so num_special = 0)."""
  from mame_jax import tokenizers  # pylint: disable=import-outside-toplevel
  from mame_jax.eval import zeroshot  # pylint: disable=import-outside-toplevel
  from mame_jax.models import load  # pylint: disable=import-outside-toplevel
  zs, inp = config.zeroshot, config.input
  if not config.model.checkpoint:
    raise ValueError("zero-shot eval (zeroshot.tokenizer is set) needs a SigLIP two-tower "
                     "checkpoint: pass --checkpoint PATH|URL|NAME (e.g. siglip_b16_512)")
  model, params = flags_lib.load_model_from(config, tower="both")
  data = inp.data
  if zs.classes == "data":  # the class folders' names: read the source here, once
    data = data_lib.load_source(data, split=inp.split, data_dir=inp.data_dir,
                                label_map=flags_lib.label_map_from(inp.label_map))
  names = zeroshot.class_names_from(zs.classes, data)
  if zs.style == "clip":  # CLIP's BPE: the folder's (or a known name's) tokenizer.json
    from mame_jax.models import clip  # pylint: disable=import-outside-toplevel
    tok = tokenizers.CLIPTokenizer(clip.tokenizer_file(zs.tokenizer), zs.length)
  else:
    tok = tokenizers.Tokenizer(load.fetch(zs.tokenizer), zs.length, zs.style)
  classifier = zeroshot.ZeroShot(model, params, tok, templates=zeroshot.templates_from(
      zs.templates))
  head, head_params = classifier.head(names)
  return model.img, params["img"], data, {"head": head, "head_params": head_params}


def video_sampling(config) -> dict:
  """``config.video``'s set fields, the ``sampling`` of ``loop.evaluate`` (read
  only for video models, e.g. a transformers VideoMAE folder)."""
  part = config.get("video")
  return {} if part is None else {k: v for k, v in part.to_dict().items() if v is not None}


def flop_match(config, model, params, data, preprocess):
  """``--match-gflops-of-tau`` (``eval.match_tau``): MaMe measured at that tau on
  the first batch of the evaluation data (``input.batch_size`` images, at most
  ``input.limit``; preprocessed as ``loop.evaluate`` will), then ToMe (with
  ``merge.tome_recipe``), EViT (in ``merge.evit_layers``) and DiffRate (the models
  named in ``merge.diffrate``, else any) matched to its GFLOPs
  (``mame_jax.eval.matching``). Image classifiers only."""
  m, inp = config.model, config.input
  what = "--match-gflops-of-tau (eval.match_tau)"
  if config.zeroshot.tokenizer or video_lib.is_video_model(model):
    raise ValueError(f"{what} works on image classifiers (a ViT with a class token); not "
                     "with zero-shot or video models")
  size = int(m.image_size or image_size_of(model, params))
  kind = data_lib.preprocess_for(model) if preprocess in (None, "auto") else preprocess
  source = data_lib.load_source(data, split=inp.split, data_dir=inp.data_dir,
                                label_map=flags_lib.label_map_from(inp.label_map))
  n = len(source) if inp.limit is None else min(len(source), int(inp.limit))
  if n == 0:
    raise ValueError(f"{what}: no images in {source.name} to measure MaMe on")
  loader = data_lib.Loader(source, data_lib.preprocess_fn(kind, size, m.crop_pct),
                           min(inp.batch_size, n), limit=n, warn=False)
  batch = next(iter(loader))
  models = sorted({s.partition("@")[0].strip() for s in config.merge.diffrate}) or None
  try:
    return matching.match_to_mame(
        model, params, batch.images, float(config.eval.match_tau), valid=batch.valid,
        merge_layers=parse_layers(config.merge.layers),
        evit_layers=parse_layers(config.merge.evit_layers),
        tome_fields={k: v for k, v in dataclasses.asdict(methods.tome_rows(
            [0], config.merge.tome_recipe)[0]).items() if k != "r"},
        diffrate_models=models, mame_fields=common.mame_fields(config.merge))
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax eval ...`` (``argv``: the arguments after ``eval``). Prints the
  table on stdout, progress on stderr; returns the exit status."""
  config = parse(argv)
  m, inp, ev = config.model, config.input, config.eval
  try:
    if ev.match_tau is not None:  # before anything is loaded
      try:
        matching.check_tau(ev.match_tau)
      except ValueError as e:
        raise ValueError(f"--match-gflops-of-tau (eval.match_tau): {e}") from None
    if ev.distributed:
      jax.distributed.initialize()
    if not inp.data:
      raise ValueError("no data: pass --data NAME (--config.input.data; e.g. imagenet2012, "
                       "imagenette, photos, a folder)")
    data, preprocess, head = inp.data, m.preprocess, {}
    if config.zeroshot.tokenizer:
      model, params, data, head = zero_shot(config)
      preprocess = "siglip" if preprocess in (None, "auto") else preprocess
    else:
      model, params = flags_lib.load_model_from(config)
    taus = [float(t) for t in config.merge.tau]
    tome_r, extra, match = [int(r) for r in config.merge.tome_r], None, None
    if ev.match_tau is not None:
      match = flop_match(config, model, params, data, preprocess)
      taus += [] if match.tau in taus else [match.tau]
      tome_r, extra = [], match.configs
    result = loop.evaluate(
        model, params, data, taus=taus, tome_r=tome_r, merge_layers=config.merge.layers,
        tome_recipe=config.merge.tome_recipe, mame_fields=common.mame_fields(config.merge),
        extra=methods.baseline_rows(config.merge) if extra is None else extra,
        batch_size=inp.batch_size, limit=inp.limit, preprocess=preprocess,
        crop_pct=m.crop_pct, image_size=m.image_size, split=inp.split, data_dir=inp.data_dir,
        label_map=flags_lib.label_map_from(inp.label_map), num_devices=ev.devices,
        runs=ev.runs, warmup=ev.warmup, progress=ev.progress,
        sampling=video_sampling(config), **head)
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax eval: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(report.format_report(result))
    if match is not None:
      print(matching.format_match(match, model, result["rows"]))
  payload = report.to_json(result)
  if match is not None:
    payload["match"] = matching.match_json(match, model, result["rows"])
  payload["config"] = flags_lib.to_jsonable(config)
  report.write_json(ev.json, payload)
  return 0
