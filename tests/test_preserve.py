"""Each image its own merge: ``preserve="sample"``.

With the paper's batch-wide rule a source preserved in any image is preserved in
every image, so what one image keeps depends on its batch mates. With
``preserve="sample"`` every image keeps only its own preserved sources (eqs. 1-10
applied to it alone): its real tokens, logits and token counts equal its batch
of one. Checked against the float64 transcription run image by image, and
through the ViT on a batch mixing smooth and busy images.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.merge import mame, num_sources
from mame_jax.eval.runner import Runner
from mame_jax.models import merging, vit
from mame_jax.models.load import random_params
from tests import reference as ref


def _padded(x, lengths, ns):
  mask = np.zeros(x.shape[:2], bool)
  for b, n in enumerate(lengths):
    mask[b, :n] = True
  mask[:, :ns] = True
  return np.where(mask[..., None], x, 0).astype(np.float32), mask


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("jitted", [False, True])
def test_sample_rule_matches_per_sample_transcription(padding, jitted):
  rng = np.random.default_rng(0)
  x = ref.clustered_tokens(rng, 4, 23, 6)
  lengths = [23, 17, 20, 12] if padding else [23] * 4
  x, mask = _padded(x, lengths, 1)
  want, records, m = ref.mame(x, 0.6, num_special=1, mask=mask if padding else None,
                              preserve="sample")
  assert m is None
  n = num_sources(23, 1)
  call = lambda a: mame(a, 0.6, num_special=1, capacity=n,  # noqa: E731
                             token_mask=jnp.asarray(mask) if padding else None,
                             preserve="sample")
  y, info = (jax.jit(call) if jitted else call)(jnp.asarray(x))
  assert info.preserved.shape == (4, n)
  kept = np.asarray(info.token_mask).sum(1)
  for b in range(4):
    np.testing.assert_allclose(np.asarray(y[b, :kept[b]]), want[b], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(info.preserved[b, :len(records[b]["src"])]),
                                  records[b]["keep"])
  # The counts differ between images (the batch rule would make them equal).
  assert len(set(kept.tolist())) > 1
  assert int(info.num_preserved) == max(int(r["keep"].sum()) for r in records)


def test_sample_rule_is_the_batch_of_one():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(1), 3, 19, 5), jnp.float32)
  y, info = mame(x, 0.5, num_special=1, preserve="sample")
  kept = np.asarray(info.token_mask).sum(1)
  for b in range(3):
    alone, _ = mame(x[b:b + 1], 0.5, num_special=1)  # a batch of one: either rule
    np.testing.assert_allclose(np.asarray(y[b, :kept[b]]), np.asarray(alone[0]), atol=1e-6)
    assert not np.asarray(y[b, kept[b]:]).any()  # padding is zero


def test_gradients_finite_in_sample_mode():
  x = jnp.asarray(ref.clustered_tokens(np.random.default_rng(2), 2, 15, 4), jnp.float32)

  def loss(x, tau):
    y, _ = mame(x, tau, num_special=1, capacity=7, preserve="sample")
    return jnp.sum(y ** 2)
  gx, gtau = jax.grad(loss, argnums=(0, 1))(x, 0.5)
  assert np.isfinite(np.asarray(gx)).all() and np.isfinite(float(gtau))


def test_unknown_preserve_fails_clearly():
  x = jnp.ones((1, 5, 3))
  with pytest.raises(ValueError, match="preserve must be one of"):
    mame(x, 0.5, preserve="image")
  with pytest.raises(ValueError, match="MergeConfig.preserve"):
    merging.MergeConfig(preserve="image")


def _images():
  """Two smooth images (large flat areas: much to merge) and two busy ones."""
  rng = np.random.default_rng(3)
  coarse = rng.uniform(-1, 1, (2, 2, 2, 3))
  smooth = np.repeat(np.repeat(coarse, 16, 1), 16, 2) + rng.normal(0, 0.01, (2, 32, 32, 3))
  busy = rng.uniform(-1, 1, (2, 32, 32, 3))
  return np.concatenate([smooth[:1], busy[:1], smooth[1:], busy[1:]]).astype(np.float32)


def test_vit_batch_invariance():
  """Through the ViT in exact mode: every image's logits, token counts and merge
  records equal its batch of one, whatever its batch mates."""
  base = vit.Model(10, width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4,
                   pool_type="tok")
  params = random_params(base, 32)
  imgs = _images()
  outs = {}
  for rule in ("sample", "batch"):
    cfg = merging.MergeConfig(tau=0.5, layers=(0, 1, 2), preserve=rule, bucket_step=4)
    runner = Runner(base.clone(merge=cfg), params, records=True)
    logits, aux = runner(imgs)
    single = Runner(base.clone(merge=cfg), params, records=True)  # one program cache
    alone = [single(imgs[b:b + 1]) for b in range(4)]
    outs[rule] = (np.asarray(aux["tokens_per_block"]),
                  np.stack([np.asarray(a[1]["tokens_per_block"][0]) for a in alone]))
    if rule == "sample":
      for b, (lb, ab) in enumerate(alone):
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(lb[0]), atol=2e-5)
        info, info1 = aux["block00"]["merge"]["info"], ab["block00"]["merge"]["info"]
        n1 = info1.preserved.shape[-1]
        np.testing.assert_array_equal(np.asarray(info.preserved[b, :n1]),
                                      np.asarray(info1.preserved[0]))
  together, alone = outs["sample"]
  np.testing.assert_array_equal(together, alone)
  assert together[0, -1] < together[1, -1], "the smooth image keeps fewer tokens"
  # The batch-wide rule: the busy images' preserved sources stay in the smooth ones.
  together, alone = outs["batch"]
  assert (together[:, -1] > alone[:, -1]).any()


def test_preserve_reaches_the_commands():
  """``--config.merge.preserve=sample`` builds MaMe rows with the sample rule in
  eval and calibrate; a mistyped value is refused when the rows are built."""
  from mame_jax.cli import calibrate as calibrate_cli
  from mame_jax.cli import eval as eval_cli
  from mame_jax.eval import methods
  config = eval_cli.parse(["--config.merge.preserve=sample", "--config.merge.tau=(0.7,0.8)"])
  assert config.merge.preserve == "sample"
  assert calibrate_cli.parse(["--config.merge.preserve=sample"]).merge.preserve == "sample"
  model = vit.Model(10, width=32, depth=3, num_heads=2, patch_size=4)
  from mame_jax.configs import common
  rows = methods.build_methods(model, config.merge.tau,
                               mame_fields=common.mame_fields(config.merge))
  assert [m.merge.preserve for m in rows[1:]] == ["sample", "sample"]
  # The commands' default is what the real-backbone figures chose; the op's
  # and MergeConfig's stay the paper's.
  assert (eval_cli.parse([]).merge.preserve, eval_cli.parse([]).merge.execution) == \
      ("sample", "packed")
  assert merging.MergeConfig().preserve == "batch"
  with pytest.raises(ValueError, match="preserve"):
    methods.build_methods(model, (0.8,), mame_fields={"preserve": "image"})
