"""train.py: a ViT learns with MaMe in the loop (fixed mode)."""

import jax
import jax.numpy as jnp
import numpy as np

import train
from mame_jax import MergeConfig
from mame_jax.eval import data
from mame_jax.models import vit


def test_loss_falls_with_the_merge_in_the_loop_and_drops_are_counted():
  photos = jnp.asarray(np.stack([data.load_image(n, 32) for n in data.PHOTOS[:4]]))
  labels = jnp.arange(4)
  merge = MergeConfig(tau=0.5, layers=(1,), mode="fixed", capacities=(0,))
  model = vit.Model(4, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                    pool_type="tok", head_zeroinit=False, merge=merge)
  params = jax.jit(model.init)(jax.random.key(0), photos[:1])["params"]
  _, history = train.train(model, params, [(photos, labels)], steps=30, learning_rate=3e-3,
                           log=None)
  losses = [float(h["loss"]) for h in history]
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_array_equal(history[0]["tokens"], [17, 9])  # 2:1 in block 1: 1 + 8 + 0
  assert all(int(h["dropped"]) >= 0 for h in history)
  assert any(int(h["dropped"]) > 0 for h in history), "capacity 0 drops preserved tokens"
