"""What the configs in this folder share: each command's default config, the
Table 1 evaluation config and the parser of a config's ``arg``.

A config is an ``ml_collections.ConfigDict`` with one part per concern, so that
one file can describe a model, its merge and its data once for every command:

* ``model``: ``checkpoint`` (a path, a URL or a known short name; ``None``:
  random weights of ``variant``), ``variant`` (e.g. ``"S/16"``, for random
  init), ``num_classes``, ``image_size`` (``None``: the checkpoint's),
  ``dtype`` (matmul dtype: ``float32`` | ``bfloat16`` | ``float16``) and
  ``preprocess`` (``auto``: by model family); ``arch``: ``vit.Model``
  attributes that win over the variant's or the checkpoint's.
* ``merge``: the MaMe / ToMe settings: ``tau``, ``layers`` (a string such as
  ``"0-7"`` or ``"3,6,9"``; ``None``: the first 8 blocks), ``tome_r``,
  ``tome_recipe`` (ToMe's own settings for the model family: ``"timm"``,
  proportional attention and a plain mean pool, or ``"mae"``, as ToMe's MAE
  patch: no proportional attention and a size-weighted global pool), ...
* ``input``: ``data``, ``split``, ``data_dir``, ``label_map``, ``batch_size``,
  ``limit`` (``None``: every image).
* ``zeroshot`` (eval): zero-shot classification with a SigLIP two-tower
  checkpoint -- ``tokenizer`` (``None``: off), ``classes``, ``templates``,
  ``length``, ``style`` (:func:`zeroshot_config`).
* one part per command: ``eval``, ``calibrate``, ``visualize``, ``train``.
  A command ignores the parts of the other commands, so a file may carry
  several.

Every command starts from its builder here (:func:`eval_config`,
:func:`calibrate_config`, :func:`visualize_config`, :func:`train_config`);
``--config FILE.py[:arg]`` is merged over it, then ``--config.a.b=value``
overrides, then the command's short flags (``--tau``, ``--checkpoint``, ...).
Fields that may be unset are ``placeholder``s: typed, so that a command-line
override of them is parsed as that type. Every part is closed (a config file
or override naming a field it does not have is an error) except
``model.arch``, whose keys a config file may add.

Configs import only this module, ``ml_collections`` (with ``absl.flags``, its
flag library) and the paper's default tau -- never the evaluation code, so that
reading a config costs nothing and does nothing.
"""

from typing import Optional

from absl import flags
import ml_collections
from ml_collections import config_dict, config_flags

from mame_jax.models.merging import DEFAULT_TAU

placeholder = config_dict.placeholder


