"""Command-line plumbing shared by the commands that take ``--config``:
``mame-jax eval``, ``calibrate``, ``visualize`` and ``train.py``.

A command's settings are one ``ml_collections.ConfigDict`` (the layout is in
``mame_jax.configs.common``), resolved as

    the command's default config  <  --config FILE.py[:arg]
      <  --config.a.b=value overrides  <  the short flags (--tau, --checkpoint, ...)

The config file and the overrides are ml_collections' own ``config_flags``:
the file is read by ``DEFINE_config_file`` (which hands ``arg`` to
``get_config``), merged over the default config, and the overrides are parsed
by ``DEFINE_config_dict`` on that merged config, so each value takes its
field's type and an unknown field is an error. Each call uses a private
``absl.flags.FlagValues``, so that a process may parse many command lines
(the tests do). Our commands are argparse programs, so the arguments are split
first: ``--config``, ``--config=...``, ``--config.a.b=v`` and
``--config.a.b v`` go to absl, the rest to argparse.

A short flag is an argparse option whose ``dest`` maps to a config field (or
to a function that sets fields); it wins when given. Its default is
``argparse.SUPPRESS``, so that only flags actually given take part.

``model.arch`` is open: a config file may add any key to it, and an override
``--config.model.arch.NAME=VALUE`` may add any ``vit.Model`` attribute, parsed
as that attribute's type (:func:`arch_fields`; ``--config.model.arch.num_heads=4``,
``--config.model.arch.ln_eps=1e-5``, ``--config.model.arch.patch_size="(14, 14)"``).
An override of a name ``vit.Model`` does not have is an error listing those it has.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

from absl import flags as absl_flags
import ml_collections
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_path

# The parts of a config that belong to one command each; a command ignores the
# others' (one file may describe a model for several commands).
COMMAND_SECTIONS = ("eval", "calibrate", "visualize", "train")
# The parts whose keys a config file or an override may add (vit.Model attributes).
OPEN_SECTIONS = ("model.arch",)
# Fields of vit.Model that are not architecture: flax's own, and the merge (the
# config's merge part sets it).
_NOT_ARCH = ("parent", "name", "merge")
_OVERRIDE = re.compile(r"^--?(no)?config\.([A-Za-z_][\w.]*)(=.*)?$", re.S)
_FILE = re.compile(r"^--?config(=(.*))?$", re.S)

Shorthand = Union[str, Callable[[ml_collections.ConfigDict, object], None]]


class ConfigError(ValueError):
  """A bad ``--config`` file, override or short flag; the message names it."""


def configs_dir() -> str:
  """The folder of the installed configs (``mame_jax.configs``): the
  repository's ``configs/`` in a clone, the package's copy otherwise."""
  import mame_jax.configs  # pylint: disable=import-outside-toplevel
  return os.path.dirname(os.path.abspath(mame_jax.configs.__file__))


def resolve_config_path(path: str) -> str:
  """``path`` when it exists; otherwise, for ``configs/NAME.py`` (or
  ``NAME.py``) the installed copy of that config, so that the commands in the
  docs work outside a clone too."""
  if os.path.exists(path):
    return path
  head, name = os.path.split(path)
  if head in ("", "configs"):
    installed = os.path.join(configs_dir(), name)
    if os.path.exists(installed) and name.endswith(".py"):
      return installed
  raise ConfigError(f"--config: config file {path!r} not found (a path to a .py file "
                    "with get_config(arg), e.g. configs/deit_s.py)")


def split_argv(argv: Sequence[str], is_bool: Callable[[str], bool] = lambda path: False):
  """``argv`` -> ``(config_file, overrides, rest)``: the ``--config`` value
  (``None`` if not given; the last one wins), the ``--config.a.b`` tokens for
  absl (``--config.a.b v`` keeps its value with it unless the field is a bool,
  whose flag takes no separate value) and everything else, in order, for
  argparse."""
  config_file, overrides, rest = None, [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    token = argv[i]
    if token == "--":
      rest.extend(argv[i:])
      break
    file_match, override = _FILE.match(token), _OVERRIDE.match(token)
    if file_match:
      if file_match.group(1) is not None:
        config_file = file_match.group(2)
      elif i + 1 < len(argv):
        config_file = argv[i + 1]
        i += 1
      else:
        raise ConfigError("--config: expected a config file, FILE.py[:arg]")
    elif override:
      overrides.append(token)
      path = override.group(2)
      takes_value = override.group(3) is None and not override.group(1) and not is_bool(path)
      if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        overrides.append(argv[i + 1])
        i += 1
      elif takes_value:
        raise ConfigError(f"--config.{path}: expected a value (--config.{path}=VALUE)")
    else:
      rest.append(token)
    i += 1
  return config_file, overrides, rest


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``FILE.py[:arg]`` -> its ``get_config(arg)``, read by ml_collections'
  ``DEFINE_config_file`` (unlocked, a ``ConfigDict``)."""
  path, sep, arg = spec.partition(":")
  spec = resolve_config_path(path) + sep + arg
  flag_values = absl_flags.FlagValues()
  argv = ["mame-jax", f"--config={spec}"]
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv,
                                           lock_config=False)
  try:
    with warnings.catch_warnings():
      # config_flags reads the file with the deprecated SourceFileLoader.load_module.
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      flag_values(argv)
    config = holder.value
    if isinstance(config, dict):
      config = ml_collections.ConfigDict(config)
    config.keys()  # a file that failed to load raises its error here
  except (absl_flags.Error, OSError) as e:
    raise ConfigError(f"--config {spec}: {_last_line(e)}") from None
  except AttributeError:
    raise ConfigError(f"--config {spec}: get_config() must return an "
                      f"ml_collections.ConfigDict; got {type(config).__name__}") from None
  return config


