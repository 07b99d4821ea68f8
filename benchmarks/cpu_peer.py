"""The CPU beside PyTorch: the project's ViTs against timm and the real ToMe, in one process.

    python -m benchmarks.cpu_peer                     # ViT-S/16 and ViT-B/16, batch 32 and 1
    python -m benchmarks.cpu_peer --variants S/16 --batches 32 --parts ops profile
                                                      # where the time goes, both frameworks
    python -m benchmarks.cpu_peer --variants S/16 --batches 32 --parts flags
                                                      # XLA CPU options against the defaults
    python -m benchmarks.cpu_peer --quick --no-peer --json /tmp/cpu_peer.json   # tiny, no torch

Everything runs in float32 on the CPU, in one process, timed interleaved by the
project's timer (``mame_jax.eval.timing.time_interleaved``: every program
compiled, or every torch model called, once first; then rounds calling each in
turn; the median per row and its interquartile range). Weights are random
(``mame_jax.models.load.random_params``; timm's own initialisation with
``pretrained=False``): speed does not depend on them, MaMe's token counts do.

Rows, per model and batch size:

* ``baseline`` -- the project's ViT (``vit.Model``, class token, exact erf GELU
  as timm's, LayerNorm eps 1e-6), with the settings ``mame_jax.cpu`` applies;
* ``baseline (XLA defaults)`` -- the same program compiled with those settings
  reverted to XLA's defaults (only when ``mame_jax.cpu`` applies any);
* ``mame`` -- MaMe in the first 8 blocks at ``--tau`` (exact mode, the schedule
  settled first by ``mame_jax.Runner``; no PyTorch peer);
* ``tome`` -- ``ToMeConfig(r=--r)`` in every block (ToMe's timm recipe);
* ``timm`` -- timm's ``vit_small_patch16_224`` / ``vit_base_patch16_224`` (DeiT-S
  and ViT-B share these shapes), eager, ``torch.inference_mode``, fused SDPA
  attention, torch's default intra-op threads;
* ``tome (real)`` -- facebookresearch/ToMe's ``tome.patch.timm`` on that timm
  model with the same ``r``, when the ``tome`` package is importable.

``vs_peer`` is a row's images/s over its PyTorch peer's (baseline and its
variants: ``timm``; ``tome``: ``tome (real)``, or ``timm`` when the real ToMe is
missing, said in the row's ``peer``). The PyTorch rows need the optional
``peer`` extra (``pip install -e .[peer]``); without it, or with ``--no-peer``,
the project's rows run alone and the JSON says why.

``--parts`` adds, at the first model's shapes and the first batch size:

* ``ops`` -- one block's operations timed alone in both frameworks,
  interleaved (the patch embedding as a convolution and as a reshape + matmul,
  LayerNorm, the q/k/v projections, attention as ``jax.nn.dot_product_attention``
  and as the hand-written einsums, the output projection, the two MLP matmuls,
  GELU, a whole block);
* ``profile`` -- each framework's whole baseline forward profiled
  (``jax.profiler``: every thunk of XLA's CPU runtime, attributed by its HLO
  ``op_name``; ``torch.profiler``: the top-level aten calls) and split into the
  same parts: where the difference between the two forwards comes from;
* ``flags`` -- the programs of ``--flag-methods`` compiled with each of
  ``FLAG_CANDIDATES`` (XLA CPU options, given per program as compiler options)
  and timed interleaved against XLA's defaults (for every model and batch).

The JSON (``results/cpu_peer.json``) holds the device, the versions, the
command, every timing and ``others_cpu_share``: the share of the cores other
processes used during the run (a figure measured beside another job says so).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import pathlib
import re
import shlex
import sys
import time

if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mame_jax as mj
from mame_jax import cpu
from benchmarks.gpu import device_info, versions
from benchmarks.vit_throughput import open_section, photo_batch, weights_line
from mame_jax.eval import timing
from mame_jax.eval.report import write_json
from mame_jax.models import load, vit

RESULTS = pathlib.Path("results/cpu_peer.json")  # the forward side by side
PARTS_RUN = ("forward", "ops", "profile", "flags")  # what --parts can ask for
# The project's variant -> timm's model of the same shapes (DeiT-S is vit_small's).
TIMM_NAMES = {"S/16": "vit_small_patch16_224", "B/16": "vit_base_patch16_224"}
# --quick: a 2-block ViT on 32-px images (5 tokens), the same in both frameworks.
TINY = dict(width=64, depth=2, num_heads=2, mlp_dim=256, patch_size=16)
TINY_SIZE = 32
# XLA CPU options tried against the defaults by --flags (DebugOptions fields, given
# to the compiler per program, so that every candidate runs in this one process).
# jax 0.10.2's XLA hands dots, reductions and convolutions to YNNPACK by default
# (``cpu.XLA_DEFAULTS``); a list of library fusion types replaces that default.
_YNN = "xla_cpu_experimental_ynn_fusion_type"
_XNN = "xla_cpu_experimental_xnn_fusion_type"
_ONEDNN = "xla_cpu_experimental_onednn_fusion_type"


def _types(*names):
  return ",".join(f"LIBRARY_FUSION_TYPE_{n}" for n in names)


FLAG_CANDIDATES = {
    # Which library runs the matmuls, reductions and the patch convolution.
    "ynn_off": {_YNN: ""},  # an empty list: XLA's own code and Eigen for everything
    "eigen_dots": {_YNN: _types("REDUCE", "INDIVIDUAL_CONVOLUTION")},
    "ynn_dot": {_YNN: _types("DOT")},
    "ynn_dot_reduce": {_YNN: _types("DOT", "REDUCE")},
    "ynn_individual_dot": {_YNN: _types("INDIVIDUAL_DOT", "REDUCE", "INDIVIDUAL_CONVOLUTION")},
    "ynn_eltwise": {_YNN: _types("DOT", "REDUCE", "INDIVIDUAL_CONVOLUTION", "ELTWISE")},
    "onednn_dots": {_YNN: _types("REDUCE", "INDIVIDUAL_CONVOLUTION"),
                    "xla_cpu_use_onednn": True, _ONEDNN: _types("DOT")},
    "onednn_dots_ynn_off": {_YNN: "", "xla_cpu_use_onednn": True,
                            _ONEDNN: _types("DOT")},
    "onednn_dot_eltwise": {_YNN: _types("REDUCE", "INDIVIDUAL_CONVOLUTION"),
                           "xla_cpu_use_onednn": True, _ONEDNN: _types("DOT", "ELTWISE")},
    "xnn_dots": {_YNN: _types("REDUCE", "INDIVIDUAL_CONVOLUTION"), _XNN: _types("DOT")},
    # How XLA compiles and schedules its own code.
    "opt_fast_runtime": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
    "scheduler_concurrency": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
    "single_thread_eigen": {"xla_cpu_multi_thread_eigen": False},
    "vector_width_128": {"xla_cpu_prefer_vector_width": 128},
}
BASE_COLUMNS = ["model", "batch", "method", "framework", "images_per_s", "iqr_ms",
                "gflops_per_image", "peer", "vs_peer"]
OPS_COLUMNS = ["op", "shape", "per_forward", "jax_ms", "torch_ms", "jax_over_torch",
               "jax_ms_per_forward", "torch_ms_per_forward"]
PROFILE_COLUMNS = ["part", "jax_ms", "torch_ms", "jax_over_torch"]
FLAG_COLUMNS = ["model", "batch", "method", "flags", "images_per_s", "iqr_ms", "vs_default",
                "library_calls"]


# ------------------------------------------------------------------------------------
# The two frameworks' models.


def project_model(variant, merge=None):
  """The project's ViT as timm builds the peer: class token, exact erf GELU, LN eps
  1e-6, learned position embeddings (``variant="tiny"``: :data:`TINY`)."""
  shape = dict(TINY) if variant == "tiny" else dict(variant=variant)
  return vit.Model(1000, pool_type="tok", gelu_approximate=False, merge=merge, **shape)


def image_size(variant) -> int:
  return TINY_SIZE if variant == "tiny" else 224


def import_peer():
  """``(torch, timm, tome_or_None, note)``; ``(None, None, None, why)`` when torch or
  timm is missing. ``tome`` is facebookresearch/ToMe's package, or None."""
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, None, None, f"torch / timm not importable ({e}): pip install -e .[peer]"
  try:
    import tome  # pylint: disable=import-outside-toplevel
  except ImportError:
    return torch, timm, None, ("the real ToMe (facebookresearch/ToMe, package `tome`) is not "
                               "installed: the project's ToMe is compared with timm's plain model")
  return torch, timm, tome, None