def parse_config_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config argument: ``"key=value,flag,..."`` over
  ``defaults`` -> a ``ConfigDict``. Used by ``configs/*.py``:
  ``get_config("tau=0.7,batch_size=512")``.

  Each ``key=value`` goes through ml_collections' own override parser (the one
  behind ``--config.key=value``), so a value takes the type of its default the
  same way a command-line override does: ``512`` stays an int, ``0.7`` a float,
  a bool default reads ``true`` / ``false`` and a bare ``flag`` is True. An
  unknown key is an error naming it. ml_collections has no parser of the
  comma-separated string itself; splitting it at the commas is all that is
  done here.
  """
  defaults = ml_collections.ConfigDict(defaults)
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  for part in parts:
    key = part.partition("=")[0]
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
  argv = ["get_config"] + [f"--arg.{part}" for part in parts]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict("arg", defaults, flag_values=flag_values,
                                           sys_argv=argv)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise ValueError(f"config argument {arg!r}: {e}") from None
  return holder.value


# ----------------------------------------------------------------------------
# The parts


def model_config(**fields) -> ml_collections.ConfigDict:
  """``config.model``: where the network and its weights come from."""
  config = ml_collections.ConfigDict(dict(
      checkpoint=placeholder(str),  # path, URL or known name; None: random `variant`
      variant=placeholder(str),     # e.g. "S/16": randomly initialised weights
      num_classes=1000,             # for random weights
      image_size=placeholder(int),  # None: the checkpoint's (position embeddings)
      dtype="float32",              # matmul dtype: float32 | bfloat16 | float16
      preprocess="auto",            # auto (by model family) | big_vision | timm | siglip
      # vit.Model attributes over the variant's / the checkpoint's, e.g.
      # {depth: 2, width: 32, ...} for a tiny smoke model: an open part, the
      # one whose keys a config may add.
      arch=ml_collections.ConfigDict(),
  ))
  config.update(fields)
  return config


def input_config(**fields) -> ml_collections.ConfigDict:
  """``config.input``: the images and how many at a time."""
  config = ml_collections.ConfigDict(dict(
      data=placeholder(str),        # tfds name, folder of class folders, photos, tfds:NAME
      split=placeholder(str),       # tfds split (default: the data's validation split)
      data_dir=placeholder(str),    # tfds data dir
      label_map=placeholder(str),   # class folders: "imagenet" or a JSON {class: label}
      batch_size=256,
      limit=placeholder(int),       # first N images; None: all
  ))
  config.update(fields)
  return config


# ----------------------------------------------------------------------------
# Each command's default config


def eval_config() -> ml_collections.ConfigDict:
  """``mame-jax eval`` without ``--config``: baseline and MaMe at the paper's
  tau in the first 8 blocks; the model and data must come from the command
  line."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.merge = ml_collections.ConfigDict(dict(
      tau=(DEFAULT_TAU,),           # MaMe rows, one per threshold
      tome_r=(),                    # ToMe rows, one per r (every block)
      tome_recipe="timm",           # ToMe's settings: timm (prop. attention) | mae
      layers=placeholder(str),      # MaMe blocks, e.g. "0-7"; None: the first 8
  ))
  config.input = input_config()
  config.eval = ml_collections.ConfigDict(dict(
      runs=7,                       # timed calls per method (median)
      warmup=2,
      devices=placeholder(int),     # shard over the first N local devices; None: all
      distributed=False,            # multi-host: jax.distributed.initialize() first
      json=placeholder(str),        # write the results here
      progress=placeholder(bool),   # progress bar; None: when stderr is a terminal
  ))
  config.zeroshot = zeroshot_config()
  return config


def zeroshot_config(**fields) -> ml_collections.ConfigDict:
  """``config.zeroshot``: zero-shot classification with a SigLIP / SigLIP 2
  two-tower checkpoint (``mame_jax.eval.zeroshot``), on when ``tokenizer`` is
  set. The rows then merge in the image tower and classify its embedding
  against the class embeddings of ``classes`` x ``templates``."""
  config = ml_collections.ConfigDict(dict(
      tokenizer=placeholder(str),   # SentencePiece .model: path, URL or known name; None: off
      classes="imagenet",           # imagenet (1000 CLIP names) | data (the folders) | a file
      templates="clip",             # clip (80) | big_vision (80 + "{}") | a file, one per line
      length=64,                    # text length (the text tower's max_len)
      style="siglip",               # tokeniser rules: siglip (T5 vocab) | siglip2 (Gemma)
  ))
  config.update(fields)
  return config


def calibrate_config() -> ml_collections.ConfigDict:
  """``mame-jax calibrate``: :func:`eval_config` (its ``merge.tau`` / ``tome_r``
  are extra rows to compare, none by default) plus the target."""
  config = eval_config()
  config.merge.tau = ()
  config.calibrate = ml_collections.ConfigDict(dict(
      target_speedup=placeholder(float),  # ideal speedup to reach
      target_gflops=placeholder(float),   # or GFLOPs per image (XLA units)
      per_layer=False,                    # one tau per merge layer
      calib_images=256,                   # calibration images
      calib_data=placeholder(str),        # calibration data; None: input.data
      tol=1e-3,                           # bisection tolerance on tau
  ))
  return config


def visualize_config() -> ml_collections.ConfigDict:
  """``mame-jax visualize``: one MaMe threshold (and optionally ToMe) drawn in
  each merge layer; without a checkpoint, a small randomly initialised ViT."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(checkpoint=placeholder(str),
                                                variant=placeholder(str),
                                                arch=ml_collections.ConfigDict()))
  config.merge = ml_collections.ConfigDict(dict(
      tau=DEFAULT_TAU,
      tome_r=placeholder(str),      # ToMe r per merge layer as text, or "match"
      layers=placeholder(str),      # one panel each; None: the first 8 blocks
  ))
  config.visualize = ml_collections.ConfigDict(dict(
      images=(),                    # image files or skimage.data names
      out="token_clusters.png",
      panel=160,                    # panel side in pixels
  ))
  return config


def train_config() -> ml_collections.ConfigDict:
  """``python train.py``: ViT-Ti/16 with MaMe in fixed mode -- blocks 3, 6 and 9
  at tau = 0.5, capacity 0 (each merge halves the tokens), the paper's
  from-scratch setting -- on the six labelled skimage photographs."""
  config = ml_collections.ConfigDict()
  config.model = model_config(variant="Ti/16", num_classes=6, image_size=224,
                              preprocess="big_vision")
  config.merge = ml_collections.ConfigDict(dict(
      tau=0.5,
      layers="3,6,9",               # "": no merge
      capacity=0,                   # preserved tokens kept per merge (0: 2:1)
  ))
  config.input = input_config(data="photos-labelled", batch_size=6)  # one batch: the 6 photos
  config.train = ml_collections.ConfigDict(dict(
      steps=100,
      lr=1e-3,                      # peak of the warm-up + cosine schedule
      warmup=placeholder(int),      # warm-up steps; None: a tenth of the steps
      weight_decay=0.05,            # AdamW
      seed=0,
      log_every=10,                 # print every N steps (the metrics log has all)
  ))
  return config


# ----------------------------------------------------------------------------
# Table 1


def table1_arg(arg, *, tome_r: int, **more) -> ml_collections.ConfigDict:
  """The ``arg`` of a Table 1 config parsed (:func:`parse_config_arg`):
  batch_size, dtype, data, tau, tome_r (0: no ToMe row) and limit (0: all
  images), plus ``more`` keys of that config."""
  return parse_config_arg(arg, batch_size=256, dtype="float32", data="imagenet2012",
                          tau=DEFAULT_TAU, tome_r=tome_r, limit=0, **more)


def table1_config(arg, *, checkpoint: str, preprocess: str, tome_r: int,
                  image_size: int = 224, tome_recipe: str = "timm"):
  """The evaluation config shared by ``configs/*.py`` (one per Table 1 row).

  Rows: baseline, MaMe (``tau`` = 0.8, the first 8 blocks: the paper's
  training-free default) and ToMe (``tome_r`` in every block, r chosen for about
  half the baseline's FLOPs, as its Table 1 row), run the way ToMe's own code
  runs that family (``tome_recipe``): "timm" (DeiT, AugReg) with proportional
  attention, "mae" (MAE) without it and with a size-weighted global pool.
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
  tome_r (0: no ToMe row) and limit (0: all images); or those already parsed
  (:func:`table1_arg`). Any other field: ``--config.a.b=value``.
  """
  if not isinstance(arg, ml_collections.ConfigDict):
    arg = table1_arg(arg, tome_r=tome_r)
  config = eval_config()
  config.model.checkpoint = checkpoint
  config.model.preprocess = preprocess
  config.model.image_size = image_size
  config.model.dtype = arg.dtype
  config.merge.layers = "0-7"
  config.merge.tau = (arg.tau,)
  config.merge.tome_r = (arg.tome_r,) if arg.tome_r else ()
  config.merge.tome_recipe = tome_recipe
  config.input.data = arg.data
  config.input.batch_size = arg.batch_size
  config.input.limit = arg.limit or None
  return config


# ----------------------------------------------------------------------------
# Table 3: zero-shot classification


def table3_config(arg, *, checkpoint: str, tokenizer: str, style: str, taus, tome_r: int,
                  image_size: int = 512):
  """The zero-shot evaluation config shared by ``configs/siglip*.py`` (one per
  Table 3 model): baseline, MaMe at each of ``taus`` in the first 8 blocks of
  the image tower and ToMe(``tome_r``) in every block, each classifying the
  image embedding against the 1000 ImageNet class names x the CLIP paper's 80
  templates. The towers come from ``checkpoint`` (a two-tower .npz), the
  tokeniser from ``tokenizer``; ``--checkpoint PATH`` and
  ``--config.zeroshot.tokenizer=PATH`` take local files instead.

  ``arg``: ``key=value`` overrides of batch_size, dtype, data, tome_r (0: no
  ToMe row) and limit (0: all images); ``--tau`` replaces the MaMe rows.
  """
  arg = parse_config_arg(arg, batch_size=64, dtype="float32", data="imagenet2012",
                         tome_r=tome_r, limit=0)
  config = eval_config()
  config.model.checkpoint = checkpoint
  config.model.preprocess = "siglip"
  config.model.image_size = image_size
  config.model.dtype = arg.dtype
  config.merge.layers = "0-7"
  config.merge.tau = tuple(float(t) for t in taus)
  config.merge.tome_r = (arg.tome_r,) if arg.tome_r else ()
  config.input.data = arg.data
  config.input.batch_size = arg.batch_size
  config.input.limit = arg.limit or None
  config.zeroshot = zeroshot_config(tokenizer=tokenizer, style=style)
  return config
