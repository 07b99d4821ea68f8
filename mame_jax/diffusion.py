"""DDPM training and deterministic DDIM sampling for an eps-predicting model
(``mame_jax.models.dit.DiT``).

* :class:`Schedule`: DDPM's linear betas (Ho et al. 2020: 1e-4 to 0.02 over 1000
  steps) and ``alpha_bar_t = prod_{s <= t} (1 - beta_s)``.
* :func:`make_train_step`: one jitted optax step on the DDPM loss
  ``|| eps - model(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t, y) ||^2``, ``t`` uniform,
  each label replaced by the null class with probability ``class_dropout`` (so
  the model also learns the unconditional prediction classifier-free guidance
  needs).
* :func:`make_sampler`: DDIM with ``eta = 0`` (Song et al. 2021), a fixed map
  from the starting noise to the image: ``x0^ = (x_t - sqrt(1 - ab_t) eps^) /
  sqrt(ab_t)`` (clipped to [-1, 1]), ``x_prev = sqrt(ab_prev) x0^ + sqrt(1 - ab_prev)
  eps^``. The whole loop is one jitted ``lax.scan`` over the timesteps, so the
  denoiser is compiled once per model and merge setting; the same noise (the
  same key) gives the same samples, which is what lets baseline, MaMe + MaRe
  and ToMe-SD be compared image by image.
* :func:`sample_exact`: MaMe + MaRe at bucketed capacities in exact mode
  (``generation.run_exact``, docs/design.md §3): one capacity per merge layer,
  shared by every timestep, grown until no timestep drops a preserved token, so
  the samples equal those at full capacity.

MaMe's preservation mask is batch-wide (docs/design.md §1.4): the samples of a
batch (and, under guidance, its conditional and unconditional halves) influence
each other's merge, so compare methods on the same batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mame_jax import generation
from mame_jax.models.merging import MergeConfig


@dataclasses.dataclass(frozen=True)
class Schedule:
  """DDPM noise schedule: ``betas`` (T,) float64 and what follows from them."""

  betas: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """``alpha_bar_t`` (T,), decreasing from ``1 - beta_0`` towards 0."""
    return np.cumprod(1.0 - np.asarray(self.betas, np.float64))


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
  """DDPM's linear betas, scaled so that any ``num_steps`` reaches the same noise
  level as 1000 steps of 1e-4..0.02."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2; got {num_steps}")
  scale = 1000 / num_steps
  return Schedule(np.linspace(beta_start * scale, beta_end * scale, num_steps))


def q_sample(schedule: Schedule, x0, t, noise):
  """``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` for images (B, ...) and t (B,)."""
  ab = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
  ab = ab.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise


def loss_fn(model, params, x0, labels, rng, schedule: Schedule, class_dropout: float = 0.1):
  """The DDPM loss (mean squared error of the predicted noise) and its metrics."""
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_steps)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  drop = jax.random.uniform(k_drop, (b,)) < class_dropout
  labels = jnp.where(drop, model.num_classes, labels)   # the null class
  eps, aux = model.apply({"params": params}, q_sample(schedule, x0, t, noise), t, labels)
  loss = jnp.mean((eps - noise) ** 2)
  return loss, {"loss": loss, "tokens": aux["tokens_per_block"].mean(0)}


