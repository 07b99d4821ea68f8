"""What the configs in this folder share: each command's default config, the
Table 1 evaluation config and the parser of a config's ``arg``.

A config is an ``ml_collections.ConfigDict`` with one part per concern, so that
one file can describe a model, its merge and its data once for every command:

* ``model``: ``checkpoint`` (a path, a URL or a known short name; ``None``:
  random weights of ``variant``), ``variant`` (e.g. ``"S/16"``, for random
  init), ``num_classes``, ``image_size`` (``None``: the checkpoint's),
  ``dtype`` (matmul dtype: ``float32`` | ``bfloat16`` | ``float16``),
  ``preprocess`` (``auto``: by model family; ``resize``: a plain resize to the
  model's size) and ``crop_pct`` (the share of the resized image the central
  crop keeps, timm's convention; 1.0: no crop; ``None``: the preprocessing's
  own, ``mame_jax.eval.data.CROP_PCT``); ``arch``: ``vit.Model`` attributes
  that win over the variant's or the checkpoint's (a config file or a
  ``--config.model.arch.NAME=VALUE`` override may add any of them).
* ``merge``: the MaMe / ToMe settings: ``tau``, ``layers`` (a string such as
  ``"0-7"`` or ``"3,6,9"``; ``None``: the first 8 blocks), ``tome_r``,
  ``tome_recipe`` (ToMe's own settings for the model family: ``"timm"``,
  proportional attention and a plain mean pool, or ``"mae"``, as ToMe's MAE
  patch: no proportional attention and a size-weighted global pool),
  ``preserve`` (MaMe's preservation rule: ``"batch"``, the paper's batch-wide
  mask, or ``"sample"``, every image its own), ``execution`` (``"padded"`` or
  ``"packed"``: the blocks after a merge on the real tokens only),
  ``bucket_step`` (exact mode's capacity buckets), ...
* ``input``: ``data``, ``split``, ``data_dir``, ``label_map``, ``batch_size``,
  ``limit`` (``None``: every image).
* ``zeroshot`` (eval): zero-shot classification with a SigLIP two-tower
  checkpoint -- ``tokenizer`` (``None``: off), ``classes``, ``templates``,
  ``length``, ``style`` (:func:`zeroshot_config`).
* one part per command: ``eval``, ``calibrate``, ``visualize``.
  A command ignores the parts of the other commands, so a file may carry
  several. ``train.py``'s fields are top-level instead (``total_steps``,
  ``lr``, ...; :func:`train_config`).

Every command starts from its builder here (:func:`eval_config`,
:func:`calibrate_config`, :func:`visualize_config`, :func:`train_config`);
``--config FILE.py[:arg]`` is merged over it, then ``--config.a.b=value``
overrides, then the command's short flags (``--tau``, ``--checkpoint``, ...).
Fields that may be unset are ``placeholder``s: typed, so that a command-line
override of them is parsed as that type. Every part is closed (a config file
or override naming a field it does not have is an error) except
``model.arch``, whose keys a config file or an override may add (an override
is parsed as the type of the ``vit.Model`` attribute it names).

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


# MergeConfig fields a config's ``merge`` part may set for the MaMe rows.
MAME_FIELDS = ("preserve", "execution", "bucket_step")


def mame_fields(merge_part) -> dict:
  """The ``MergeConfig`` fields a ``merge`` part sets for its MaMe rows
  (:data:`MAME_FIELDS` that it has), e.g. ``{"preserve": "sample", "execution":
  "packed", "bucket_step": None}``."""
  return {k: merge_part[k] for k in MAME_FIELDS if k in merge_part}


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
      preprocess="auto",            # auto (by family) | big_vision | timm | siglip | clip | resize
      crop_pct=placeholder(float),  # share of the resized image kept; 1.0: resize to S, no crop;
                                    # None: the preprocessing's own (timm, big_vision: 0.875)
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
      evit=(),                      # EViT rows, one per keep rate
      evit_layers=placeholder(str), # EViT blocks; None: EViT's own 3,6,9 (0-based)
      diffrate=(),                  # DiffRate rows, one per published MODEL@GFLOPS
      # How the MaMe rows run, chosen from the real DINOv2-S/14 figures (README,
      # "Making the merge pay"): each image its own preserved sources, and the
      # blocks after a merge on the real tokens only. The paper's rule: batch, padded.
      preserve="sample",            # MaMe's preserved sources: sample | batch (paper)
      execution="packed",           # blocks after a merge: packed (real tokens) | padded
      bucket_step=placeholder(int), # exact mode's capacities: multiples of this (or N);
                                    # None: 8 equal steps up to each layer's N
  ))
  config.input = input_config()
  config.eval = ml_collections.ConfigDict(dict(
      runs=7,                       # timed calls per method (median)
      warmup=2,
      devices=placeholder(int),     # shard over the first N local devices; None: all
      distributed=False,            # multi-host: jax.distributed.initialize() first
      json=placeholder(str),        # write the results here
      progress=placeholder(bool),   # progress bar; None: when stderr is a terminal
      match_tau=placeholder(float), # ToMe/EViT/DiffRate set to this MaMe tau's GFLOPs
  ))
  config.zeroshot = zeroshot_config()
  config.video = video_config()
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
      evit=placeholder(float),      # also draw EViT at this keep rate
      evit_layers=placeholder(str), # EViT blocks; None: EViT's own 3,6,9 (0-based)
      diffrate=placeholder(str),    # also draw DiffRate's published MODEL@GFLOPS schedule
      preserve="sample",            # each image drawn with its own merge | batch (paper)
  ))
  config.visualize = ml_collections.ConfigDict(dict(
      images=(),                    # image files or skimage.data names
      video=placeholder(str),       # or one video file, for a video model (VideoMAE)
      out="token_clusters.png",
      panel=160,                    # panel side in pixels
  ))
  return config


def train_config() -> ml_collections.ConfigDict:
  """``python train.py`` (``mame_jax.train``): ViT-Ti/16 from scratch with MaMe
  in fixed mode at the paper's from-scratch setting (``merge.method="mame"``).

  ``model``: the network (``variant``, ``dtype``, ``arch`` overrides);
  ``merge``: ``method`` = ``none`` | ``mame`` (blocks 3, 6, 9 counted from 1 as
  the paper does, i.e. ``layers="2,5,8"``, ``tau`` 0.5, capacity 0: each merge
  halves the tokens) | ``mame_last`` (the last block only) | ``tome`` (ToMe in
  every block, ``r`` matched to MaMe's token count); ``layers`` / ``tome_r``
  ``None``: the method's own. ``input``: the training data (a tfds name or a
  folder of class folders), its ``eval_split`` / ``eval_data``, the crop and
  the loader's threads. The training fields are top-level, as the issue names
  them (``total_steps``, ``lr``, ``wd``, ...); see ``mame_jax.train.loop``.
  """
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      variant="Ti/16",              # random init of this variant (unless `init`)
      dtype="float32",              # matmul dtype: float32 | bfloat16 | float16
      dropout=0.0,
      arch=ml_collections.ConfigDict(),  # vit.Model attributes (open part)
  ))
  config.merge = ml_collections.ConfigDict(dict(
      method="mame",                # none | mame | mame_last | tome
      tau=0.5,                      # MaMe threshold (eq. 3)
      layers=placeholder(str),      # 0-based blocks, e.g. "2,5,8"; None: the method's
      capacity=0,                   # preserved tokens kept per merge (0: 2:1)
      tome_r=placeholder(int),      # ToMe r; None: matched to MaMe's token count
  ))
  config.input = input_config(batch_size=256)
  config.input.update(dict(
      image_size=224,
      eval_split=placeholder(str),  # held-out split of `data` evaluated every eval_steps
      eval_data=placeholder(str),   # or another source (e.g. a folder); None: eval_split
      eval_limit=placeholder(int),  # first N held-out images
      min_scale=0.08,               # random resized crop: smallest area fraction
      flip=True,                    # random horizontal flip
      workers=8,                    # loader threads (grain ReadOptions)
      prefetch=4,                   # batches read ahead
      preprocess="big_vision",      # the eval preprocessing (as model.preprocess of eval)
      crop_pct=placeholder(float),  # its crop_pct; None: the preprocessing's own
  ))
  config.num_classes = 1000
  config.init = placeholder(str)    # a load_model source: fine-tune from it
  config.total_steps = 1000
  config.lr = 1e-3                  # peak of the linear warm-up + cosine decay
  config.wd = 0.05                  # AdamW decoupled weight decay (kernels only)
  config.warmup_steps = 100
  config.grad_clip = 1.0            # global-norm clipping; 0: none
  config.label_smoothing = 0.1
  config.mixup = 0.0                # mixup Beta(a, a); 0: off
  config.seed = 0
  config.log_steps = 50             # metrics.jsonl + progress bar every N steps
  config.ckpt_steps = 500           # orbax checkpoint every N steps (and at the end)
  config.keep_ckpts = 3             # newest K checkpoints kept
  config.eval_steps = 0             # evaluate the held-out split every N; 0: at the end only
  config.stop_after = placeholder(int)  # stop (as if killed) after N steps of this run
  config.fsdp = False               # shard params / optimiser state over `data` too
  config.distributed = False        # multi-host: jax.distributed.initialize() first
  config.progress = placeholder(bool)  # tqdm bar; None: when stderr is a terminal
  return config


# ----------------------------------------------------------------------------
# Table 1


def table1_arg(arg, *, tome_r: int, evit: float = 0.0, diffrate: str = "",
               **more) -> ml_collections.ConfigDict:
  """The ``arg`` of a Table 1 config parsed (:func:`parse_config_arg`):
  batch_size, dtype, data, tau, tome_r (0: no ToMe row), evit (EViT's keep
  rate; 0: no EViT row), diffrate (a published ``MODEL@GFLOPS`` schedule;
  ``none``: no DiffRate row) and limit (0: all images), plus ``more`` keys."""
  return parse_config_arg(arg, batch_size=256, dtype="float32", data="imagenet2012",
                          tau=DEFAULT_TAU, tome_r=tome_r, evit=evit, diffrate=diffrate,
                          limit=0, **more)


def table1_config(arg, *, checkpoint: str, preprocess: str, tome_r: int,
                  image_size: int = 224, tome_recipe: str = "timm", evit: float = 0.0,
                  evit_layers: str = "3,6,9", diffrate: str = ""):
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

  The other baselines of Table 1: EViT (keep rate ``evit`` in ``evit_layers``,
  EViT's own blocks 4, 7, 10 of 12 -- spread the same way over deeper models --
  with the rate set for about the paper's GFLOPs: the paper does not give its
  EViT settings) and DiffRate (``diffrate``: the schedule DiffRate publishes
  for that model at the paper's GFLOPs, ``DiffRateConfig.published``).
  """
  if not isinstance(arg, ml_collections.ConfigDict):
    arg = table1_arg(arg, tome_r=tome_r, evit=evit, diffrate=diffrate)
  config = eval_config()
  config.model.checkpoint = checkpoint
  config.model.preprocess = preprocess
  config.model.image_size = image_size
  config.model.dtype = arg.dtype
  config.merge.layers = "0-7"
  config.merge.tau = (arg.tau,)
  config.merge.tome_r = (arg.tome_r,) if arg.tome_r else ()
  config.merge.tome_recipe = tome_recipe
  config.merge.evit = (arg.evit,) if arg.evit else ()
  config.merge.evit_layers = evit_layers
  config.merge.diffrate = (arg.diffrate,) if arg.diffrate not in ("", "none") else ()
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


