"""Command-line plumbing shared by ``eval`` and ``calibrate``: flags, configs and the model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import jax
import jax.numpy as jnp

from mame_jax.eval import data as data_lib

DEFAULTS = dict(
    checkpoint=None, random_init=None, num_classes=1000, data=None, split=None,
    data_dir=None, label_map=None, tau=[0.8], tome_r=[], merge_layers=None,
    batch_size=256, limit=None, image_size=None, preprocess="auto", dtype="float32",
    runs=7, warmup=2, devices=None, distributed=False, json=None, progress=None)



def load_config(spec: str) -> dict:
  """``path/to/config.py[:arg]`` -> the dict of its ``get_config(arg)``."""
  path, arg = spec, None
  if ".py:" in spec:
    path, arg = spec.split(".py:", 1)
    path += ".py"
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  name = "_mame_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec_ = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  config = module.get_config(arg)
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return config


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared by ``eval`` and ``calibrate``. Defaults are applied later (so
  that a ``--config`` can sit between them and the command line)."""
  s = argparse.SUPPRESS
  parser.add_argument("--config", default=s,
                      help="configs/FILE.py[:arg]: flags from get_config(arg)")
  parser.add_argument("--checkpoint", default=s,
                      help="checkpoint file or URL (.npz big_vision/AugReg, timm "
                           ".safetensors/.pth); URLs are cached in $MAME_JAX_CACHE "
                           "or ~/.cache/mame_jax")
  parser.add_argument("--random-init", default=s, metavar="VARIANT",
                      help="smoke runs only: a randomly initialised ViT, e.g. S/16")
  parser.add_argument("--num-classes", type=int, default=s, help="with --random-init")
  parser.add_argument("--data", default=s,
                      help="imagenet2012 | imagenette | imagenet_v2 | photos | a folder "
                           "of class folders | tfds:NAME[:SPLIT]")
  parser.add_argument("--split", default=s)
  parser.add_argument("--data-dir", default=s, help="tfds data dir")
  parser.add_argument("--label-map", default=s,
                      help="class folders: 'imagenet' (folders named by WordNet id) or a "
                           "JSON file {class: label}")
  parser.add_argument("--merge-layers", default=s, help="MaMe blocks, e.g. 0-7")
  parser.add_argument("--batch-size", type=int, default=s)
  parser.add_argument("--limit", type=int, default=s, help="first N images only")
  parser.add_argument("--image-size", type=int, default=s)
  parser.add_argument("--preprocess", default=s,
                      choices=("auto",) + data_lib.PREPROCESS)
  parser.add_argument("--dtype", default=s, choices=("float32", "bfloat16", "float16"),
                      help="matmul dtype (vit.Model dtype_mm)")
  parser.add_argument("--runs", type=int, default=s, help="timed calls per method")
  parser.add_argument("--warmup", type=int, default=s)
  parser.add_argument("--devices", type=int, default=s,
                      help="shard over the first N local devices (default: all)")
  parser.add_argument("--distributed", action="store_true", default=s,
                      help="multi-host: call jax.distributed.initialize() first")
  parser.add_argument("--json", default=s, metavar="OUT", help="write the results here")
  parser.add_argument("--no-progress", dest="progress", action="store_false", default=s)


def resolve_flags(parser, argv, defaults: dict) -> dict:
  """defaults < ``--config`` < command line."""
  given = vars(parser.parse_args(argv))
  flags = dict(defaults)
  if "config" in given:
    config = load_config(given.pop("config"))
    unknown = sorted(set(config) - set(defaults))
    if unknown:
      raise ValueError(f"config keys {unknown} are not flags of this command")
    flags.update(config)
  flags.update(given)
  return flags


def load_from_flags(flags: dict):
  """``(model, params)`` from ``checkpoint`` (a path or URL) or ``random_init``."""
  from mame_jax.models import checkpoints, vit  # pylint: disable=import-outside-toplevel
  overrides = {} if flags["dtype"] == "float32" else {"dtype_mm": flags["dtype"]}
  if flags.get("checkpoint"):
    path = data_lib.cached_download(flags["checkpoint"])
    return checkpoints.load_model(path, image_size=flags.get("image_size"), **overrides)
  if flags.get("random_init"):
    size = flags.get("image_size") or 224
    model = vit.Model(flags["num_classes"], variant=flags["random_init"], pool_type="tok",
                      head_zeroinit=False, **overrides)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    return model, params
  raise ValueError("no model: pass --checkpoint PATH|URL (or --random-init VARIANT for "
                   "a smoke run with random weights)")


def label_map_from_flag(value):
  if value is None or value == "imagenet" or isinstance(value, dict):
    return value
  with open(value) as f:
    return json.load(f)