def make_train_step(model, tx: optax.GradientTransformation, schedule: Schedule,
                    class_dropout: float = 0.1) -> Callable:
  """One jitted step: ``(params, opt_state, x0 (B, H, W, C), labels (B,), rng) ->
  (params, opt_state, metrics)``; metrics include ``grad_norm``."""

  @jax.jit
  def step(params, opt_state, x0, labels, rng):
    grads, metrics = jax.grad(
        lambda p: loss_fn(model, p, x0, labels, rng, schedule, class_dropout),
        has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def train(model, params, images, labels, *, steps: int, batch_size: int = 64,
          tx: Optional[optax.GradientTransformation] = None, schedule: Optional[Schedule] = None,
          class_dropout: float = 0.1, seed: int = 0, log_every: int = 0, log=print):
  """``steps`` steps on random batches of ``images`` (N, H, W, C) in [-1, 1] with
  ``labels`` (N,). ``tx`` defaults to Adam at 1e-3 after 50 warm-up steps, clipped
  at global norm 1. Returns ``(params, losses)`` (one float per step)."""
  schedule = schedule or linear_schedule()
  if tx is None:
    lr = optax.linear_schedule(0.0, 1e-3, min(50, max(1, steps // 10)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  step = make_train_step(model, tx, schedule, class_dropout)
  opt_state = tx.init(params)
  order = np.random.default_rng(seed)
  rng = jax.random.key(seed)
  losses = []
  for i in range(steps):
    idx = order.integers(0, len(images), batch_size)
    params, opt_state, metrics = step(params, opt_state, jnp.asarray(images[idx]),
                                      jnp.asarray(labels[idx]), jax.random.fold_in(rng, i))
    losses.append(float(metrics["loss"]))
    if log_every and (i + 1) % log_every == 0:
      log(f"step {i + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
  return params, losses


def ddim_timesteps(num_train: int, steps: int) -> np.ndarray:
  """``steps`` distinct timesteps from ``num_train - 1`` down to 0, evenly spaced."""
  if not 1 <= steps <= num_train:
    raise ValueError(f"steps must be in [1, {num_train}]; got {steps}")
  return np.round(np.linspace(num_train - 1, 0, steps)).astype(np.int32)


def initial_noise(model, key, batch: int) -> jax.Array:
  """The starting noise x_T (batch, H, W, C) from ``key``."""
  return jax.random.normal(key, (batch, model.image_size, model.image_size, model.channels))


def make_sampler(model, schedule: Schedule, *, steps: int = 20, guidance: float = 1.0,
                 clip: bool = True) -> Callable:
  """A jitted DDIM sampler ``(params, noise (B, H, W, C), labels (B,)) ->
  (images (B, H, W, C), stats)``.

  ``guidance`` != 1 is classifier-free guidance, ``eps_u + g (eps_c - eps_u)``,
  with the unconditional half on the null class (one forward of 2B). ``stats``:
  ``tokens`` (B, depth), the real tokens each block attended, averaged over the
  steps; and, for an active ``MergeConfig``, what exact mode reads
  (``generation.summary``), over all steps: ``num_preserved`` (the most any step
  needed), ``overflow`` (any step) and ``dropped`` (B or 2B under guidance, layers; summed).
  """
  ts = ddim_timesteps(schedule.num_steps, steps)
  ab = schedule.alphas_cumprod
  a_t = ab[ts]
  a_prev = np.concatenate([ab[ts[1:]], [1.0]])
  xs = (jnp.asarray(ts), jnp.asarray(a_t, jnp.float32), jnp.asarray(a_prev, jnp.float32))

  def denoise(params, x, t, labels):
    b = x.shape[0]
    tt = jnp.full((b,), t)
    if guidance == 1.0:
      eps, aux = model.apply({"params": params}, x, tt, labels)
      return eps, aux, aux["tokens_per_block"]
    null = jnp.full_like(labels, model.num_classes)
    eps, aux = model.apply({"params": params}, jnp.concatenate([x, x]),
                           jnp.concatenate([tt, tt]), jnp.concatenate([labels, null]))
    cond, uncond = eps[:b], eps[b:]
    return uncond + guidance * (cond - uncond), aux, aux["tokens_per_block"][:b]

  @jax.jit
  def sample(params, noise, labels):
    def body(x, inputs):
      t, at, ap = inputs
      eps, aux, tokens = denoise(params, x, t, labels)
      x0 = (x - jnp.sqrt(1 - at) * eps) / jnp.sqrt(at)
      if clip:
        x0 = jnp.clip(x0, -1, 1)
        eps = (x - jnp.sqrt(at) * x0) / jnp.sqrt(1 - at)  # the noise the clipped x0 implies
      x = jnp.sqrt(ap) * x0 + jnp.sqrt(1 - ap) * eps
      return x, (tokens, generation.summary(model.merge, aux))

    x, (tokens, counts) = jax.lax.scan(body, noise, xs)
    stats = {"tokens": tokens.astype(jnp.float32).mean(0)}
    if counts:
      stats.update(num_preserved=counts["num_preserved"].max(0),
                   overflow=counts["overflow"].any(0), dropped=counts["dropped"].sum(0))
    return x, stats

  return sample


def sample_exact(model, params, noise, labels, schedule: Schedule, *, steps: int = 20,
                 guidance: float = 1.0, programs: Optional[dict] = None):
  """DDIM with MaMe + MaRe in exact mode: ``model.merge`` an active ``MergeConfig``
  (``mode="exact"``); capacities grow from the smallest bucket until no step
  drops a preserved token. Returns ``(images, stats, capacities, sampler)``, the
  last the jitted program at those capacities (to time it). ``programs``: a dict
  caching one sampler per capacity schedule across calls."""
  cfg = model.merge
  if not isinstance(cfg, MergeConfig) or not cfg.active or cfg.mode != "exact":
    raise ValueError(f"sample_exact needs model.merge an active MergeConfig in exact mode; "
                     f"got {cfg!r}")
  programs = {} if programs is None else programs
  length = model.num_tokens

  def step(caps):
    if caps not in programs:
      programs[caps] = make_sampler(model.clone(merge=cfg.replace(capacities=caps)),
                                    schedule, steps=steps, guidance=guidance)
    out, stats = programs[caps](params, noise, labels)
    return (out, stats), jax.device_get(stats)

  first = generation.layer_buckets(cfg, length)[0]
  (images, stats), _, caps = generation.run_exact(step, cfg, length,
                                                  capacities=(first,) * len(cfg.layers))
  return images, stats, caps, programs[caps]


def pretrained_or_random(path=None, *, offline: Optional[bool] = None, steps: int = 30,
                         image_size: int = 16, seed: int = 0):
  """``(model, params, note)`` for the notebooks: the DiT saved at ``path``
  (``dit.save``, e.g. ``results/dit_digits/dit.npz`` of a clone) when it exists
  and ``offline`` is false (default: ``$MAME_JAX_OFFLINE=1`` means offline), else
  a tiny randomly initialised DiT (16 x 16 digits, width 32, depth 2) trained for
  ``steps`` steps on ``data.load_digits``, so that it runs in seconds on a CPU;
  ``note`` says which."""
  import os  # pylint: disable=import-outside-toplevel
  from mame_jax.eval.data import load_digits  # pylint: disable=import-outside-toplevel
  from mame_jax.models import dit, load  # pylint: disable=import-outside-toplevel
  offline = load.is_offline() if offline is None else offline
  if path is not None and not offline and os.path.exists(path):
    model, params, extra = dit.load(path)
    return model, params, (f"checkpoint {path}: DiT({model.config()}) trained "
                           f"{extra.get('steps', '?')} steps on {extra.get('data', '?')}")
  model = dit.DiT(image_size=image_size, patch_size=4, width=32, depth=2, num_heads=2,
                  frequency_dim=32)
  images, labels = load_digits(image_size)
  params, losses = train(model, dit.init(model, seed), images, labels, steps=steps,
                         batch_size=32, seed=seed)
  why = "offline" if offline else f"no checkpoint at {path}"
  return model, params, (f"{why}: a randomly initialised tiny DiT ({image_size} x "
                         f"{image_size} digits, width 32, depth 2) trained only {steps} steps "
                         f"(loss {losses[0]:.2f} -> {losses[-1]:.2f}): its samples are "
                         f"blobs, not digits")