def timm_model(timm, variant, r=None, tome=None):
  """timm's model of ``variant``'s shapes, random weights, eval mode; with ``r``,
  patched by the real ToMe (``tome.patch.timm``) to merge ``r`` tokens per block."""
  if variant == "tiny":
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=TINY_SIZE, patch_size=TINY["patch_size"], embed_dim=TINY["width"],
        depth=TINY["depth"], num_heads=TINY["num_heads"],
        mlp_ratio=TINY["mlp_dim"] / TINY["width"], num_classes=1000)
  else:
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False)
  model = model.eval()
  if r is not None:
    tome.patch.timm(model)
    model.r = r
  return model


def torch_call(torch, model, x):
  """``(fn, args)`` for the timer: one eager forward without autograd. A CPU
  forward is synchronous, so returning nothing leaves nothing to wait for."""
  def run(x):
    with torch.inference_mode():
      model(x)
  return run, (x,)


def to_torch(torch, images):
  """``(B, H, W, 3)`` JAX images -> ``(B, 3, H, W)`` float32 torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------------
# The forward side by side.


def defaults_of(settings) -> dict:
  """The XLA defaults of the option names in ``settings`` (what ``cpu.SETTINGS``
  replaces), as compiler options: compiling with them reverts the settings."""
  return {name: cpu.XLA_DEFAULTS[name] for name in settings}


def compiled(fn, args, options=None):
  """``fn`` (jitted) compiled for ``args`` with extra XLA ``options``."""
  return fn.lower(*args).compile(compiler_options=options or None)


def library_calls(program) -> str:
  """The library fusions (``__ynn_fusion``, ``__xnn_fusion``, ``__onednn_fusion``) and
  custom calls of the optimised program, counted: whether an option changed what
  runs (e.g. ``"ynn 75"``; ``"none"``: everything is XLA's own code and Eigen)."""
  text = program.as_text()
  kinds = collections.Counter(re.findall(r'"kind":"__(\w+?)_fusion"', text))
  kinds.update({"custom-call": len(re.findall(r"= \S+ custom-call\(", text))})
  return " ".join(f"{k} {n}" for k, n in sorted(kinds.items()) if n) or "none"


def jax_methods(variant, batch, args, methods=("baseline", "mame", "tome")):
  """``({name: jitted fn}, params, images, extras)`` for the project's rows (those
  of ``methods``)."""
  model = project_model(variant)
  size = image_size(variant)
  params = load.random_params(model, size, seed=0)
  images = photo_batch(batch, size)
  plain = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x)[0])
  fns = {"baseline": plain(model)}
  extras = {"baseline": {}}
  if "mame" in methods:
    layers = tuple(range(min(8, model.depth)))
    runner = mj.Runner(model.clone(merge=mj.MergeConfig(tau=args.tau, layers=layers)), params)
    _, aux = runner(images)
    program = runner.program(runner.schedule, images.shape)
    fns["mame"] = jax.jit(lambda p, x: program(p, x)[0])
    extras["mame"] = dict(tau=args.tau, capacities=list(runner.schedule),
                          tokens_per_layer=np.asarray(aux["tokens_per_block"]).mean(0)
                          .round(1).tolist())
  if "tome" in methods:
    fns["tome"] = plain(model.clone(merge=mj.ToMeConfig(r=args.r)))
    extras["tome"] = dict(r=args.r)
  return fns, params, images, extras