def _last_line(error: Exception) -> str:
  """config_flags puts the whole traceback of a failing ``get_config`` into its
  message; its last line is the error itself."""
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1].strip() if lines else type(error).__name__


def merge_into(config: ml_collections.ConfigDict, other, source: str, prefix: str = ""):
  """Sets every field of ``other`` in ``config`` (recursively), so that a
  config file may give only the fields it changes. A field ``config`` does not
  have is an error naming it and ``source``; the parts of other commands are
  skipped."""
  for key, value in other.items():
    path = prefix + key
    if key not in config and prefix.rstrip(".") in OPEN_SECTIONS:
      config[key] = value
      continue
    if key not in config:
      if not prefix and key in COMMAND_SECTIONS:
        continue
      known = ", ".join(sorted(config.keys()))
      raise ConfigError(f"{source}: {path!r} is not a setting of this command "
                        f"({prefix.rstrip('.') or 'the config'} has: {known})")
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{source}: {path!r} must be a ConfigDict of settings; got {value!r}")
      merge_into(config[key], value, source, path + ".")
      continue
    try:
      config[key] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{source}: field {path}: {e}") from None


def has_field(config, path: str) -> bool:
  node = config
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return False
    node = node[key]
  return True


def field_type(config, path: str):
  """The type of a field (a placeholder's declared type)."""
  return config_path.get_type(path, config)


def _unknown_field(config, path: str) -> ConfigError:
  node, done = config, []
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      break
    node, done = node[key], done + [key]
  where = ".".join(done) or "the config"
  known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
  extra = f" ({where} has: {known})" if known else f" ({where} is not a ConfigDict)"
  return ConfigError(f"--config.{path}: unknown config field {path!r}{extra}")


def arch_fields() -> dict:
  """``{name: type}`` of the ``vit.Model`` attributes an open section takes, each
  with the type its override is parsed as: the attribute's own when it is ``int``,
  ``float``, ``bool`` or ``str`` (``Optional[T]`` as ``T``), else ``object``, which
  ml_collections parses as a Python literal (``(14, 14)``, ``None``; other text
  stays a string)."""
  from mame_jax.models import vit  # pylint: disable=import-outside-toplevel
  hints = typing.get_type_hints(vit._Model)  # pylint: disable=protected-access
  out = {}
  for field in dataclasses.fields(vit._Model):  # pylint: disable=protected-access
    if field.name in _NOT_ARCH:
      continue
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[T]
      hint = args[0]
    out[field.name] = hint if hint in (int, float, bool, str) else object
  return out


def add_open_fields(config: ml_collections.ConfigDict, paths: Sequence[str]) -> None:
  """Adds to an open section (:data:`OPEN_SECTIONS`) each field that one of the
  override ``paths`` (``"model.arch.num_heads"``) names and the section does not
  hold yet: a placeholder of its :func:`arch_fields` type, which the override then
  sets. A name ``vit.Model`` does not have is a ``ConfigError`` listing those it has."""
  fields = None
  for path in paths:
    section, _, name = path.rpartition(".")
    if section not in OPEN_SECTIONS or not has_field(config, section):
      continue
    node = config_path.get_value(section, config)
    if name in node:
      continue
    fields = fields or arch_fields()
    if name not in fields:
      raise ConfigError(f"--config.{path}: vit.Model has no attribute {name!r}; {section} "
                        f"takes: {', '.join(sorted(fields))}")
    node[name] = config_dict.placeholder(fields[name])


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The ``--config.a.b=value`` tokens applied to ``config`` by ml_collections'
  ``DEFINE_config_dict`` (each value parsed as its field's type)."""
  if not overrides:
    return config
  for token in overrides:
    match = _OVERRIDE.match(token)
    if match and not has_field(config, match.group(2)):
      raise _unknown_field(config, match.group(2))
  flag_values = absl_flags.FlagValues()
  argv = ["mame-jax"] + list(overrides)
  holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                           sys_argv=argv, lock_config=True)
  try:
    left = flag_values(argv)
  except absl_flags.Error as e:
    raise ConfigError(str(e)) from None
  if len(left) > 1:
    raise ConfigError(f"unexpected argument(s) after a --config field: {left[1:]}")
  return holder.value