# ----------------------------------------------------------------------------
# Video: VideoMAE on Kinetics-400 (Table 6)


def video_config(**fields) -> ml_collections.ConfigDict:
  """``config.video`` (eval, video models only): how frames are sampled from each
  video (``mame_jax.eval.video.Sampling``: VideoMAE's test-time rule, dense
  frames at ``stride``, the short side resized to the model's image size,
  ``clips`` x ``crops`` views per video whose softmax is averaged)."""
  config = ml_collections.ConfigDict(dict(
      num_frames=placeholder(int),  # frames per clip; None: the checkpoint's (16)
      stride=4,                     # VideoMAE's frame_sample_rate on Kinetics
      clips=1,                      # temporal views (VideoMAE's Kinetics test: 5)
      crops=1,                      # spatial views (VideoMAE's Kinetics test: 3)
      min_frames=placeholder(int),  # fewer decoded frames: too short; None: num_frames
  ))
  config.update(fields)
  return config


def table6_config(arg, *, checkpoint: str, taus, tome_r) -> ml_collections.ConfigDict:
  """The evaluation config shared by ``configs/videomae_*.py`` (Table 6): the
  baseline, MaMe at each of ``taus`` in the first 8 blocks and ToMe at each of
  ``tome_r`` in every block (ToMe's MAE recipe: VideoMAE mean-pools like MAE),
  on Kinetics-400 validation videos, 16 frames at stride 4, 224 px.

  Data: Kinetics-400 has no tfds builder; pass the validation videos as a
  folder of class folders (``root/<class>/<video>.mp4``, the usual layout of
  the released videos), classes sorted by name = the checkpoints' label
  order: ``:data=/path/to/k400/val``. The paper times FP16 at batch 1 on an
  RTX 3090; its accuracy protocol (views per video) is not stated, VideoMAE's
  own is 5 clips x 3 crops (``:clips=5,crops=3``).

  ``arg``: ``key=value`` overrides of batch_size, dtype, data, limit (0: all
  videos), clips and crops.
  """
  arg = parse_config_arg(arg, batch_size=1, dtype="float32", data="kinetics400/val",
                         limit=0, clips=1, crops=1)
  config = eval_config()
  config.model.checkpoint = checkpoint
  config.model.image_size = 224
  config.model.dtype = arg.dtype
  config.merge.layers = "0-7"
  config.merge.tau = tuple(float(t) for t in taus)
  config.merge.tome_r = tuple(int(r) for r in tome_r)
  config.merge.tome_recipe = "mae"
  config.input.data = arg.data
  config.input.batch_size = arg.batch_size
  config.input.limit = arg.limit or None
  config.video = video_config(clips=arg.clips, crops=arg.crops)
  return config
