"""Table 1 in one process: the baseline, MaMe at each tau and ToMe at each r.

    mame-jax eval --checkpoint deit_small.safetensors --data imagenet2012 --tau 0.8 --tome-r 13
    mame-jax eval --config configs/deit_s.py --limit 2000 --json deit_s.json

Every method sees the same preprocessed arrays: the data are read and
preprocessed once, and each batch is fed to every method in turn. The table
(stdout) and the JSON (``--json``) have one row per method:

* ``top1``: top-1 accuracy in percent over the labelled images (``null`` when
  the data are unlabelled); corrupt images and padding rows are left out.
* ``tokens_per_layer``: mean real tokens after each block (what its MLP
  processed), over the images; ``mean_tokens_per_layer`` their mean.
* ``images_per_s``: ``mame_jax.timing.time_fn`` (compile and warm-up excluded,
  median of ``runs`` timed calls) of the method's compiled program on one fixed
  batch -- the first one, the same arrays and dtype for every method. For MaMe
  the program is the one of the *settled* capacity schedule (after the whole
  dataset), so neither the overflow re-runs of the first batches nor the
  per-batch overflow check are in the figure.
* ``gflops_per_image``: ``mame_jax.timing.gflops`` (XLA's cost analysis) of
  that same program, divided by the images one device processes. XLA counts a
  multiply-add as 2 FLOPs; the paper's "FLOPs" (fvcore) count it as 1, so our
  figures are about twice Table 1's (DeiT-S: ~9.2 here for the paper's 4.6).
  MaMe's figure includes the padding of its capacity buckets.
* ``ideal_speedup`` = baseline GFLOPs / method GFLOPs; ``measured_speedup`` =
  method images/s / baseline images/s. ``measured / ideal`` says how much of
  the token reduction turns into speed.

Many devices. Batches are sharded over all devices along a ``"data"`` mesh axis
(``jax.sharding.Mesh`` + ``NamedSharding``) and the parameters replicated.
MaMe's preservation mask is batch-wide (``jnp.any`` over the *global* batch), so
under sharding it couples samples across devices -- XLA inserts the all-reduce
-- and the results equal a one-device run on the same batches. The last partial
batch is padded to the full batch size (a multiple of the device count) by
repeating one of its real images, which leaves the batch-wide mask unchanged,
and the padded rows are dropped from every metric. ``batch_size`` must be a
multiple of the number of devices.

Multi-host (``--distributed``): ``jax.distributed.initialize()`` is called
first (it reads the coordinator address, process count and id from the
environment or the cluster: Cloud TPU, SLURM, ... or pass them with
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``). Run
the same command on every host; each host reads and preprocesses its own rows
of every global batch (``jax.make_array_from_process_local_data``), counts are
summed over hosts, and only process 0 prints and writes the JSON; ``Runner``
gathers MaMe's per-sample drop counts from every host. Not yet run on a real
cluster (tested with several CPU devices in one process).

Without ``--checkpoint`` there is nothing to evaluate: the command stops with
an error, unless ``--random-init VARIANT`` (e.g. ``S/16``) asks for a randomly
initialised model, for smoke runs of the pipeline (accuracy is then chance).

``--config configs/FILE.py[:arg]`` reads the flags from a big_vision-style
config (``get_config(arg)`` returning a ``ConfigDict`` whose keys are the
flags' names, e.g. ``tau``, ``tome_r``, ``merge_layers``); flags given on the
command line win over the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mame_jax import data as data_lib
from mame_jax import timing
from mame_jax.merging import MergeConfig, ToMeConfig
from mame_jax.runner import Runner

TABLE_COLUMNS = ("method", "top1", "images/s", "GFLOPs/img", "tokens/layer", "speedup",
                 "ideal speedup")
DEFAULTS = dict(
    checkpoint=None, random_init=None, num_classes=1000, data=None, split=None,
    data_dir=None, label_map=None, tau=[0.8], tome_r=[], merge_layers=None,
    batch_size=256, limit=None, image_size=None, preprocess="auto", dtype="float32",
    runs=7, warmup=2, devices=None, distributed=False, json=None, progress=True)


# ----------------------------------------------------------------------------
# Methods


@dataclasses.dataclass
class Method:
  """One row of the table: a name and the ``merge`` config the model gets
  (``None`` for the baseline)."""

  name: str
  kind: str  # "baseline", "mame" or "tome"
  merge: Any = None
  tau: Any = None
  r: Optional[int] = None


def describe_merge(merge) -> Method:
  """``None`` / ``MergeConfig`` (or a subclass with per-layer ``taus``) /
  ``ToMeConfig`` -> :class:`Method`."""
  if merge is None:
    return Method("baseline", "baseline")
  if isinstance(merge, MergeConfig):
    taus = getattr(merge, "taus", None)
    tau = [float(t) for t in taus] if taus is not None else float(merge.tau)
    shown = ",".join(f"{t:g}" for t in tau) if isinstance(tau, list) else f"{tau:g}"
    return Method(f"MaMe(tau={shown})", "mame", merge, tau=tau)
  if isinstance(merge, ToMeConfig):
    return Method(f"ToMe(r={merge.r})", "tome", merge, r=merge.r)
  raise TypeError(f"Unknown merge config {type(merge).__name__}")


def default_layers(model) -> tuple:
  """The paper's training-free default: MaMe in the first 8 blocks (fewer when
  the model has fewer)."""
  return tuple(range(min(8, model.depth)))


def build_methods(model, taus=(0.8,), tome_r=(), merge_layers=None, extra=()) -> list:
  """Baseline, then ``MergeConfig(tau, merge_layers)`` per tau, then
  ``ToMeConfig(r)`` (every block, proportional attention) per r, then ``extra``
  merge configs."""
  layers = default_layers(model) if merge_layers is None else tuple(merge_layers)
  merges = ([None] + [MergeConfig(tau=float(t), layers=layers) for t in taus]
            + [ToMeConfig(r=int(r)) for r in tome_r] + list(extra))
  return [describe_merge(m) for m in merges]


def parse_layers(spec) -> Optional[tuple]:
  """``"0-7"``, ``"0,2,4-6"`` or a sequence of ints -> a tuple of block indices."""
  if spec is None:
    return None
  if not isinstance(spec, str):
    return tuple(int(v) for v in spec)
  out = []
  for part in spec.replace(" ", "").split(","):
    if not part:
      continue
    lo, sep, hi = part.partition("-")
    out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
  return tuple(out)


# ----------------------------------------------------------------------------
# Devices


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D ``"data"`` mesh over all devices (every host's), or the first
  ``num_devices`` local ones."""
  devices = jax.devices() if num_devices is None else jax.local_devices()[:num_devices]
  if num_devices is not None and len(devices) < num_devices:
    raise ValueError(f"asked for {num_devices} devices; only {len(devices)} available")
  return Mesh(np.array(devices), ("data",))