def resolve(prog: str, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
            default_config: ml_collections.ConfigDict,
            shorthands: Mapping[str, Shorthand]):
  """``(config, args)``: the resolved config (see the module docstring) and
  argparse's namespace of the other arguments. A bad argument exits as
  argparse does (status 2, ``prog: error: ...``)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    # The file, and the fields the overrides name (their values are split off
    # right only once the fields' types are known, below).
    config_file, named, _ = split_argv(argv, is_bool=lambda path: True)
    config = default_config
    config.lock()
    for path in OPEN_SECTIONS:
      if has_field(config, path):
        config_path.get_value(path, config).unlock()
    if config_file is not None:
      merge_into(config, load_config_file(config_file), f"--config {config_file}")
    add_open_fields(config, [m.group(2) for m in map(_OVERRIDE.match, named) if m])
    is_bool = lambda path: has_field(config, path) and field_type(config, path) is bool
    _, overrides, rest = split_argv(argv, is_bool)
    config = apply_overrides(config, overrides)
  except ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  for dest, target in shorthands.items():
    if dest not in vars(args):
      continue
    value = getattr(args, dest)
    try:
      if callable(target):
        target(config, value)
      else:
        set_field(config, target, value)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      parser.error(f"--{dest.replace('_', '-')}: {e}")
  return config, args


def set_field(config: ml_collections.ConfigDict, path: str, value) -> None:
  """``config.a.b = value`` for ``path = "a.b"``."""
  *parents, last = path.split(".")
  node = config
  for key in parents:
    node = node[key]
  node[last] = tuple(value) if isinstance(value, list) else value


def to_jsonable(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (for result files and the train workdir)."""
  return json.loads(config.to_json_best_effort())


def label_map_from(value):
  """``input.label_map``: ``None``, ``"imagenet"``, a dict, or a JSON file of one."""
  if value is None or value == "imagenet" or isinstance(value, (dict, ml_collections.ConfigDict)):
    return value
  with open(value) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# The short flags of eval and calibrate


def add_config_flag(parser: argparse.ArgumentParser) -> None:
  """``--config FILE.py[:ARG]`` in a command's help (``resolve`` reads it)."""
  parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.py[:ARG]",
                      help="a config file (get_config(ARG)); --config.a.b=VALUE "
                           "overrides a field of it")


