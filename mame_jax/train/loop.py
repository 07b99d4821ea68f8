"""The training loop behind ``train.py``: build, step, log, evaluate, checkpoint.

``train(config, workdir)`` runs ``config`` (``mame_jax.configs.common.train_config``)
and writes into ``workdir``:

* ``config.json``: the resolved config;
* ``metrics.jsonl``: one JSON object per line, each with ``step`` (steps done).
  Training lines every ``log_steps``: ``loss`` (mean over the interval),
  ``lr``, ``grad_norm``, ``accuracy``, ``images_per_s`` (the interval's
  wall time, loading included; the first interval holds the compile), ``dropped`` (preserved tokens MaMe dropped per
  image in fixed mode) and ``tokens`` (mean tokens after each block).
  Evaluation lines (``eval_top1``, ``eval_images_per_s``, ...) every
  ``eval_steps`` and at the end;
* ``tensorboard/``: the same scalars as TensorBoard event files, when
  ``tensorboardX`` is installed (the ``tensorboard`` extra; nothing otherwise):
  every number of a metrics line under its key, a list such as ``tokens`` as
  ``tokens/<block>`` (:class:`TensorBoard`);
* ``checkpoints/<step>/``: orbax checkpoints (:mod:`mame_jax.train.checkpoint`);
* ``final.npz``: the trained weights as a big_vision ``.npz``
  (``mame_jax.load_model`` reads it; ``mame-jax eval --checkpoint`` evaluates it).

**Resume.** The same command with the same ``workdir`` restores the newest
checkpoint and goes on from its step. Batch ``k`` and step ``k``'s RNG are
functions of the seed and ``k`` (:mod:`mame_jax.train.data`, ``fold_in``), and
the step is one compiled program, so a run stopped at any point and
restarted ends with the same parameters as one never stopped (same devices).

**The merge** runs in fixed mode (docs/design.md, §3): static capacities, one
compiled step, preserved tokens beyond the capacity dropped and counted.
The merge is differentiable, so gradients reach the blocks before it through
the fusion weights.

**Sharding.** The batch is split over a 1-D ``data`` mesh of every device
(of every process); parameters and optimiser state are replicated, or with
``fsdp=True`` sharded over the same axis (each leaf along its largest axis
divisible by the device count; XLA gathers them where used). MaMe's
preservation mask is batch-wide over the global batch, so the step computes
the same thing on any number of devices. Multi-host: ``distributed=True``
calls ``jax.distributed.initialize`` (coordinator and process from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` or the
cluster); each process loads its own rows of every batch.

**Non-finite loss.** The step applies no update once the loss or the gradient
norm is non-finite and records the first such step; the loop checks it at
every log, evaluation and checkpoint step and stops with an error naming
that step, before saving anything, so no checkpoint holds non-finite values.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from mame_jax.eval import data as data_lib
from mame_jax.eval.mesh import make_mesh
from mame_jax.models import checkpoints as ckpt_lib
from mame_jax.models import load as load_lib
from mame_jax.models import vit
from mame_jax.models.merging import MergeConfig, ToMeConfig, merge_records, parse_layers
from mame_jax.train import checkpoint as checkpoint_lib
from mame_jax.train import data as train_data
from mame_jax.train import optim

METHODS = ("none", "mame", "mame_last", "tome")
# The paper's from-scratch blocks: 3, 6 and 9 counted from 1.
PAPER_LAYERS = (2, 5, 8)


class TrainError(ValueError):
  """A bad setting or a failed run; the message names the field or the step."""


class NonFiniteLoss(TrainError):
  pass


# ----------------------------------------------------------------------------
# The model and its merge


def mame_tokens(length: int, layers, depth: int, capacity: int = 0,
                num_special: int = 1) -> list:
  """Tokens each block's attention and MLP see with MaMe in fixed mode:
  ``[(attention, mlp)] * depth``; a merge keeps ``s + floor(L'/2) + c``."""
  out, n = [], length
  for i in range(depth):
    attn = n
    if i in layers:
      rest = n - num_special
      n = num_special + rest // 2 + min(capacity, -(-rest // 2))
    out.append((attn, n))
  return out


def tome_tokens(length: int, r: int, depth: int, num_special: int = 1) -> list:
  """The same for ToMe with ``r`` in every block (at most half the mergeable
  tokens per block, bipartite matching)."""
  out, n = [], length
  for _ in range(depth):
    attn = n
    n -= min(r, (n - num_special) // 2)
    out.append((attn, n))
  return out


def matched_tome_r(length: int, depth: int, layers, capacity: int = 0) -> int:
  """The ToMe ``r`` whose blocks process about as many tokens (attention plus
  MLP, summed over blocks) as MaMe in ``layers``: the FLOP budget of the
  comparison, to first order (the linear layers dominate at ViT sizes)."""
  target = sum(a + m for a, m in mame_tokens(length, layers, depth, capacity))
  cost = lambda r: abs(sum(a + m for a, m in tome_tokens(length, r, depth)) - target)
  return min(range(0, length), key=cost)


def merge_for(config, depth: int, num_patches: int):
  """``config.merge`` -> the model's merge slot (``None``, a fixed-mode
  ``MergeConfig`` or a ``ToMeConfig``)."""
  mc = config.merge
  method = mc.method
  if method not in METHODS:
    raise TrainError(f"merge.method {method!r} unknown; one of {METHODS}")
  if method == "none":
    return None
  layers = parse_layers(mc.layers) if mc.layers is not None else None
  if method == "tome" and mc.tome_r is not None:
    return ToMeConfig.recipe("timm", r=int(mc.tome_r))
  if method in ("mame", "tome") and layers is None:
    layers = tuple(l for l in PAPER_LAYERS if l < depth)
  if method == "mame_last" and layers is None:
    layers = (depth - 1,)
  if not layers or max(layers) >= depth:
    raise TrainError(f"merge.layers {mc.layers!r}: the blocks must lie in 0..{depth - 1} "
                     f"(the model has {depth}); for a shallow model give them explicitly")
  if method == "tome":  # r matched to MaMe in `layers`
    return ToMeConfig.recipe("timm", r=matched_tome_r(num_patches + 1, depth, layers,
                                                      mc.capacity))
  return MergeConfig(tau=float(mc.tau), layers=layers, mode="fixed",
                     capacities=(int(mc.capacity),) * len(layers))


def build_model(config):
  """``(model, params)``: random weights of ``model.variant`` or the ``init``
  checkpoint (position embeddings resampled to ``input.image_size``; the head
  re-initialised to zeros when its classes differ from ``num_classes``), with
  the merge of ``config.merge`` in its slot."""
  size = int(config.input.image_size)
  arch = dict(config.model.arch.to_dict())
  if config.model.dropout:
    arch["dropout"] = float(config.model.dropout)
  try:
    if config.init:
      model, params = load_lib.load_model(config.init, image_size=size,
                                          dtype=config.model.dtype, tower="img", **arch)
    else:
      model, params = load_lib.load_model(None, variant=config.model.variant,
                                          num_classes=int(config.num_classes),
                                          image_size=size, dtype=config.model.dtype,
                                          seed=int(config.seed), **arch)
  except (ValueError, FileNotFoundError) as e:
    what = f"init {config.init!r}" if config.init else f"model.variant {config.model.variant!r}"
    raise TrainError(f"{what}: {e}") from None
  if model.num_classes != int(config.num_classes):
    model, params = _new_head(model, params, int(config.num_classes))
  num_patches = int(np.prod(vit.patch_grid(model, (size, size))))
  return model.clone(merge=merge_for(config, model.depth, num_patches)), params


def _new_head(model, params, num_classes: int):
  """A zero-initialised head for ``num_classes`` (big_vision's fine-tuning
  rule: the first logits are all equal, the loss starts at log C)."""
  params = dict(params)
  kernel = np.asarray(params["head"]["kernel"]) if "head" in params else None
  width = kernel.shape[0] if kernel is not None else model.width
  params["head"] = {"kernel": np.zeros((width, num_classes), np.float32),
                    "bias": np.zeros((num_classes,), np.float32)}
  return model.clone(num_classes=num_classes), params


# ----------------------------------------------------------------------------
# The step


def fsdp_spec(x, ndev: int) -> P:
  """Shard a leaf over ``data`` along its largest axis divisible by ``ndev``."""
  axes = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % ndev == 0 and x.shape[i] > 1]
  if ndev == 1 or not axes:
    return P()
  spec = [None] * len(x.shape)
  spec[int(axes[0])] = "data"
  return P(*spec)


def init_state(params, tx, seed: int, lr: float = 1.0) -> dict:
  """The training state: params, optimiser state, steps done, the first
  non-finite step (-1: none), the RNG key data and the peak learning rate
  ``lr`` (an array, so that one compiled step serves every learning rate)."""
  params = jax.tree.map(jnp.asarray, params)
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
              bad_step=jnp.full((), -1, jnp.int32),
              rng=jax.random.key_data(jax.random.key(int(seed))),
              lr=jnp.asarray(lr, jnp.float32))