def model_name(variant) -> str:
  return "tiny ViT" if variant == "tiny" else f"ViT-{variant}"


def forward_rows(variant, batch, args, peer) -> list:
  """The rows of one model at one batch size: the project's programs and the
  PyTorch peers, timed interleaved."""
  name = model_name(variant)
  print(f"{name}, batch {batch}, float32", flush=True)
  fns, params, images, extras = jax_methods(variant, batch, args)
  calls = {m: (fn, (params, images)) for m, fn in fns.items()}
  if cpu.SETTINGS:
    calls["baseline (XLA defaults)"] = (
        compiled(fns["baseline"], (params, images), defaults_of(cpu.SETTINGS)), (params, images))
  torch, timm, tome, _ = peer
  if torch is not None:
    x = to_torch(torch, images)
    calls["timm"] = torch_call(torch, timm_model(timm, variant), x)
    if tome is not None:
      calls["tome (real)"] = torch_call(torch, timm_model(timm, variant, args.r, tome), x)
  timings = timing.time_interleaved(calls, rounds=args.rounds, warmup=args.warmup)
  rows = []
  for method, t in timings.items():
    row = dict(model=name, batch=batch, method=method,
               framework="torch" if method in ("timm", "tome (real)") else "jax",
               images_per_s=batch / t.median_s, ms_per_batch=1e3 * t.median_s,
               iqr_ms=1e3 * t.iqr_s, compile_s=t.compile_s, **extras.get(method, {}))
    # XLA's defaults compile the baseline's program: the same FLOPs.
    counted = "baseline" if method.startswith("baseline") else method
    if counted in fns:
      row["gflops_per_image"] = timing.gflops(fns[counted], params, images) / batch
    rows.append(row)
  by = {row["method"]: row for row in rows}
  for row in rows:
    peer_name = None
    if row["method"].startswith("baseline"):
      peer_name = "timm"
    elif row["method"] == "tome":
      peer_name = "tome (real)" if "tome (real)" in by else "timm"
    if peer_name in by:
      row["peer"] = peer_name
      row["vs_peer"] = row["images_per_s"] / by[peer_name]["images_per_s"]
    print(f"  {row['method']:<24} {row['images_per_s']:8.2f} img/s  IQR {row['iqr_ms']:.1f} ms"
          + (f"  x{row['vs_peer']:.3f} vs {peer_name}" if "vs_peer" in row else ""), flush=True)
  return rows


