"""Attention implementations (manual, dot_product_attention, folded bias) and bf16.

Every implementation must give the hand-written attention's values and gradients to
float32 rounding, with padding masks (any layout, or key lengths for a prefix) and
ToMe's per-key bias; bf16 inference must stay near float32. No GPU needed: cuDNN is
only named here, never run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax.eval.data import PHOTOS, load_image
from mame_jax.models import vit
from mame_jax.models.load import random_vit

B, Q, L, H, HD = 2, 5, 7, 3, 16


def qkv_inputs(seed=0):
  """``q (B, Q, H, hd)``, ``k, v (B, L, H, hd)``, a non-prefix mask and a prefix
  mask ``(B, L)``, and a ``log(size)`` bias ``(B, L)``."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, Q, H, HD)).astype(np.float32)
  k, v = (rng.normal(size=(B, L, H, HD)).astype(np.float32) for _ in range(2))
  holes = np.ones((B, L), bool)
  holes[0, [1, 4]] = False
  holes[1, [0, 5, 6]] = False
  prefix = np.arange(L)[None, :] < np.array([[5], [3]])
  bias = np.log(rng.integers(1, 6, size=(B, L))).astype(np.float32)
  return q, k, v, holes, prefix, bias


VARIANTS = {
    "xla": dict(implementation="xla"),
    "auto": dict(implementation="auto"),
    "fold": dict(implementation="xla", bias_mode="fold"),
    "auto-fold": dict(implementation="auto", bias_mode="fold"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("mask_kind", ["none", "holes", "prefix"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_attention_matches_manual_values_and_gradients(name, mask_kind, with_bias):
  q, k, v, holes, prefix, bias = qkv_inputs()
  mask = {"none": None, "holes": holes, "prefix": prefix}[mask_kind]
  bias = bias if with_bias else None
  kw = dict(VARIANTS[name], mask_is_prefix=mask_kind == "prefix")

  def loss(fn, q, k, v, bias):
    y = fn(q, k, v, mask, bias)
    return jnp.sum(jnp.sin(y)), y  # a non-linear read-out: every output matters

  manual = lambda q, k, v, m, b: vit.manual_attention(q, k, v, m, b)
  fused = lambda q, k, v, m, b: vit.fused_attention(q, k, v, m, b, **kw)
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  (_, want), g_want = jax.value_and_grad(loss, argnums=[a + 1 for a in argnums],
                                         has_aux=True)(manual, q, k, v, bias)
  (_, got), g_got = jax.value_and_grad(loss, argnums=[a + 1 for a in argnums],
                                       has_aux=True)(fused, q, k, v, bias)
  assert got.shape == (B, Q, H, HD)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_fold_key_bias_is_one_more_head_column_padded_to_the_multiple():
  q, k, v, _, _, bias = qkv_inputs()
  scale = 1 / np.sqrt(HD)
  for multiple, width in ((1, HD + 1), (8, HD + 8)):
    q2, k2, v2 = vit.fold_key_bias(q, k, v, bias, scale, multiple)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == width
    np.testing.assert_array_equal(q2[..., HD], 1)
    np.testing.assert_array_equal(v2[..., HD:], 0)
    logits = scale * np.einsum("bqhd,bkhd->bhqk", q2, k2)
    want = scale * np.einsum("bqhd,bkhd->bhqk", q, k) + bias[:, None, None, :]
    np.testing.assert_allclose(logits, want, atol=1e-5)


def test_fully_masked_rows_stay_finite_in_every_implementation():
  q, k, v, _, _, bias = qkv_inputs()
  none = np.zeros((B, L), bool)
  for kw in VARIANTS.values():
    for prefix in (False, True):
      y = vit.fused_attention(q, k, v, none, bias, mask_is_prefix=prefix, **kw)
      assert np.isfinite(np.asarray(y)).all()


def test_module_options_are_checked():
  attn = vit.MultiHeadDotProductAttention(num_heads=2, implementation="flash")
  x = jnp.ones((1, 3, 8))
  with pytest.raises(ValueError, match="attention must be one of"):
    attn.init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="attention_mask must be one of"):
    _ = vit.Model(10, attention_mask="holes").mask_is_prefix


def test_auto_uses_key_lengths_only_for_merges_that_keep_real_tokens_first():
  model = vit.Model(10, variant="Ti/16")
  assert not model.mask_is_prefix
  assert model.clone(merge=mj.MergeConfig()).mask_is_prefix
  assert model.clone(merge=mj.ToMeConfig()).mask_is_prefix
  assert not model.clone(merge=lambda *a, **k: a).mask_is_prefix
  assert model.clone(attention_mask="lengths").mask_is_prefix
  assert not model.clone(merge=mj.MergeConfig(), attention_mask="mask").mask_is_prefix


@pytest.fixture(scope="module")
def photos_model():
  """A 4-block random ViT (width 128, 2 heads of 64) at 64 px and 4 photographs."""
  model, params = random_vit(64, depth=4, width=128)
  x = np.stack([load_image(n, 64) for n in PHOTOS[:4]])
  return model, params, x


@pytest.mark.parametrize("merge", [None, "mame", "tome"])
def test_model_logits_agree_across_attention_implementations(photos_model, merge):
  model, params, x = photos_model
  cfg = {None: None, "mame": mj.MergeConfig(tau=0.6, layers=(0, 1), capacities=(16, 16),
                                              mode="fixed"),
         "tome": mj.ToMeConfig(r=4)}[merge]
  model = model.clone(merge=cfg)
  apply = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x))(params, x)
  want, aux_want = apply(model.clone(attention="manual"))
  for kw in (dict(attention="auto"), dict(attention="xla", attention_bias="fold"),
             dict(attention="xla", attention_mask="mask")):
    got, aux = apply(model.clone(**kw))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(aux["tokens_per_block"], aux_want["tokens_per_block"])


# bf16 inference on photographs: relative to the largest float32 logit. Random
# weights at this depth give logits of order 1; bf16 keeps ~3 significant digits
# per operation, so a few percent over 4 blocks is the expected size of the error.
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("merge", [None, "mame", "tome"])
def test_bfloat16_inference_stays_close_to_float32_on_photographs(photos_model, merge):
  model, params, x = photos_model
  cfg = {None: None, "mame": mj.MergeConfig(tau=0.6, layers=(0, 1), capacities=(16, 16),
                                              mode="fixed"),
         "tome": mj.ToMeConfig(r=4)}[merge]
  model = model.clone(merge=cfg)
  y32, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  m16 = model.clone(dtype="bfloat16", dtype_mm="bfloat16")
  p16 = vit.cast_params(params, "bfloat16")
  assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  y16, aux16 = jax.jit(lambda p, x: m16.apply({"params": p}, x))(p16, x)
  assert aux16["block01"]["+mlp"].dtype == jnp.bfloat16  # the residual stream
  assert y16.dtype == jnp.float32
  err = np.abs(np.asarray(y16) - np.asarray(y32)).max() / np.abs(np.asarray(y32)).max()
  assert err < BF16_TOLERANCE, err
  # The same top-1 on most photographs (random logits sit close together).
  agree = np.mean(np.argmax(y16, -1) == np.argmax(y32, -1))
  assert agree >= 0.5, agree
