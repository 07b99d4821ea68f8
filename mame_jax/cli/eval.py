"""``mame-jax eval``: Table 1 in one process (see ``mame_jax.eval.loop``), and
Table 3 -- zero-shot classification with a SigLIP two-tower checkpoint -- when
``--config.zeroshot.tokenizer`` is set (see :func:`zero_shot`). A VideoMAE
checkpoint (a transformers folder) with a folder of video class folders gives
Table 6 (``mame_jax.eval.video``; frames and views from ``--config.video.*``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common
from mame_jax.eval import data as data_lib
from mame_jax.eval import loop, methods, report


def parse(argv: Optional[Sequence[str]] = None):
  """``mame-jax eval`` arguments -> the resolved config (``common.eval_config``
  < ``--config`` < ``--config.a.b=v`` < short flags); exits 2 on a bad one."""
  parser = argparse.ArgumentParser(
      prog="mame-jax eval", description=loop.__doc__.split("\n\n")[0],
      argument_default=argparse.SUPPRESS)
  shorthands = flags_lib.add_common_flags(parser, ("auto",) + data_lib.PREPROCESS)
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


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax eval ...`` (``argv``: the arguments after ``eval``). Prints the
  table on stdout, progress on stderr; returns the exit status."""
  config = parse(argv)
  m, inp, ev = config.model, config.input, config.eval
  try:
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
    result = loop.evaluate(
        model, params, data, taus=[float(t) for t in config.merge.tau],
        tome_r=[int(r) for r in config.merge.tome_r], merge_layers=config.merge.layers,
        tome_recipe=config.merge.tome_recipe, extra=methods.baseline_rows(config.merge),
        batch_size=inp.batch_size, limit=inp.limit, preprocess=preprocess,
        image_size=m.image_size, split=inp.split, data_dir=inp.data_dir,
        label_map=flags_lib.label_map_from(inp.label_map), num_devices=ev.devices,
        runs=ev.runs, warmup=ev.warmup, progress=ev.progress,
        sampling=video_sampling(config), **head)
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax eval: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(report.format_report(result))
  payload = report.to_json(result)
  payload["config"] = flags_lib.to_jsonable(config)
  report.write_json(ev.json, payload)
  return 0