def make_step(model, tx, schedule, *, num_classes: int, label_smoothing: float = 0.0,
              mixup: float = 0.0):
  """``step(state, images (B, S, S, 3), labels (B,)) -> (state, metrics)``, pure
  (jit it with the shardings). ``tx`` and ``schedule`` run at a peak learning
  rate of 1 and the update is scaled by ``state["lr"]``: AdamW's decoupled
  decay is multiplied by the learning rate too, so this is AdamW at that peak.
  The update is skipped from the first step whose loss or gradient norm is not
  finite (``state["bad_step"]`` records it)."""

  def loss_of(params, images, targets, labels, rng):
    logits, aux = model.apply({"params": params}, images, train=True,
                              rngs={"dropout": rng})
    loss = optim.loss_fn(logits, targets)
    records = merge_records(aux)
    dropped = sum((r["info"].dropped.sum() for r in records if "info" in r),
                  jnp.zeros((), jnp.int32))
    return loss, dict(accuracy=(logits.argmax(-1) == labels).mean(),
                      dropped=dropped / labels.shape[0],
                      tokens=aux["tokens_per_block"].mean(0).astype(jnp.float32))

  def step(state, images, labels):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    drop_rng, mix_rng = jax.random.split(rng)
    targets = optim.soft_targets(labels, num_classes, label_smoothing)
    images, targets = optim.mixup(mix_rng, images, targets, mixup)
    (loss, extra), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state["params"], images, targets, labels, drop_rng)
    grad_norm = optax_global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + state["lr"] * u, state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok = finite & (state["bad_step"] < 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = dict(params=keep(params, state["params"]),
               opt_state=keep(opt_state, state["opt_state"]),
               step=state["step"] + 1,
               bad_step=jnp.where((state["bad_step"] < 0) & ~finite, state["step"],
                                  state["bad_step"]),
               rng=state["rng"], lr=state["lr"])
    metrics = dict(loss=loss, lr=state["lr"] * schedule(state["step"]), grad_norm=grad_norm,
                   **extra)
    return new, metrics

  return step


def optax_global_norm(tree):
  import optax  # pylint: disable=import-outside-toplevel
  tree_lib = getattr(optax, "tree", None)  # optax >= 0.2.5; global_norm is deprecated
  return tree_lib.norm(tree) if hasattr(tree_lib, "norm") else optax.global_norm(tree)


# ----------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Result:
  """What :func:`train` returns: the final params (host NumPy), the model,
  the steps done, and the metrics rows it wrote."""
  model: Any
  params: Any
  step: int
  rows: list
  stopped: bool = False


def _host(tree):
  """A tree of (possibly multi-process) global arrays -> NumPy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _local(tree):
  """Replicated (possibly multi-process) arrays -> NumPy, from this process's copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _eval_source(config):
  inp = config.input
  if inp.eval_data:
    return data_lib.load_source(inp.eval_data, split=inp.eval_split, data_dir=inp.data_dir,
                                label_map=inp.label_map)
  if inp.eval_split:
    return data_lib.load_source(inp.data, split=inp.eval_split, data_dir=inp.data_dir,
                                label_map=inp.label_map)
  return None


def evaluate_params(model, params, source, config) -> dict:
  """Held-out top-1 and images/s through the project's evaluation
  (``mame_jax.eval.loop.evaluate``): the trained merge as its own row beside
  the plain model's."""
  from mame_jax.eval import loop as eval_loop  # pylint: disable=import-outside-toplevel
  extra = () if model.merge is None else (model.merge,)
  result = eval_loop.evaluate(model.clone(merge=None), params, source, taus=(), extra=extra,
                              batch_size=int(config.input.batch_size),
                              limit=config.input.eval_limit,
                              preprocess=config.input.preprocess,
                              crop_pct=config.input.crop_pct,
                              image_size=int(config.input.image_size), runs=3, warmup=1,
                              progress=False)
  row, base = result["rows"][-1], result["rows"][0]
  return dict(eval_top1=row["top1"], eval_images_per_s=row["images_per_s"],
              eval_gflops_per_image=row["gflops_per_image"],
              eval_top1_unmerged=base["top1"], eval_images=result["num_images"],
              eval_method=row["name"])


class TensorBoard:
  """``metrics.jsonl``'s scalars as TensorBoard events in ``workdir/tensorboard``
  (``tensorboardX``'s ``SummaryWriter``: it writes the event files without
  TensorFlow or PyTorch). :meth:`open` gives ``None`` when tensorboardX is not
  installed: the loop then writes the JSON lines alone."""

  def __init__(self, writer):
    self.writer = writer

  @classmethod
  def open(cls, workdir, start: int):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError:
      return None
    logdir = os.path.join(workdir, "tensorboard")
    # A resumed run logs again the steps after its checkpoint that the killed run
    # had logged; purge_step makes TensorBoard drop those older events. One file
    # per run (the pid and start step in its name: two runs in one second).
    resumed = os.path.isdir(logdir) and bool(os.listdir(logdir))
    return cls(tensorboardX.SummaryWriter(logdir, purge_step=start if resumed else None,
                                          filename_suffix=f".{os.getpid()}.from{start}"))

  def write(self, row: dict) -> None:
    step = int(row["step"])
    for key, value in row.items():
      if key == "step":
        continue
      if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
          self.writer.add_scalar(f"{key}/{i}", float(v), step)
      elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        self.writer.add_scalar(key, float(value), step)  # strings (names, errors) left out
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


_STEPS: dict = {}


def train(config, workdir, *, log=print) -> Result:
  """Runs (or resumes) ``config`` in ``workdir``; see the module docstring."""
  workdir = os.path.abspath(os.fspath(workdir))
  is_main = jax.process_index() == 0
  for name in ("total_steps", "log_steps", "ckpt_steps"):
    if int(config[name]) < 1:
      raise TrainError(f"{name} must be >= 1; got {config[name]}")
  total = int(config.total_steps)
  model, params = build_model(config)
  mesh = make_mesh()
  ndev = mesh.devices.size
  B = int(config.input.batch_size)
  if B % ndev:
    raise TrainError(f"input.batch_size {B} must be a multiple of the {ndev} devices")
  tx, schedule = optim.optimizer(lr=1.0, total_steps=total,
                                 warmup_steps=int(config.warmup_steps), wd=float(config.wd),
                                 grad_clip=float(config.grad_clip))
  try:
    source = train_data.load_train_source(config.input.data, split=config.input.split,
                                          data_dir=config.input.data_dir,
                                          label_map=config.input.label_map)
    eval_source = _eval_source(config)
  except (ValueError, FileNotFoundError) as e:
    raise TrainError(str(e)) from None
  batches = train_data.Batches(
      source, batch_size=B, image_size=int(config.input.image_size), total_steps=total,
      seed=int(config.seed), min_scale=float(config.input.min_scale),
      flip=bool(config.input.flip), process_index=jax.process_index(),
      process_count=jax.process_count(), workers=int(config.input.workers),
      prefetch=int(config.input.prefetch))

  # Shardings: the batch on `data`, the state replicated (or FSDP).
  rows_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  make_state = lambda p: init_state(p, tx, int(config.seed), float(config.lr))
  spec = (lambda x: fsdp_spec(x, ndev)) if config.fsdp else (lambda x: P())
  state_sharding = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)),
                                jax.eval_shape(make_state, params))
  # One program builds the state in place (eager optax init compiles op by op).
  state = jax.jit(make_state, out_shardings=state_sharding)(params)
  # One jitted step per setting and process: runs of the same setting (a resume
  # in the same process, the tests) reuse its compiled program.
  key = (model, total, int(config.warmup_steps), float(config.wd), float(config.grad_clip),
         int(config.num_classes), float(config.label_smoothing), float(config.mixup),
         bool(config.fsdp), tuple(mesh.devices.flat))
  if key not in _STEPS:
    _STEPS[key] = jax.jit(make_step(model, tx, schedule, num_classes=int(config.num_classes),
                                    label_smoothing=float(config.label_smoothing),
                                    mixup=float(config.mixup)),
                          in_shardings=(state_sharding, rows_sharding, rows_sharding),
                          out_shardings=(state_sharding, replicated), donate_argnums=0)
  step_fn = _STEPS[key]

  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpoint_lib.Checkpoints(workdir, keep=int(config.keep_ckpts))
  start = 0
  latest = ckpts.latest()
  if latest is not None:
    state, meta = ckpts.restore(latest, state)
    start = int(meta["data_step"])
    log(f"resumed from {ckpts.directory}/{latest} (step {start})")
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main and os.path.exists(metrics_path):
    # A killed run may have logged steps after its newest checkpoint; they are
    # run again now, so their old lines go.
    with open(metrics_path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    with open(metrics_path, "w") as f:
      f.writelines(kept)
  metrics_file = open(metrics_path, "a") if is_main else None
  board = TensorBoard.open(workdir, start) if is_main else None
  rows = []

  def write(row):
    rows.append(row)
    if metrics_file is not None:
      metrics_file.write(json.dumps(row) + "\n")
      metrics_file.flush()
    if board is not None:
      board.write(row)

  def check_finite():
    bad = int(_local(state["bad_step"]))
    if bad >= 0:
      write(dict(step=bad, error="non-finite loss"))
      raise NonFiniteLoss(f"non-finite loss at step {bad} (counted from 0): stopped; no "
                          f"checkpoint was written after it (newest: {ckpts.latest()})")

  def save(done):
    check_finite()
    ckpts.save(done, state, dict(step=done, data_step=done, seed=int(config.seed)))

  desc = model.merge.__class__.__name__ if model.merge is not None else "no merge"
  log(f"training ViT (width {model.width}, depth {model.depth}) on {source.name} "
      f"({len(source)} images), {config.merge.method} ({desc}), steps {start}..{total}, "
      f"batch {B} over {ndev} device(s) x {jax.process_count()} process(es)")
  progress = config.progress
  if progress is None:
    progress = sys.stderr.isatty()
  bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                  disable=not progress or not is_main)
  stop_after = config.stop_after
  eval_every = int(config.eval_steps)
  pending, t0, done, stopped = [], time.perf_counter(), start, False
  try:
    it = batches.from_step(start)
    for k in range(start, total):
      images, labels = next(it)
      x = jax.make_array_from_process_local_data(rows_sharding, images)
      y = jax.make_array_from_process_local_data(rows_sharding, labels)
      state, metrics = step_fn(state, x, y)
      pending.append(metrics)
      done = k + 1
      bar.update(1)
      last = done == total
      if done % int(config.log_steps) == 0 or last:
        got = _local(pending)
        elapsed = time.perf_counter() - t0
        row = dict(step=done,
                   loss=float(np.mean([m["loss"] for m in got])),
                   lr=float(got[-1]["lr"]), grad_norm=float(got[-1]["grad_norm"]),
                   accuracy=float(np.mean([m["accuracy"] for m in got])),
                   dropped=float(np.mean([m["dropped"] for m in got])),
                   tokens=[round(float(t), 3) for t in got[-1]["tokens"]],
                   images_per_s=len(got) * B / max(elapsed, 1e-9))
        check_finite()
        write(row)
        bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.2e} "
                            f"img/s {row['images_per_s']:.0f}", refresh=False)
        pending, t0 = [], time.perf_counter()
      if done % int(config.ckpt_steps) == 0 or last:
        save(done)
      if eval_source is not None and ((eval_every and done % eval_every == 0) or last):
        check_finite()
        write(dict(step=done, **evaluate_params(model, state["params"], eval_source, config)))
        t0 = time.perf_counter()
      if stop_after is not None and done - start >= int(stop_after) and not last:
        stopped = True
        log(f"stopped after {done - start} steps (stop_after); run again to resume")
        break
  finally:
    bar.close()
    ckpts.wait()
    ckpts.close()
    if metrics_file is not None:
      metrics_file.close()
    if board is not None:
      board.close()
  final = _host(state["params"])
  if not stopped and done == total and is_main:
    path = os.path.join(workdir, "final.npz")
    ckpt_lib.save_npz(final, path, meta=dict(gelu_approximate=model.gelu_approximate,
                                             input_norm=model.input_norm))
    log(f"wrote {path}")
  return Result(model=model, params=final, step=done, rows=rows, stopped=stopped)


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the environment: the coordinator
  (``JAX_COORDINATOR_ADDRESS``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  when set, else jax's cluster detection."""
  num = os.environ.get("JAX_NUM_PROCESSES")
  pid = os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(num) if num else None,
                             process_id=int(pid) if pid else None)
