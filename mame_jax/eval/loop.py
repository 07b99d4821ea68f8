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
* ``images_per_s``: ``mame_jax.eval.timing.time_interleaved`` (compile and
  warm-up excluded, median of ``runs`` timed calls; every method's program is
  called once per round, A B C A B C ..., so a drift of the machine affects all
  alike) of the method's compiled program on one fixed batch -- the first one,
  the same arrays and dtype for every method; ``iqr_s`` is the spread. For MaMe
  the program is the one of the *settled* capacity schedule (after the whole
  dataset), so neither the overflow re-runs of the first batches nor the
  per-batch overflow check are in the figure.
* ``gflops_per_image``: ``mame_jax.eval.timing.gflops`` (XLA's cost analysis) of
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

``--config configs/FILE.py[:arg]`` reads the settings from a big_vision-style
config (``get_config(arg)`` returning a ``ConfigDict`` with ``model``,
``merge``, ``input`` and ``eval`` parts, see ``mame_jax.configs.common``);
``--config.merge.tau=0.9`` overrides one field, and flags given on the command
line (``--tau``, ...) win over both.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from mame_jax.eval import data as data_lib
from mame_jax.eval import methods as methods_lib
from mame_jax.eval import timing
from mame_jax.eval import video as video_lib
from mame_jax.eval.mesh import local_rows, make_mesh, sum_over_hosts
from mame_jax.eval.runner import Runner
from mame_jax.models.merging import DEFAULT_TAU, parse_layers
from mame_jax.models.vit import image_size_of


def evaluate(model, params, data, *, taus=(DEFAULT_TAU,), tome_r=(), merge_layers=None, extra=(),
             tome_recipe: str = "timm", mame_fields=None, batch_size: int = 256,
             limit: Optional[int] = None, preprocess=None, crop_pct=None,
             image_size=None, split=None, data_dir=None, label_map=None,
             num_devices: Optional[int] = None, runs: int = 7, warmup: int = 2,
             progress: Optional[bool] = None, stream=None, head=None,
             head_params=None, sampling=None) -> dict:
  """Runs every method on the same batches; see the module docstring.

  Args:
    model, params: a ``mame_jax.models.vit`` model (no merge) and its parameters.
    data: a name for :func:`mame_jax.eval.data.load_source` or a ``Source``.
    taus: MaMe thresholds, one row each (in ``merge_layers``; default the
      first 8 blocks). ``tome_r``: ToMe ``r`` values, one row each (every
      block, with ``tome_recipe``'s settings: "timm" or "mae", see
      ``ToMeConfig.recipe``). ``mame_fields``: further ``MergeConfig`` fields of
      the MaMe rows (``preserve``, ``execution``, ``bucket_step``). ``extra``:
      further merge configs (e.g. a calibrated one).
    batch_size: global batch; a multiple of the device count. The last batch
      is padded to it (padding rows repeat a real image and are not counted).
    limit: evaluate the first ``limit`` images only.
    preprocess: one of ``mame_jax.eval.data.PREPROCESS`` (``"big_vision"``,
      ``"timm"``, ``"siglip"``, ``"clip"``, ``"resize"``), a callable, or
      ``None``/``"auto"`` (:func:`mame_jax.eval.data.preprocess_for`).
    crop_pct: the share of the resized image the central crop keeps (1.0: resize
      to the model's size, no crop); ``None``: the preprocessing's own
      (``mame_jax.eval.data.CROP_PCT``). Not with a callable ``preprocess``.
    image_size: side of the model's input; default from the position
      embeddings (``params``), else 224.
    num_devices: shard over the first ``num_devices`` local devices (default:
      every device of every process).
    runs, warmup: timed and untimed rounds of ``timing.time_interleaved``.
    progress: a ``tqdm`` progress bar (images, images/s, running top-1 of
      every method): ``None`` only when ``stream`` is a terminal, ``True``
      always, ``False`` never; ``stream``: where it and the corrupt-image
      warnings go (default ``sys.stderr``).
    head, head_params: ``head(head_params, out) -> (B, C)`` logits from the
      model's output, e.g. zero-shot classification
      (``mame_jax.eval.zeroshot.ZeroShot.head``: the image tower's embedding
      against the class embeddings). Part of every method's jitted and timed
      program (and of its GFLOPs); ``None``: the model's output are the logits.
    sampling: video models (``mame_jax.models.videomae``) only: a
      ``mame_jax.eval.video.Sampling`` or a dict of its fields over the default
      (the model's ``num_frames``, stride 4, ``image_size``, one clip x one crop).
      ``data`` is then a video source (``mame_jax.eval.video.load_source``); with
      several views per video each view is one row of the programs, the views'
      softmax is averaged, and images/s, GFLOPs and tokens are per *video* (all
      its views).

  Returns:
    ``{"rows": [...], "num_images", "num_corrupt", "corrupt", ..., and, for
    Python callers, "predictions": {name: (n,) int}, "keys": [...]}`` (the
    predictions of the valid rows in data order, this process's rows).
  """
  stream = sys.stderr if stream is None else stream
  is_video, views = video_lib.is_video_model(model), 1
  if is_video:  # frames sampled and cropped the VideoMAE way (mame_jax.eval.video)
    size = int(image_size or model.image_size[0])
    if not isinstance(sampling, video_lib.Sampling):
      sampling = video_lib.Sampling(**{"num_frames": int(model.num_frames), "size": size,
                                       **dict(sampling or {})})
    size, views = sampling.size, sampling.views
    source = video_lib.load_source(data, sampling, split=split, data_dir=data_dir,
                                   label_map=label_map)
    kind = prep = sampling.preprocess
  else:
    source = data_lib.load_source(data, split=split, data_dir=data_dir, label_map=label_map)
    size = int(image_size or image_size_of(model, params))
    kind = preprocess if callable(preprocess) else (
        data_lib.preprocess_for(model) if preprocess in (None, "auto") else preprocess)
    if callable(kind) and crop_pct is not None:
      raise ValueError("crop_pct applies to the named preprocessings "
                       f"{data_lib.PREPROCESS}; a callable preprocess does its own")
    if not callable(kind):
      crop_pct = data_lib.crop_pct_for(kind, crop_pct)
    prep = kind if callable(kind) else data_lib.preprocess_fn(kind, size, crop_pct)

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
  methods = methods_lib.build_methods(model, taus, tome_r, parse_layers(merge_layers), extra,
                                      tome_recipe, mame_fields)
  runners = [Runner(model.clone(merge=m.merge), params) for m in methods]
  if head is not None:
    head_params = jax.device_put(head_params, NamedSharding(mesh, P()))
    apply_head = jax.jit(head)

  loader = data_lib.Loader(source, prep, batch_size, limit=limit,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), warn=stream)
  correct = np.zeros(len(methods), np.int64)
  tokens = np.zeros((len(methods), model.depth), np.float64)
  preds = [[] for _ in methods]
  keys, n_valid, n_labelled, done = [], 0, 0, 0
  first = None
  if progress is None:
    progress = bool(getattr(stream, "isatty", lambda: False)())
  bar = tqdm.tqdm(total=n_total, desc="eval", unit="img", file=stream,
                  disable=not progress or jax.process_index() != 0)
  for batch in loader:
    # Several views per video: one row each, (B, V, T, S, S, 3) -> (B V, T, S, S, 3).
    rows_in = batch.images if views == 1 else batch.images.reshape(-1, *batch.images.shape[2:])
    x = jax.make_array_from_process_local_data(rows_sharding, rows_in)
    first = x if first is None else first
    valid, labels = batch.valid, batch.labels
    labelled = valid & (labels >= 0)
    for i, runner in enumerate(runners):
      logits, aux = runner(x)
      if head is not None:
        logits = apply_head(head_params, logits)
      if views == 1:
        pred = local_rows(jnp.argmax(logits, axis=-1))
        tok = local_rows(aux["tokens_per_block"])
      else:  # the views' mean softmax and mean token counts, per video
        pred = video_lib.average_views(local_rows(logits), views).argmax(-1)
        tok = local_rows(aux["tokens_per_block"]).reshape(-1, views, model.depth).mean(1)
      correct[i] += int(np.sum(pred[labelled] == labels[labelled]))
      tokens[i] += tok[valid].sum(axis=0)
      preds[i].append(pred[valid])
    keys.extend(k for k, v in zip(batch.keys, valid) if v)
    n_valid += int(valid.sum())
    n_labelled += int(labelled.sum())
    done_now = min(batch.start - loader.source.start + batch_size, n_total)
    bar.update(done_now - done)
    done = done_now
    if n_labelled:
      bar.set_postfix_str("top1 " + " ".join(
          f"{m.name} {100.0 * correct[i] / n_labelled:.2f}" for i, m in enumerate(methods)),
          refresh=False)
  bar.close()

  counts = sum_over_hosts(np.concatenate([correct, [n_valid, n_labelled,
                                                     len(loader.corrupt)]]))
  correct, (n_valid, n_labelled, n_corrupt) = counts[:len(methods)], counts[len(methods):]
  tokens = sum_over_hosts(tokens)
  if first is None:
    raise ValueError(f"every one of the {n_total} images of {source.name} is corrupt")

  # The lean programs the runners served (settled schedules), all timed interleaved.
  programs = [runner.served(first.shape) for runner in runners]
  args = [runner.params for runner in runners]
  if head is not None:  # one program: the tower's, then the head (inlined by jit)
    programs = [_with_head(program, head) for program in programs]
    args = [(a, head_params) for a in args]
  timings = timing.time_interleaved(
      {i: (program, (a, first)) for i, (program, a) in enumerate(zip(programs, args))},
      rounds=runs, warmup=warmup)
  rows = []
  for i, (m, runner) in enumerate(zip(methods, runners)):
    program, t = programs[i], timings[i]
    gf = timing.gflops(program, args[i], first) / (batch_size / ndev)
    per_layer = (tokens[i] / max(n_valid, 1)).tolist()
    padded, paid = runner.paid_tokens((batch_size // ndev,) + tuple(first.shape[1:]))
    if m.kind != "mame":  # static counts: what runs is what is real
      padded = paid = per_layer
    rows.append(dict(
        method=m.kind, name=m.name, tau=m.tau, r=m.r,
        top1=100.0 * float(correct[i]) / n_labelled if n_labelled else None,
        images_per_s=t.throughput(batch_size), gflops_per_image=gf,
        tokens_per_layer=per_layer, mean_tokens_per_layer=float(np.mean(per_layer)),
        padded_per_layer=list(padded), paid_per_layer=list(paid),
        mean_paid_per_layer=float(np.mean(paid)),
        measured_speedup=None, ideal_speedup=None,
        capacities=list(runner.schedule) if runner.exact else None,
        num_programs=runner.num_programs, reruns=runner.reruns,
        median_s=t.median_s, iqr_s=t.iqr_s, compile_s=t.compile_s))
  base = rows[0]
  for row in rows:
    if is_video:
      row["videos_per_s"] = row["images_per_s"]
    row["measured_speedup"] = row["images_per_s"] / base["images_per_s"]
    row["ideal_speedup"] = (base["gflops_per_image"] / row["gflops_per_image"]
                            if row["gflops_per_image"] else None)
  extra_fields = {} if not is_video else dict(
      unit="videos", sampling=dataclasses.asdict(sampling), views=views,
      **{f"num_{k}": v for k, v in video_lib.count_problems(loader.corrupt).items()})
  return dict(
      **extra_fields, rows=rows, data=source.name, num_images=int(n_valid), num_labelled=int(n_labelled),
      num_corrupt=int(n_corrupt), corrupt=[list(c) for c in loader.corrupt],
      batch_size=batch_size, num_devices=ndev, num_processes=jax.process_count(),
      image_size=size,
      preprocess=("videomae" if is_video else kind if isinstance(kind, str)
                  else getattr(kind, "__name__", "custom")),
      crop_pct=None if is_video or callable(kind) else crop_pct,
      device=timing.device_description(), date=timing.today(), timing_runs=runs,
      predictions={m.name: np.concatenate(p) if p else np.zeros((0,), np.int64)
                   for m, p in zip(methods, preds)},
      keys=keys)



def _with_head(program, head):
  """``program (params, x) -> (out, aux)`` and ``head (head_params, out) ->
  logits`` as one jitted ``((params, head_params), x) -> (logits, aux)``."""

  def forward(both, x):
    out, aux = program(both[0], x)
    return head(both[1], out), aux
  return jax.jit(forward)