def checked_text(check: Callable[[str], object]) -> Callable[[str], str]:
  """An argparse ``type`` that keeps the text of an option after ``check(text)``
  accepts it; ``check``'s ``ValueError`` becomes argparse's error message as it
  is (argparse would otherwise replace it with "invalid value")."""

  def parse(text: str) -> str:
    try:
      check(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from e
    return text

  return parse


def add_common_flags(parser: argparse.ArgumentParser, preprocess_choices=None) -> dict:
  """The short flags shared by ``eval`` and ``calibrate``; returns their
  shorthands (``dest`` -> config field). Defaults are ``SUPPRESS``: only the
  flags given take part."""
  s = argparse.SUPPRESS
  add_config_flag(parser)
  parser.add_argument("--checkpoint", default=s,
                      help="model.checkpoint: checkpoint file or URL (.npz big_vision/"
                           "AugReg, timm .safetensors/.pth); URLs are cached in "
                           "$MAME_JAX_CACHE or ~/.cache/mame_jax")
  parser.add_argument("--random-init", default=s, metavar="VARIANT",
                      help="model.variant (and no checkpoint): a randomly initialised "
                           "ViT, e.g. S/16, for smoke runs")
  parser.add_argument("--num-classes", type=int, default=s,
                      help="model.num_classes, with --random-init")
  parser.add_argument("--data", default=s,
                      help="input.data: imagenet2012 | imagenette | imagenet_v2 | photos | "
                           "a folder of class folders | tfds:NAME[:SPLIT]")
  parser.add_argument("--split", default=s, help="input.split")
  parser.add_argument("--data-dir", default=s, help="input.data_dir: tfds data dir")
  parser.add_argument("--label-map", default=s,
                      help="input.label_map, for class folders: 'imagenet' (folders named "
                           "by WordNet id) or a JSON file {class: label}")
  parser.add_argument("--merge-layers", default=s, help="merge.layers: MaMe blocks, e.g. 0-7")
  parser.add_argument("--batch-size", type=int, default=s, help="input.batch_size")
  parser.add_argument("--limit", type=int, default=s,
                      help="input.limit: first N images only (0: all)")
  parser.add_argument("--image-size", type=int, default=s, help="model.image_size")
  parser.add_argument("--preprocess", default=s, choices=preprocess_choices,
                      help="model.preprocess")
  parser.add_argument("--crop-pct", type=float, default=s,
                      help="model.crop_pct: the share of the resized image the central "
                           "crop keeps (1.0: resize to the model's size, no crop; default: "
                           "the preprocessing's own)")
  parser.add_argument("--dtype", default=s, choices=("float32", "bfloat16", "float16"),
                      help="model.dtype: matmul dtype (vit.Model dtype_mm)")
  parser.add_argument("--runs", type=int, default=s, help="eval.runs: timed calls per method")
  parser.add_argument("--warmup", type=int, default=s, help="eval.warmup")
  parser.add_argument("--devices", type=int, default=s,
                      help="eval.devices: shard over the first N local devices (default: all)")
  parser.add_argument("--distributed", action="store_true", default=s,
                      help="eval.distributed: multi-host, call jax.distributed.initialize() "
                           "first")
  parser.add_argument("--json", default=s, metavar="OUT", help="eval.json: write the results here")
  parser.add_argument("--no-progress", dest="progress", action="store_false", default=s,
                      help="eval.progress = False")
  parser.add_argument("--tau", type=float, nargs="*", default=s,
                      help="merge.tau: MaMe thresholds, one row each")
  parser.add_argument("--tome-r", type=int, nargs="*", default=s,
                      help="merge.tome_r: ToMe r values, one row each")
  parser.add_argument("--evit", type=float, nargs="*", default=s,
                      help="merge.evit: EViT keep rates, one row each (blocks "
                           "merge.evit_layers, default EViT's 3,6,9)")
  parser.add_argument("--diffrate", nargs="*", default=s,
                      help="merge.diffrate: DiffRate's published schedules, one row each, "
                           "as MODEL@GFLOPS (e.g. deit_small@2.3)")

  def random_init(config, variant):
    config.model.variant = variant
    config.model.checkpoint = None

  return {
      "checkpoint": "model.checkpoint", "random_init": random_init,
      "num_classes": "model.num_classes", "image_size": "model.image_size",
      "dtype": "model.dtype", "preprocess": "model.preprocess", "crop_pct": "model.crop_pct",
      "tau": "merge.tau", "tome_r": "merge.tome_r", "merge_layers": "merge.layers",
      "evit": "merge.evit", "diffrate": "merge.diffrate",
      "data": "input.data", "split": "input.split", "data_dir": "input.data_dir",
      "label_map": "input.label_map", "batch_size": "input.batch_size",
      "limit": lambda config, n: set_field(config, "input.limit", n or None),
      "runs": "eval.runs", "warmup": "eval.warmup", "devices": "eval.devices",
      "distributed": "eval.distributed", "json": "eval.json", "progress": "eval.progress",
  }


def load_model_from(config: ml_collections.ConfigDict, *, merge=None, seed: int = 0,
                    require: bool = True, tower: str = "img"):
  """``(model, params)`` of ``config.model`` by ``mame_jax.models.load.load_model``:
  its checkpoint, else random weights of its variant. ``require``: neither is
  an error naming the flags (eval and calibrate: there is nothing to measure).
  ``tower``: of a SigLIP file, ``"img"`` (default, the image tower as a ViT) or
  ``"both"`` (zero-shot eval: the two towers)."""
  from mame_jax.models import load  # pylint: disable=import-outside-toplevel
  m = config.model
  if require and not m.checkpoint and not m.get("variant"):
    raise ValueError("no model: pass --checkpoint PATH|URL (--config.model.checkpoint), or "
                     "--random-init VARIANT (--config.model.variant) for a smoke run with "
                     "random weights")
  arch = m.arch.to_dict() if "arch" in m else {}
  return load.load_model(m.checkpoint or None, variant=m.get("variant") or None,
                         num_classes=m.get("num_classes", 1000),
                         image_size=m.get("image_size") or None, merge=merge,
                         dtype=m.get("dtype"), seed=seed, tower=tower, **arch)