def sweep_flags(variant, batch, args) -> list:
  """The programs of ``--flag-methods`` compiled with each of :data:`FLAG_CANDIDATES`
  (and with XLA's defaults), timed interleaved; ``vs_default`` is images/s over
  the defaults'."""
  name = model_name(variant)
  print(f"XLA options, {name}, batch {batch}", flush=True)
  fns, params, images, _ = jax_methods(variant, batch, args, args.flag_methods)
  rows = []
  for method in args.flag_methods:
    programs = {"defaults": compiled(fns[method], (params, images), defaults_of(cpu.SETTINGS))}
    if cpu.SETTINGS:
      programs["mame_jax.cpu"] = compiled(fns[method], (params, images), cpu.SETTINGS)
    for label in args.flag_names or FLAG_CANDIDATES:
      options = FLAG_CANDIDATES[label]
      try:
        programs[label] = compiled(fns[method], (params, images),
                                   {**defaults_of(cpu.SETTINGS), **options})
      except Exception as e:  # pylint: disable=broad-except  # an option this XLA refuses
        rows.append(dict(model=name, batch=batch, method=method, flags=label,
                         error=f"{type(e).__name__}: {str(e)[:200]}"))
    timings = timing.time_interleaved({k: (p, (params, images)) for k, p in programs.items()},
                                      rounds=args.rounds, warmup=args.warmup)
    base = timings["defaults"].median_s
    for label, t in timings.items():
      options = (FLAG_CANDIDATES.get(label) or (cpu.SETTINGS if label == "mame_jax.cpu" else {}))
      rows.append(dict(model=name, batch=batch, method=method, flags=label, options=options,
                       images_per_s=batch / t.median_s, ms_per_batch=1e3 * t.median_s,
                       iqr_ms=1e3 * t.iqr_s, vs_default=base / t.median_s,
                       library_calls=library_calls(programs[label])))
      print(f"  flags {method:<8} {label:<32} {batch / t.median_s:8.2f} img/s  "
            f"x{base / t.median_s:.3f} vs defaults", flush=True)
  return rows


# ------------------------------------------------------------------------------------
# Where the time goes: one block's operations, each timed on its own.


