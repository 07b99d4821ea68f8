"""What the configs in this folder share: the Table 1 evaluation config.

Configs import only this module and ``ml_collections``, never the evaluation code.
"""

from typing import Optional

import ml_collections


def parse_config_arg(arg: Optional[str], **defaults):
  """big_vision-style config argument: ``"key=value,flag,..."`` over
  ``defaults`` -> a ``ConfigDict``; values take the type of the default (a bare
  ``flag`` is True). Used by ``configs/*.py``:
  ``get_config("tau=0.7,batch_size=512")``."""
  out = dict(defaults)
  for part in (arg or "").split(","):
    if not part:
      continue
    key, sep, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None or isinstance(default, str):
      out[key] = value
    else:
      out[key] = type(default)(value)
  return ml_collections.ConfigDict(out)


def table1_config(arg: Optional[str], *, checkpoint: str, preprocess: str, tome_r: int,
                  image_size: int = 224):
  """The evaluation config shared by ``configs/*.py`` (one per Table 1 row).

  Rows: baseline, MaMe (``tau`` = 0.8, the first 8 blocks: the paper's
  training-free default) and ToMe (``tome_r`` in every block, proportional
  attention; r chosen for about half the baseline's FLOPs, as its Table 1 row).
  GFLOPs are XLA's count (2 FLOPs per multiply-add), about twice the paper's
  fvcore figures; throughput depends on device and dtype, so compare the
  speedup *ratios* with the paper's, not the images/s.

  Data: ImageNet-1k validation through tfds (``imagenet2012``), prepared once
  offline (``tfds build imagenet2012 --file_format=array_record`` with the
  ILSVRC2012 tarballs in the manual dir); ``:data=imagenette`` or ``--data PATH``
  (class folders) for a quick look. URL checkpoints are downloaded once into
  ``$MAME_JAX_CACHE`` (default ``~/.cache/mame_jax``); ``--checkpoint PATH``
  uses a local file instead.

  ``arg``: comma-separated ``key=value`` overrides of batch_size, dtype
  (``float32`` | ``bfloat16`` | ``float16``; the paper times FP16), data, tau,
  tome_r (0: no ToMe row) and limit (0: all images).
  """
  arg = parse_config_arg(arg, batch_size=256, dtype="float32", data="imagenet2012",
                         tau=0.8, tome_r=tome_r, limit=0)
  config = ml_collections.ConfigDict()
  config.checkpoint = checkpoint
  config.data = arg.data
  config.preprocess = preprocess
  config.image_size = image_size
  config.merge_layers = "0-7"
  config.tau = [arg.tau]
  config.tome_r = [arg.tome_r] if arg.tome_r else []
  config.batch_size = arg.batch_size
  config.dtype = arg.dtype
  config.limit = arg.limit or None
  return config

