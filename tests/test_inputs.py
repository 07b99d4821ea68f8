"""Bad images at the model's door (mame_jax.models.inputs): clear errors before tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax.eval import calibrate as cal
from mame_jax.models import checkpoints
from mame_jax.models.inputs import check_images

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)


@pytest.fixture(scope="module")
def tiny():
  """A model whose learned position embeddings are for 32 px images (4x4 patches)."""
  model = mj.Model(10, pool_type="tok", head_zeroinit=False, **TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return model, params


def images(size=32, n=2, dtype=np.float32):
  h, w = (size, size) if np.ndim(size) == 0 else size
  x = np.random.default_rng(0).uniform(-1, 1, (n, h, w, 3))
  return x.astype(dtype)


@pytest.mark.parametrize("merge", [None, mj.MergeConfig(tau=0.5, layers=(0,))])
def test_wrong_image_size_names_the_loaded_size_and_the_fix(tiny, merge):
  model, params = tiny
  runner = mj.Runner(model.clone(merge=merge), params)
  with pytest.raises(ValueError, match=r"images are 24x24 px but the model was loaded for "
                     r"32x32 px images .*4x4 grid of 8x8 px patches.*image_size=24.*"
                     r"resamples the position embeddings"):
    runner(images(24))
  with pytest.raises(ValueError, match=r"images are 32x48 px .*image_size=\(32, 48\)"):
    runner(images((32, 48)))
  assert runner.num_programs == 0  # nothing was traced
  runner(images(32))
  runner(images(36))  # 36 px still makes 4x4 patches (the conv drops the rest)


def test_the_suggested_fix_works(tiny, tmp_path):
  model, params = tiny
  checkpoints.save_npz(params, tmp_path / "tiny.npz")
  model24, params24 = mj.load_model(tmp_path / "tiny.npz", image_size=24)
  out, _ = mj.Runner(model24, params24)(images(24))
  assert out.shape == (2, 10) and np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="loaded for 24x24 px"):
    mj.Runner(model24, params24)(images(32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_integer_images_are_refused_with_the_conversion(tiny, dtype):
  model, params = tiny
  with pytest.raises(ValueError, match=r"images must be float values in \[-1, 1\]; got dtype "
                     + np.dtype(dtype).name):
    mj.Runner(model, params)(images(dtype=dtype))
  if dtype == np.uint8:
    with pytest.raises(ValueError, match=r"/ 127\.5 - 1"):
      mj.Runner(model, params)(images(dtype=dtype))


@pytest.mark.parametrize("shape,match", [
    ((32, 32, 3), r"shape \(B, H, W, 3\); got shape \(32, 32, 3\) \(one image\? .*images\[None\]"),
    ((2, 3, 32, 32), r"3 colour channels.*channels first\? .*transpose\(0, 2, 3, 1\)"),
    ((2, 32, 32, 4), r"3 colour channels, last: shape \(B, H, W, 3\); got shape \(2, 32, 32, 4\)"),
    ((2, 32 * 32 * 3), r"shape \(B, H, W, 3\); got shape \(2, 3072\)$"),
    ((2, 4, 32, 3), r"smaller than one 8x8 px patch"),
])
def test_wrong_rank_or_channels(tiny, shape, match):
  model, params = tiny
  with pytest.raises(ValueError, match=match):
    mj.Runner(model, params)(np.zeros(shape, np.float32))


def test_image_size_spec_and_sincos_models():
  model = mj.Model(10, posemb="sincos2d", pool_type="gap", **TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  out, _ = mj.Runner(model, params)(images(48))  # sin-cos: any size
  assert out.shape == (2, 10)
  check_images(model, None, images(48))
  check_images(model, 32, images(32))
  check_images(model, (32, 48), images((32, 48)))
  with pytest.raises(ValueError, match="loaded for 32x32 px"):
    check_images(model, 32, images(48))
  with pytest.raises(ValueError, match="float values"):
    check_images(model, None, images(dtype=np.uint8))


def test_calibration_checks_its_batches(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="images must be float values"):
    cal.calibrate(model, params, [images(dtype=np.uint8)], target_speedup=1.1,
                  merge_layers=(0,))
  with pytest.raises(ValueError, match="loaded for 32x32 px"):
    cal.calibrate(model, params, [images(40)], target_speedup=1.1, merge_layers=(0,))