def jax_ops(variant, batch):
  """``{op: (fn, args)}``: the project's operations at ``variant``'s shapes, each
  jitted alone, built from the modules ``vit.py`` uses."""
  model = project_model(variant)
  size = image_size(variant)
  p = model.patch_size[0]
  d, heads, mlp = model.width, model.num_heads, model.mlp_dim or 4 * model.width
  length = (size // p) ** 2 + 1
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
  hidden = jnp.asarray(rng.normal(size=(batch, length, mlp)), jnp.float32)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, d // heads)), jnp.float32)
             for _ in range(3))
  images = photo_batch(batch, size)
  key = jax.random.key(0)

  def module(m, *inputs):
    params = m.init(key, *inputs)
    return jax.jit(m.apply), (params, *inputs)

  def stem_matmul(w, b, x):  # non-overlapping patches: a reshape and one matmul
    n, hh, ww, c = x.shape
    x = x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hh // p, ww // p, p * p * c) @ w.reshape(p * p * c, -1) + b

  conv_fn, conv_args = module(nn.Conv(d, (p, p), strides=p, padding="VALID"), images)
  conv = conv_args[0]["params"]
  dense = functools.partial(nn.DenseGeneral, kernel_init=nn.initializers.xavier_uniform())

  class QKV(nn.Module):  # the three projections of vit.MultiHeadDotProductAttention
    @nn.compact
    def __call__(self, x):
      return tuple(dense((heads, d // heads), axis=-1, name=n)(x)
                   for n in ("query", "key", "value"))

  block = vit.Encoder1DBlock(mlp_dim=mlp, num_heads=heads, gelu_approximate=False)
  return {
      "patch embedding (conv)": (conv_fn, conv_args),
      "patch embedding (reshape+matmul)": (jax.jit(stem_matmul),
                                           (conv["kernel"], conv["bias"], images)),
      "LayerNorm": module(nn.LayerNorm(epsilon=vit.LN_EPS), tokens),
      "q/k/v projections": module(QKV(), tokens),
      "attention (dot_product_attention)": (jax.jit(vit.fused_attention), (q, k, v)),
      "attention (manual einsum)": (jax.jit(vit.manual_attention), (q, k, v)),
      "out projection": module(dense(d, axis=(-2, -1)), q),
      "MLP fc1": module(nn.Dense(mlp), tokens),
      "GELU (erf)": (jax.jit(functools.partial(nn.gelu, approximate=False)), (hidden,)),
      "MLP fc2": module(nn.Dense(d), hidden),
      "one block": module(block, tokens),
  }


def torch_ops(torch, timm, variant, batch):
  """``{op: (fn, args)}``: timm's modules for the same operations (one block of
  the timm model), each called alone under ``inference_mode``."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  model = timm_model(timm, variant)
  blk = model.blocks[0]
  size = image_size(variant)
  d, heads = model.embed_dim, blk.attn.num_heads
  length = (size // model.patch_embed.patch_size[0]) ** 2 + 1
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randn(batch, length, d, generator=gen)
  hidden = torch.randn(batch, length, blk.mlp.fc1.out_features, generator=gen)
  q, k, v = (torch.randn(batch, heads, length, d // heads, generator=gen) for _ in range(3))
  images = torch.randn(batch, 3, size, size, generator=gen)

  def call(fn, *args):
    def run(*a):
      with torch.inference_mode():
        fn(*a)
    return run, args

  def qkv(x):  # timm's Attention: one Linear, then (3, B, H, L, hd)
    return blk.attn.qkv(x).reshape(batch, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)

  def proj(o):  # (B, H, L, hd) -> (B, L, D) -> Linear, as timm does after attention
    return blk.attn.proj(o.transpose(1, 2).reshape(batch, length, d))

  return {
      "patch embedding (conv)": call(model.patch_embed, images),
      "LayerNorm": call(blk.norm1, tokens),
      "q/k/v projections": call(qkv, tokens),
      "attention (dot_product_attention)": call(F.scaled_dot_product_attention, q, k, v),
      "out projection": call(proj, q),
      "MLP fc1": call(blk.mlp.fc1, tokens),
      "GELU (erf)": call(blk.mlp.act, hidden),
      "MLP fc2": call(blk.mlp.fc2, hidden),
      "one block": call(blk, tokens),
  }


def op_breakdown(variant, batch, args, peer) -> dict:
  """One block's operations timed alone in both frameworks, interleaved; with the
  whole forward's share of each (``per_forward``: how often it runs per forward)."""
  print(f"Operations of {variant} at batch {batch}", flush=True)
  model = project_model(variant)
  depth = model.depth
  size = image_size(variant)
  length = (size // model.patch_size[0]) ** 2 + 1
  d, heads, mlp = model.width, model.num_heads, model.mlp_dim or 4 * model.width
  shapes = {
      "patch embedding (conv)": (f"({batch}, {size}, {size}, 3)", 1),
      "patch embedding (reshape+matmul)": (f"({batch}, {size}, {size}, 3)", 1),
      "LayerNorm": (f"({batch}, {length}, {d})", 2 * depth + 1),
      "q/k/v projections": (f"({batch}, {length}, {d}) -> 3 x {d}", depth),
      "attention (dot_product_attention)": (f"({batch}, {length}, {heads}, {d // heads})", depth),
      "attention (manual einsum)": (f"({batch}, {length}, {heads}, {d // heads})", depth),
      "out projection": (f"({batch}, {length}, {d}) -> {d}", depth),
      "MLP fc1": (f"({batch}, {length}, {d}) -> {mlp}", depth),
      "GELU (erf)": (f"({batch}, {length}, {mlp})", depth),
      "MLP fc2": (f"({batch}, {length}, {mlp}) -> {d}", depth),
      "one block": (f"({batch}, {length}, {d})", depth),
  }
  calls = {f"jax/{op}": entry for op, entry in jax_ops(variant, batch).items()}
  torch, timm, _, _ = peer
  if torch is not None:
    calls.update({f"torch/{op}": entry for op, entry in torch_ops(torch, timm, variant,
                                                                  batch).items()})
  timings = timing.time_interleaved(calls, rounds=args.rounds, warmup=args.warmup)
  rows = []
  for op, (shape, count) in shapes.items():
    row = dict(op=op, shape=shape, per_forward=count)
    for side in ("jax", "torch"):
      t = timings.get(f"{side}/{op}")
      if t is not None:
        row[f"{side}_ms"] = 1e3 * t.median_s
        row[f"{side}_iqr_ms"] = 1e3 * t.iqr_s
        row[f"{side}_ms_per_forward"] = 1e3 * t.median_s * count
    if "jax_ms" in row and "torch_ms" in row:
      row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
    rows.append(row)
    print(f"  {op:<36} jax {row.get('jax_ms', float('nan')):9.3f} ms  "
          f"torch {row.get('torch_ms', float('nan')):9.3f} ms", flush=True)
  return dict(model=variant, batch=batch, rows=rows)


# ------------------------------------------------------------------------------------
# Where the time goes inside each framework's whole forward: a profile.

# The parts of a forward, in the order the tables give them.
PARTS = ("patch embedding", "LayerNorm", "q/k/v projections", "attention", "out projection",
         "MLP matmuls", "GELU", "other")


def jax_part(op_name: str) -> str:
  """The part of the forward an XLA instruction belongs to, from its ``op_name``
  (the flax module path, e.g. ``.../encoderblock_3/MlpBlock_0/Dense_0/dot_general``).
  A fusion carries the name of its root: a bias add fused into a matmul counts as
  the matmul, a matmul fused into GELU as GELU."""
  if "/embedding/" in op_name:
    return "patch embedding"
  if "LayerNorm" in op_name or "encoder_norm" in op_name:
    return "LayerNorm"
  if any(f"/{n}/" in op_name for n in ("query", "key", "value")):
    return "q/k/v projections"
  if "MultiHeadDotProductAttention" in op_name and "/out/" in op_name:
    return "out projection"
  if "MultiHeadDotProductAttention" in op_name:
    return "attention"
  if "MlpBlock" in op_name and "/Dense_" in op_name:
    return "MLP matmuls"
  if "MlpBlock" in op_name:
    return "GELU"
  return "other"


def profile_jax(fn, args) -> dict:
  """``{part: ms per forward}`` from ``jax.profiler``'s trace of one run of the
  compiled ``fn``: every thunk XLA's CPU runtime starts (a fusion, a matmul, a
  copy) is an event named after its HLO instruction, whose ``op_name`` gives the
  part (:func:`jax_part`). Matmuls run on Eigen's pool after their event ends, so
  a thunk is charged the time from its start to the next thunk's start (the last
  one its own duration): the parts add up to the run. An instruction without an
  ``op_name`` (the partial sums XLA splits a LayerNorm's reduction into) counts
  with the next one that has one. ``"wall"``: the median of 3 calls, timed apart."""
  import tempfile  # pylint: disable=import-outside-toplevel
  # Without xprof_traceme the matmuls Eigen runs leave no event at all.
  program = fn.lower(*args).compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
  text = program.as_text()
  ops = dict(re.findall(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', text, re.MULTILINE))
  instructions = set(re.findall(r"^\s*(?:ROOT )?%(\S+) = ", text, re.MULTILINE))
  wall = 1e3 * timing.time_fn(program, *args, warmup=1, runs=3).median_s
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(program(*args))
    data = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(d).rglob("*.xplane.pb"))))
  events = sorted((e.start_ns, e.duration_ns, ops.get(e.name)) for plane in data.planes
                  for line in plane.lines for e in line.events if e.name in instructions)
  parts = dict.fromkeys(PARTS, 0.0)
  pending = 0.0
  for i, (start, duration, op_name) in enumerate(events):
    ms = ((events[i + 1][0] - start) if i + 1 < len(events) else duration) / 1e6
    if op_name is None:
      pending += ms
    else:
      parts[jax_part(op_name)] += ms + pending
      pending = 0.0
  parts["other"] += pending
  return parts | {"wall": wall}


def profile_torch(torch, model, x, calls: int = 3) -> dict:
  """``{part: ms per forward}`` from ``torch.profiler`` over ``calls`` forwards:
  the time of each top-level aten call (``aten::linear`` told apart by its weight's
  shape), the rest of the forward as ``other``; ``"wall"``: the forward's own."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  d = model.embed_dim
  with torch.inference_mode():
    model(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
      for _ in range(calls):
        with torch.profiler.record_function("forward"):
          model(x)
  parts = dict.fromkeys(PARTS, 0.0)
  wall = 0.0
  for e in prof.key_averages(group_by_input_shape=True):
    ms = e.cpu_time_total / 1e3 / calls
    shapes = e.input_shapes or []
    weight = shapes[1] if len(shapes) > 1 and shapes[1] else None
    if e.key == "forward":
      wall += ms
    elif e.key == "aten::conv2d":
      parts["patch embedding"] += ms
    elif e.key == "aten::layer_norm":
      parts["LayerNorm"] += ms
    elif e.key == "aten::scaled_dot_product_attention":
      parts["attention"] += ms
    elif e.key == "aten::gelu":
      parts["GELU"] += ms
    elif e.key == "aten::linear" and weight:
      if weight[0] == 3 * d:
        parts["q/k/v projections"] += ms
      elif weight == [d, d]:
        parts["out projection"] += ms
      elif weight[1] == d and weight[0] != 1000 or weight[0] == d:
        parts["MLP matmuls"] += ms
  parts["other"] = wall - sum(parts.values())
  return parts | {"wall": wall}


def profile_forward(variant, batch, peer) -> dict:
  """Both frameworks' baseline forward at ``batch``, profiled and split into
  :data:`PARTS` (ms per forward)."""
  print(f"Profile of {variant} at batch {batch}", flush=True)
  model = project_model(variant)
  size = image_size(variant)
  params = load.random_params(model, size, seed=0)
  images = photo_batch(batch, size)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  sides = {"jax": profile_jax(fn, (params, images))}
  torch, timm, _, _ = peer
  if torch is not None:
    sides["torch"] = profile_torch(torch, timm_model(timm, variant), to_torch(torch, images))
  rows = []
  for part in PARTS + ("wall",):
    row = dict(part=part, **{f"{k}_ms": v[part] for k, v in sides.items()})
    if row.get("torch_ms"):
      row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
    rows.append(row)
    print(f"  {part:<20} " + "  ".join(f"{k} {v[part] or 0:9.2f} ms" for k, v in sides.items()),
          flush=True)
  return dict(model=variant, batch=batch, rows=rows)


# ------------------------------------------------------------------------------------


def others_cpu():
  """A function returning the share of this machine's cores that *other* processes
  used since this call (0: the run had the cores to itself; 0.5: others took half
  of them), from ``/proc/stat`` less this process's own CPU time; it returns None
  where ``/proc/stat`` is missing. The JSON records it, so that a figure taken
  beside another job says so."""
  def busy_s():
    try:
      fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
      return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

  start_busy, start_own, start_wall = busy_s(), sum(os.times()[:2]), time.perf_counter()

  def share():
    end_busy = busy_s()
    if start_busy is None or end_busy is None:
      return None
    own = sum(os.times()[:2]) - start_own
    wall = time.perf_counter() - start_wall
    return max(0.0, (end_busy - start_busy - own) / (wall * os.cpu_count()))
  return share


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=["S/16", "B/16"])
  parser.add_argument("--batches", nargs="+", type=int, default=[32, 1])
  parser.add_argument("--r", type=int, default=13, help="ToMe's tokens merged per block")
  parser.add_argument("--tau", type=float, default=0.9, help="MaMe's threshold (random weights)")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--parts", nargs="+", choices=PARTS_RUN, default=["forward"],
                      help="forward: the models side by side; ops: one block's operations "
                      "alone in both frameworks; profile: both baseline forwards profiled, "
                      "split into their parts; flags: the XLA CPU options of FLAG_CANDIDATES "
                      "against the defaults")
  parser.add_argument("--flag-methods", nargs="+", default=["baseline", "tome"],
                      choices=["baseline", "mame", "tome"],
                      help="the programs --parts flags compiles")
  parser.add_argument("--flag-names", nargs="+", choices=sorted(FLAG_CANDIDATES), default=None,
                      metavar="NAME", help="the FLAG_CANDIDATES --parts flags tries (default: all)")
  parser.add_argument("--no-peer", action="store_true",
                      help="leave torch / timm out even when they are installed")
  parser.add_argument("--quick", action="store_true",
                      help="a 2-block ViT on 32-px images at batch 2, 2 rounds: a smoke test")
  parser.add_argument("--json", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.variants, args.batches, args.rounds, args.warmup, args.r = ["tiny"], [2], 2, 0, 1
  if args.no_peer:
    peer = (None, None, None, "left out (--no-peer)")
  else:
    peer = import_peer()
  torch = peer[0]
  others = others_cpu()
  rows, flag_rows = [], []
  for variant in args.variants:
    for batch in args.batches:
      if "forward" in args.parts:
        rows += forward_rows(variant, batch, args, peer)
      if "flags" in args.parts:
        flag_rows += sweep_flags(variant, batch, args)
  first = (args.variants[0], args.batches[0])
  ops = op_breakdown(*first, args, peer) if "ops" in args.parts else None
  profile = profile_forward(*first, peer) if "profile" in args.parts else None
  print()
  print(timing.format_table(rows, BASE_COLUMNS))
  out = dict(
      command=("python -m benchmarks.cpu_peer " + shlex.join(argv)).strip(),
      device=device_info(), date=timing.today(), dtype="float32", versions=versions(),
      weights="random", jax_threads=os.cpu_count(),
      torch_threads=torch.get_num_threads() if torch is not None else None,
      peer_note=peer[3], real_tome=peer[2] is not None, settings=dict(cpu.SETTINGS),
      settings_applied=cpu.applied(), r=args.r, tau=args.tau, rows=rows,
      flags=flag_rows, ops=ops, profile=profile, others_cpu_share=others())
  write_json(args.json, out)
  print(f"\nsaved {args.json}")
  return out


def section(paths=None) -> list:
  """The BENCHMARKS.md section: for each run saved at ``paths`` (default:
  ``results/cpu_peer.json``, then every ``results/cpu_peer_*.json`` -- more models,
  the profile and operations, the XLA options), its command, device, versions,
  weights and the cores other processes took, then its tables; the targets met or
  missed last, from every run's forward rows."""
  if paths is None:
    paths = [RESULTS] + sorted(RESULTS.parent.glob("cpu_peer_*.json"),
                               key=lambda p: ("_flags" in p.name, p.name))
  first, *rest = [pathlib.Path(p) for p in paths]
  out, run = open_section("The CPU beside PyTorch: timm and the real ToMe", first, "cpu_peer")
  if run is None:
    return out
  out += ["", weights_line("random", "randomly initialised models in both frameworks: the "
                           "cost of each token count is real; MaMe's token counts are not a "
                           "trained model's."), ""]
  rest = [p for p in rest if p.exists()]
  runs = [run] + [json.loads(p.read_text()) for p in rest]
  for i, r in enumerate(runs):
    if i:
      out += ["", f"`{r['command']}` -- {r['device']['description']}, {r['dtype']}, "
              f"{r['date']} (`{rest[i - 1]}`).", ""]
    out += _run_lines(r)
  out += ["", "Targets (baseline and ToMe >= 1.0x their PyTorch peers at batch 32, not "
          "slower at batch 1):", ""] + targets([row for r in runs for row in r["rows"]])
  return out


def _run_lines(run) -> list:
  v = run["versions"]
  share = run.get("others_cpu_share")
  out = []
  if run["rows"] or run.get("ops") or run.get("profile"):
    out.append(f"PyTorch side: torch {v.get('torch')}, timm {v.get('timm')}, "
               f"{run['torch_threads']} intra-op threads; the real ToMe "
               f"{'ran' if run['real_tome'] else 'was not available'}"
               + (f" ({run['peer_note']})" if run["peer_note"] else "") + ".")
  out.append(f"XLA settings `mame_jax.cpu` applied in this process: "
             f"{_settings(run['settings_applied'])}.")
  if share is not None:
    out.append(f"Other processes used {100 * share:.0f}% of the machine's cores during this "
               "run" + (": the cores were shared, read the ratios (interleaved), not the "
                        "absolute figures." if share > 0.05 else "."))
  if run["rows"]:
    out += ["", timing.format_table(run["rows"], BASE_COLUMNS)]
  if run.get("profile"):
    prof = run["profile"]
    out += ["", f"Where the time goes in each whole baseline forward ({prof['model']}, batch "
            f"{prof['batch']}; ms per forward; XLA: `jax.profiler`, every thunk attributed by "
            "its HLO op_name, a fusion by its root; torch: `torch.profiler`, top-level aten "
            "calls):", "", timing.format_table(prof["rows"], PROFILE_COLUMNS), ""]
    out += _limits(prof["rows"])
  if run.get("ops"):
    ops = run["ops"]
    out += ["", f"One block's operations alone ({ops['model']}, batch {ops['batch']}); "
            "`per_forward`: how often the forward runs it:", "",
            timing.format_table(ops["rows"], OPS_COLUMNS)]
  if run.get("flags"):
    out += ["", "XLA CPU options against XLA's defaults (each program compiled with the "
            "option, timed interleaved; `library_calls`: the library fusions in the "
            "optimised program, `none`: XLA's own code and Eigen):", "",
            timing.format_table(run["flags"], FLAG_COLUMNS)]
  return out


def _limits(rows) -> list:
  """What the profile says limits XLA: the parts it spends more time on than
  PyTorch, and those it spends less on, from the rows."""
  ratio = {r["part"]: r["jax_over_torch"] for r in rows
           if r.get("jax_over_torch") and r["part"] != "wall"}
  if not ratio:
    return []
  fmt = lambda parts: ", ".join(f"{p} ({ratio[p]:.2f}x)" for p in parts) or "none"
  slower = sorted((p for p in ratio if ratio[p] > 1.1), key=ratio.get, reverse=True)
  faster = sorted((p for p in ratio if ratio[p] < 0.9), key=ratio.get)
  return [f"- XLA takes longer than PyTorch on: {fmt(slower)}; less on: {fmt(faster)} "
          "(XLA's time over torch's).",
          "- Attention: XLA has no fused attention kernel on the CPU -- it writes the "
          "(B, H, L, L) logits, then runs the softmax's max, exponent, sum and division "
          "and the transposes around the two matmuls as separate passes over memory, "
          "where torch's `scaled_dot_product_attention` runs one fused (flash) kernel; "
          "the hand-written einsums (`attention=\"manual\"`) are no faster (the "
          "operations table). LayerNorm: XLA splits each of its two reductions into "
          "partial sums and a final one, several passes where torch makes one.",
          "- The matmuls run at about torch's speed once YNNPACK is off (Eigen; with "
          "YNNPACK, XLA's defaults, the whole forward is the slower row `baseline (XLA "
          "defaults)` in the first table), and XLA's fused GELU and element-wise work "
          "beat torch's separate kernels: that is where the parity comes from."]


def _settings(settings) -> str:
  if not settings:
    return "none"
  return ", ".join(f"`{cpu.xla_flag(k, v)}`" for k, v in settings.items())


def targets(rows) -> list:
  """Each baseline / ToMe row against its peer, met or missed, from the JSON."""
  out = []
  by = {(r["model"], r["batch"], r["method"]): r for r in rows}
  for row in rows:
    if row["method"] in ("baseline", "tome") and "vs_peer" in row:
      ok = row["vs_peer"] >= 1.0
      peer = by[(row["model"], row["batch"], row["peer"])]
      # The spread of the two rows, as a share of their medians: a ratio closer to
      # 1 than that is a tie, whichever side of 1 it falls.
      spread = max(row["iqr_ms"] / row["ms_per_batch"], peer["iqr_ms"] / peer["ms_per_batch"])
      tie = (f"; within noise, the IQR is up to {100 * spread:.0f}% of the medians: a tie"
             if abs(row["vs_peer"] - 1) < spread else "")
      out.append(f"- {row['model']} {row['method']} at batch {row['batch']}: "
                 f"{row['vs_peer']:.2f}x {row['peer']} ({'met' if ok else 'MISSED'}{tie}).")
  return out or ["- not measured: this run had no PyTorch peer."]


if __name__ == "__main__":
  main()