def _local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded array, in batch order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  seen, parts = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)


def _sum_over_hosts(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


# ----------------------------------------------------------------------------
# Progress


class Progress:
  """A plain progress line on stderr: images done, loop images/s, and the
  running top-1 of every method. Rewritten in place on a terminal; otherwise a
  line every 10% of the run."""

  def __init__(self, total: int, stream, enabled: bool = True):
    self.total, self.stream = total, stream
    self.enabled = enabled and stream is not None and jax.process_index() == 0
    self.tty = self.enabled and hasattr(stream, "isatty") and stream.isatty()
    self.start, self.last_decile = time.perf_counter(), -1

  def update(self, done: int, accuracies: dict):
    if not self.enabled:
      return
    rate = done / max(time.perf_counter() - self.start, 1e-9)
    accs = " ".join(f"{k} {v:.2f}" for k, v in accuracies.items() if v is not None)
    pct = 100.0 * done / max(self.total, 1)
    line = (f"eval {done}/{self.total} ({pct:.0f}%) {rate:.1f} img/s"
            + (f" | top1 {accs}" if accs else ""))
    if self.tty:
      self.stream.write("\r" + line[:200].ljust(80))
    elif int(pct // 10) > self.last_decile:
      self.last_decile = int(pct // 10)
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


# ----------------------------------------------------------------------------
# Evaluation


def evaluate(model, params, data, *, taus=(0.8,), tome_r=(), merge_layers=None, extra=(),
             batch_size: int = 256, limit: Optional[int] = None, preprocess=None,
             image_size=None, split=None, data_dir=None, label_map=None,
             num_devices: Optional[int] = None, runs: int = 7, warmup: int = 2,
             progress: bool = True, stream=None) -> dict:
  """Runs every method on the same batches; see the module docstring.

  Args:
    model, params: a ``mame_jax.vit`` model (no merge) and its parameters.
    data: a name for :func:`mame_jax.data.load_source` or a ``Source``.
    taus: MaMe thresholds, one row each (in ``merge_layers``; default the
      first 8 blocks). ``tome_r``: ToMe ``r`` values, one row each (every
      block). ``extra``: further merge configs (e.g. a calibrated one).
    batch_size: global batch; a multiple of the device count. The last batch
      is padded to it (padding rows repeat a real image and are not counted).
    limit: evaluate the first ``limit`` images only.
    preprocess: ``"big_vision"``, ``"timm"``, ``"siglip"``, a callable, or
      ``None``/``"auto"`` (:func:`mame_jax.data.preprocess_for`).
    image_size: side of the model's input; default from the position
      embeddings (``params``), else 224.
    num_devices: shard over the first ``num_devices`` local devices (default:
      every device of every process).
    runs, warmup: for ``timing.time_fn``.
    progress: the progress line; ``stream``: where it and the corrupt-image
      warnings go (default ``sys.stderr``).

  Returns:
    ``{"rows": [...], "num_images", "num_corrupt", "corrupt", ..., and, for
    Python callers, "predictions": {name: (n,) int}, "keys": [...]}`` (the
    predictions of the valid rows in data order, this process's rows).
  """
  stream = sys.stderr if stream is None else stream
  source = data_lib.load_source(data, split=split, data_dir=data_dir, label_map=label_map)
  size = int(image_size or image_size_of(model, params))
  kind = preprocess if callable(preprocess) else (
      data_lib.preprocess_for(model) if preprocess in (None, "auto") else preprocess)
  prep = kind if callable(kind) else data_lib.preprocess_fn(kind, size)

  mesh = make_mesh(num_devices)
  ndev = mesh.devices.size
  n_total = len(source) if limit is None else min(len(source), int(limit))
  if n_total == 0:
    raise ValueError(f"no images to evaluate in {source.name} (limit={limit})")
  if batch_size % ndev:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the {ndev} devices")
  # Never run a batch much larger than the data: shrink it to the data, rounded
  # up to the device count (one shape, so every program compiles once).
  batch_size = min(batch_size, -(-n_total // ndev) * ndev)

  rows_sharding = NamedSharding(mesh, P("data"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  methods = build_methods(model, taus, tome_r, parse_layers(merge_layers), extra)
  runners = [Runner(model.clone(merge=m.merge), params) for m in methods]

  loader = data_lib.Loader(source, prep, batch_size, limit=limit,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), warn=stream)
  correct = np.zeros(len(methods), np.int64)
  tokens = np.zeros((len(methods), model.depth), np.float64)
  preds = [[] for _ in methods]
  keys, n_valid, n_labelled, done = [], 0, 0, 0
  first = None
  bar = Progress(n_total, stream, progress)
  for batch in loader:
    x = jax.make_array_from_process_local_data(rows_sharding, batch.images)
    first = x if first is None else first
    valid, labels = batch.valid, batch.labels
    labelled = valid & (labels >= 0)
    for i, runner in enumerate(runners):
      logits, aux = runner(x)
      pred = _local_rows(jnp.argmax(logits, axis=-1))
      tok = _local_rows(aux["tokens_per_block"])
      correct[i] += int(np.sum(pred[labelled] == labels[labelled]))
      tokens[i] += tok[valid].sum(axis=0)
      preds[i].append(pred[valid])
    keys.extend(k for k, v in zip(batch.keys, valid) if v)
    n_valid += int(valid.sum())
    n_labelled += int(labelled.sum())
    done = min(batch.start - loader.source.start + batch_size, n_total)
    bar.update(done, {m.name: 100.0 * correct[i] / n_labelled if n_labelled else None
                      for i, m in enumerate(methods)})
  bar.close()

  counts = _sum_over_hosts(np.concatenate([correct, [n_valid, n_labelled,
                                                     len(loader.corrupt)]]))
  correct, (n_valid, n_labelled, n_corrupt) = counts[:len(methods)], counts[len(methods):]
  tokens = _sum_over_hosts(tokens)
  if first is None:
    raise ValueError(f"every one of the {n_total} images of {source.name} is corrupt")

  rows = []
  for i, (m, runner) in enumerate(zip(methods, runners)):
    program = runner.program(runner.schedule if runner.exact else None, first.shape)
    t = timing.time_fn(program, runner.params, first, warmup=warmup, runs=runs)
    gf = timing.gflops(program, runner.params, first) / (batch_size / ndev)
    per_layer = (tokens[i] / max(n_valid, 1)).tolist()
    rows.append(dict(
        method=m.kind, name=m.name, tau=m.tau, r=m.r,
        top1=100.0 * float(correct[i]) / n_labelled if n_labelled else None,
        images_per_s=t.throughput(batch_size), gflops_per_image=gf,
        tokens_per_layer=per_layer, mean_tokens_per_layer=float(np.mean(per_layer)),
        measured_speedup=None, ideal_speedup=None,
        capacities=list(runner.schedule) if runner.exact else None,
        num_programs=runner.num_programs, reruns=runner.reruns,
        median_s=t.median_s, compile_s=t.compile_s))
  base = rows[0]
  for row in rows:
    row["measured_speedup"] = row["images_per_s"] / base["images_per_s"]
    row["ideal_speedup"] = (base["gflops_per_image"] / row["gflops_per_image"]
                            if row["gflops_per_image"] else None)
  return dict(
      rows=rows, data=source.name, num_images=int(n_valid), num_labelled=int(n_labelled),
      num_corrupt=int(n_corrupt), corrupt=[list(c) for c in loader.corrupt],
      batch_size=batch_size, num_devices=ndev, num_processes=jax.process_count(),
      image_size=size,
      preprocess=kind if isinstance(kind, str) else getattr(kind, "__name__", "custom"),
      device=timing.device_description(), date=timing.today(), timing_runs=runs,
      predictions={m.name: np.concatenate(p) if p else np.zeros((0,), np.int64)
                   for m, p in zip(methods, preds)},
      keys=keys)


def image_size_of(model, params) -> int:
  """A model's input side: its learned position-embedding grid (square) times
  the patch size, else 224."""
  pe = params.get("pos_embedding") if hasattr(params, "get") else None
  if pe is None:
    return 224
  patch = model.patch_size if np.ndim(model.patch_size) == 0 else model.patch_size[0]
  return math.isqrt(pe.shape[1]) * int(patch)


def format_report(result: dict) -> str:
  """The text report: a header, the Table-1-like table and the corrupt count."""
  shown = []
  for r in result["rows"]:
    shown.append({
        "method": r["name"], "top1": r["top1"], "images/s": r["images_per_s"],
        "GFLOPs/img": r["gflops_per_image"], "tokens/layer": r["mean_tokens_per_layer"],
        "speedup": r["measured_speedup"], "ideal speedup": r["ideal_speedup"]})
  head = (f"{result['data']}: {result['num_images']} images "
          f"({result['num_labelled']} labelled), batch {result['batch_size']} on "
          f"{result['num_devices']} device(s), {result['image_size']}px "
          f"{result['preprocess']} preprocessing\n{result['device']}, {result['date']}; "
          "GFLOPs from XLA (2 per multiply-add)")
  return "\n".join([head, timing.format_table(shown, TABLE_COLUMNS),
                    data_lib.describe_corrupt([tuple(c) for c in result["corrupt"]])
                    if result["corrupt"] or not result["num_corrupt"]
                    else f"{result['num_corrupt']} corrupt image(s) (on other hosts)"])


def to_json(result: dict) -> dict:
  """The JSON-able part of a result (no predictions)."""
  return {k: v for k, v in result.items() if k not in ("predictions", "keys")}


# ----------------------------------------------------------------------------
# Command line


def parse_config_arg(arg: Optional[str], **defaults):
  """big_vision-style config argument: ``"key=value,flag,..."`` over
  ``defaults`` -> a ``ConfigDict``; values take the type of the default (a bare
  ``flag`` is True). Used by ``configs/*.py``:
  ``get_config("tau=0.7,batch_size=512")``."""
  import ml_collections  # pylint: disable=import-outside-toplevel
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
  import ml_collections  # pylint: disable=import-outside-toplevel
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
  from mame_jax import checkpoints, vit  # pylint: disable=import-outside-toplevel
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


def write_json(path, payload):
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(payload, f, indent=2)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
  """``mame-jax eval ...`` (``argv``: the arguments after ``eval``). Prints the
  table on stdout, progress on stderr; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="mame-jax eval", description=__doc__.split("\n\n")[0],
      argument_default=argparse.SUPPRESS)
  add_common_flags(parser)
  parser.add_argument("--tau", type=float, nargs="*", default=argparse.SUPPRESS,
                      help="MaMe thresholds, one row each (default 0.8)")
  parser.add_argument("--tome-r", type=int, nargs="*", default=argparse.SUPPRESS,
                      help="ToMe r values, one row each")
  try:
    flags = resolve_flags(parser, argv, DEFAULTS)
    if flags["distributed"]:
      jax.distributed.initialize()
    if not flags["data"]:
      raise ValueError("no data: pass --data NAME (e.g. imagenet2012, imagenette, photos, "
                       "a folder)")
    model, params = load_from_flags(flags)
    result = evaluate(
        model, params, flags["data"], taus=flags["tau"], tome_r=flags["tome_r"],
        merge_layers=flags["merge_layers"], batch_size=flags["batch_size"],
        limit=flags["limit"], preprocess=flags["preprocess"],
        image_size=flags["image_size"], split=flags["split"], data_dir=flags["data_dir"],
        label_map=label_map_from_flag(flags["label_map"]), num_devices=flags["devices"],
        runs=flags["runs"], warmup=flags["warmup"], progress=flags["progress"])
  except (ValueError, FileNotFoundError) as e:
    print(f"mame-jax eval: error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(format_report(result))
  payload = to_json(result)
  payload["flags"] = {k: v for k, v in flags.items() if k != "json"}
  write_json(flags["json"], payload)
  return 0
