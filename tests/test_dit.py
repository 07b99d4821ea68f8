"""The diffusion transformer (mame_jax.models.dit), DDPM / DDIM (mame_jax.diffusion),
PSNR / SSIM (mame_jax.eval.quality) and the digits script (benchmarks/dit_digits.py);
docs/design.md, §3 Static shapes, §4 Placement (eqs. 17-18)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mame_jax import MergeConfig, diffusion
from mame_jax.eval import quality
from mame_jax.eval.data import load_digits
from mame_jax.models import dit
from mame_jax.models.dit_blocks import GenerationStack
from mame_jax.models.merging import merge_records
from mame_jax.tome_sd import ToMeSDConfig
from tests import reference as ref

SIZE = 16  # 16 x 16 digits, 4 x 4 patches: 16 tokens


def tiny(**kw):
  return dit.DiT(image_size=SIZE, patch_size=4, width=32, depth=2, num_heads=2,
                 frequency_dim=32, **kw)


@pytest.fixture(scope="module")
def digits():
  images, labels = load_digits(SIZE)
  return images, labels


@pytest.fixture(scope="module")
def params():
  """Random weights, perturbed so that adaLN-Zero's zero layers are not zero (an
  untrained DiT is the identity in every block and predicts 0)."""
  p = dit.init(tiny())
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def batch(digits, n=4):
  images, labels = digits
  return jnp.asarray(images[:n]), jnp.full((n,), 500), jnp.asarray(labels[:n])


def test_dit_with_tau_at_least_one_is_the_plain_dit(digits, params):
  x, t, y = batch(digits)
  plain, _ = tiny().apply({"params": params}, x, t, y)
  assert plain.shape == x.shape and np.abs(np.asarray(plain)).max() > 0
  off, aux = tiny(merge=MergeConfig(tau=1.0, layers=(0, 1))).apply({"params": params}, x, t, y)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
  assert merge_records(aux) == [{}, {}]
  none, _ = tiny(merge=ToMeSDConfig(ratio=0.0)).apply({"params": params}, x, t, y)
  np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))
  # ... and a tau that merges changes the prediction, at full length.
  on, aux = tiny(merge=MergeConfig(tau=0.5, layers=(0, 1))).apply({"params": params}, x, t, y)
  assert int(np.asarray(aux["tokens_per_block"]).min()) < 16, "tokens merged"
  assert on.shape == x.shape and not np.allclose(np.asarray(on), np.asarray(plain), atol=1e-4)


def test_adaln_blocks_keep_padding_invisible():
  rng = np.random.default_rng(0)
  x = ref.clustered_tokens(rng, 2, 10, 32).astype(np.float32)    # merging has work to do
  cond = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  stack = GenerationStack(depth=2, num_heads=2, mlp_dim=64, adaln=True,
                          merge=MergeConfig(tau=0.5, layers=(0, 1)))
  p = stack.init(jax.random.key(0), jnp.asarray(x), None, True, cond)["params"]
  p = jax.tree.map(lambda a: a + 0.1, p)                    # non-zero modulation
  pad_at, keep = [2, 5, 11], [i for i in range(13) if i not in (2, 5, 11)]
  xp = np.full((2, 13, 32), 7.0, np.float32)
  xp[:, keep] = x
  mask = np.zeros((2, 13), bool)
  mask[:, keep] = True
  want, aux = stack.apply({"params": p}, jnp.asarray(x), None, True, cond)
  assert int(np.asarray(aux["tokens_per_block"]).min()) < 10, "tokens merged"
  got, _ = stack.apply({"params": p}, jnp.asarray(xp), jnp.asarray(mask), True, cond)
  np.testing.assert_allclose(np.asarray(got)[:, keep], np.asarray(want), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got)[:, pad_at], 7.0)
  with pytest.raises(ValueError, match="cond"):
    stack.apply({"params": p}, jnp.asarray(x))


def test_ddim_sampling_is_deterministic_and_exact_mode_equals_full_capacity(params):
  schedule = diffusion.linear_schedule()
  labels = jnp.arange(4) % 10
  base = diffusion.make_sampler(tiny(), schedule, steps=3)
  noise = diffusion.initial_noise(tiny(), jax.random.key(0), 4)
  a, _ = base(params, noise, labels)
  b, _ = base(params, diffusion.initial_noise(tiny(), jax.random.key(0), 4), labels)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))       # same key, same samples
  c, _ = base(params, diffusion.initial_noise(tiny(), jax.random.key(1), 4), labels)
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert np.abs(np.asarray(a)).max() <= 1 + 1e-5                      # clipped x0 at t = 0

  cfg = MergeConfig(tau=0.2, layers=(0, 1), bucket_step=2)
  merged = tiny(merge=cfg)
  full, full_stats = diffusion.make_sampler(merged, schedule, steps=3)(params, noise, labels)
  programs = {}  # one sampler per capacity schedule, reused by the second run
  exact, stats, caps, _ = diffusion.sample_exact(merged, params, noise, labels, schedule,
                                                 steps=3, programs=programs)
  again, _, caps2, _ = diffusion.sample_exact(merged, params, noise, labels, schedule, steps=3,
                                              programs=programs)
  np.testing.assert_array_equal(np.asarray(exact), np.asarray(again))
  assert caps == caps2 and all(c < 8 for c in caps), "tighter than the full capacity N = 8"
  assert not np.asarray(stats["overflow"]).any() and int(np.asarray(stats["dropped"]).sum()) == 0
  np.testing.assert_allclose(np.asarray(exact), np.asarray(full), atol=1e-4)
  assert float(np.asarray(full_stats["tokens"]).mean()) < 16
  with pytest.raises(ValueError, match="steps"):
    diffusion.make_sampler(tiny(), schedule, steps=0)


def test_gradients_through_mame_and_mare_in_a_training_step_are_finite(digits, params):
  x, _, y = batch(digits, 8)
  cfg = MergeConfig(tau=0.5, layers=(0, 1), mode="fixed", capacities=(2, 2))
  model = tiny(merge=cfg)
  tx = optax.adam(1e-3)
  step = diffusion.make_train_step(model, tx, diffusion.linear_schedule())
  new, _, metrics = step(params, tx.init(params), x, y, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["grad_norm"]) > 0
  assert float(np.asarray(metrics["tokens"]).max()) <= 8 + 2, "attention ran on merged tokens"
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new, params)
  assert all(np.isfinite(v) for v in jax.tree.leaves(moved))
  assert moved["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"][
      "kernel"] > 0, "gradients reached attention through MaMe + MaRe"


def test_a_few_training_steps_on_digits_lower_the_loss(digits):
  images, labels = digits
  model = tiny()
  p0 = dit.init(model)
  schedule = diffusion.linear_schedule()
  x0, y0 = jnp.asarray(images[:64]), jnp.asarray(labels[:64])

  def held_out_loss(p):  # fixed timesteps and noise: comparable before and after
    return float(diffusion.loss_fn(model, p, x0, y0, jax.random.key(7), schedule, 0.0)[0])

  before = held_out_loss(p0)
  np.testing.assert_allclose(before, 1.0, atol=0.1)   # adaLN-Zero: predicts 0, loss = E eps^2
  p1, losses = diffusion.train(model, p0, images, labels, steps=40, batch_size=32)
  assert len(losses) == 40 and np.isfinite(losses).all()
  assert held_out_loss(p1) < 0.7 * before


def test_psnr_and_ssim():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, size=(3, 16, 16, 1))
  assert np.isinf(quality.psnr(a, a)).all()
  np.testing.assert_allclose(quality.ssim(a, a), 1.0)
  assert quality.summary(a, a) == {"psnr": float("inf"), "ssim": 1.0}
  small, large = a + 0.01 * rng.normal(size=a.shape), a + 0.2 * rng.normal(size=a.shape)
  mse = ((small - a) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(quality.psnr(small, a), 10 * np.log10(4 / mse), rtol=1e-6)
  assert (quality.psnr(large, a) < quality.psnr(small, a)).all()
  assert (quality.ssim(large, a) < quality.ssim(small, a)).all()
  assert quality.ssim(large, a).max() < 1
  with pytest.raises(ValueError, match="same shape"):
    quality.psnr(a, a[:2])


def test_save_and_load_round_trip(tmp_path, digits, params):
  model = tiny()
  path = tmp_path / "dit.npz"
  dit.save(path, model, params, {"steps": 3})
  loaded, lparams, extra = dit.load(path, merge=MergeConfig(tau=1.0, layers=(0,)))
  assert loaded.config() == model.config() and extra == {"steps": 3}
  x, t, y = batch(digits)
  np.testing.assert_array_equal(np.asarray(loaded.apply({"params": lparams}, x, t, y)[0]),
                                np.asarray(model.apply({"params": params}, x, t, y)[0]))
  with np.load(path, allow_pickle=False) as f:                       # nothing pickled
    assert "meta/config" in f.files
  bad = tmp_path / "bad.npz"
  flat = dict(np.load(path, allow_pickle=False))
  flat["head/kernel"] = np.zeros((3, 3), np.float32)
  np.savez(bad, **flat)
  with pytest.raises(ValueError, match="bad.npz.*head/kernel"):
    dit.load(bad)
  with pytest.raises(ValueError, match="images"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1))


def test_digits_script_runs_and_renders_its_section(tmp_path, params):
  from benchmarks import dit_digits
  ckpt = tmp_path / "dit.npz"
  dit.save(ckpt, tiny(), params)
  out = tmp_path / "run.json"
  result = dit_digits.main(["--checkpoint", str(ckpt), "--image-size", str(SIZE),
                            "--samples", "4", "--ddim-steps", "2", "--taus", "0.2",
                            "--ratios", "0.5", "--rounds", "1", "--bucket-step", "4",
                            "--out", str(tmp_path / "figs"), "--json", str(out)])
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"baseline", "mame_mare", "tome_sd"}
  assert rows["baseline"]["psnr"] == float("inf") and rows["baseline"]["ssim"] == 1.0
  for name in ("mame_mare", "tome_sd"):
    assert np.isfinite(rows[name]["psnr"]) and rows[name]["ssim"] < 1
    assert rows[name]["tokens_real"] < 16
  assert (tmp_path / "figs" / "samples.png").stat().st_size > 0
  text = "\n".join(dit_digits.section(out))
  assert json.loads(out.read_text())["command"] in text and "mame_mare" in text


def test_the_script_reads_a_tfds_image_dataset():
  # ``--data tfds:NAME[:SPLIT]``: any prepared image dataset, here tfds' mock data.
  import tensorflow_datasets as tfds
  from benchmarks import dit_digits
  with tfds.testing.mock_data(num_examples=6):
    images, labels = dit_digits.load_images("tfds:imagenette:validation", 16, 1, 10, limit=4)
  assert images.shape == (4, 16, 16, 1) and images.dtype == np.float32
  assert -1 <= images.min() < images.max() <= 1
  assert labels.shape == (4,) and ((labels >= 0) & (labels < 10)).all()
