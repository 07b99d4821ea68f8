"""Specification of mame_jax.models.vit: parameter layout, attention, masking, merge hook."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax.models import vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
IMAGE = 32


def random_params(module, *args, seed=0):
  """Random float32 params for ``module`` called on ``args`` (shapes via eval_shape)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    a = rng.normal(0.0, 0.2, s.shape).astype(np.float32)
    return a + 1.0 if path[-1].key == "scale" else a  # LayerNorm scales near 1

  return jax.tree_util.tree_map_with_path(fill, shapes)


def images(n=2, size=IMAGE, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


# Tiny programs: XLA's backend optimisations would cost more time than they save.
_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@_jit
def run(model, params, x):
  return model.apply({"params": params}, x)


@_jit
def run_module(module, params, *args):
  return module.apply({"params": params}, *args)


@_jit
def attend(attn, params, q, kv, mask, bias):
  return attn.apply({"params": params}, q, kv, token_mask=mask, bias=bias)


TOK = vit.Model(10, **TINY, pool_type="tok")
GAP = vit.Model(10, **TINY, pool_type="gap", class_token=True, fc_norm=True)


def flat_shapes(tree):
  return {"/".join(str(p.key) for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_b16_has_the_published_parameter_count():
  model = vit.Model(1000, variant="B/16", pool_type="tok")
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  d, mlp, layers, patches = 768, 3072, 12, 196
  block = 4 * d + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  expected = (16 * 16 * 3 * d + d) + d + patches * d + layers * block + 2 * d + (d * 1000 + 1000)
  assert count == expected
  assert abs(count - 86.6e6) < 0.05e6  # timm's 86,567,656 minus its class-token posemb row


def test_variants_decode_like_big_vision():
  assert vit.decode_variant("S/16") == dict(
      width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16))
  assert vit.decode_variant("So400m/14")["mlp_dim"] == 4304
  assert vit.decode_variant("L")["depth"] == 24
  assert "patch_size" not in vit.decode_variant("H")
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit.decode_variant("Q/16")


def test_param_tree_is_big_vision_layout():
  model = vit.Model(10, **TINY, pool_type="map", rep_size=16, posemb="learn")
  shapes = flat_shapes(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"])
  blk = "Transformer/encoderblock_1/"
  attn = blk + "MultiHeadDotProductAttention_0/"
  assert shapes["embedding/kernel"] == (8, 8, 3, 32)
  assert shapes["pos_embedding"] == (1, 16, 32)  # no class slot
  assert "cls" not in shapes
  assert shapes[attn + "query/kernel"] == (32, 2, 16)
  assert shapes[attn + "value/bias"] == (2, 16)
  assert shapes[attn + "out/kernel"] == (2, 16, 32)
  assert shapes[blk + "MlpBlock_0/Dense_0/kernel"] == (32, 64)
  assert shapes[blk + "LayerNorm_1/scale"] == (32,)
  assert shapes["Transformer/encoder_norm/bias"] == (32,)
  assert shapes["MAPHead_0/probe"] == (1, 1, 32)
  assert shapes["MAPHead_0/MultiHeadDotProductAttention_0/key/kernel"] == (32, 2, 16)
  assert shapes["MAPHead_0/MlpBlock_0/Dense_1/kernel"] == (64, 32)
  assert shapes["pre_logits/kernel"] == (32, 16)
  assert shapes["head/kernel"] == (16, 10)
  tok = flat_shapes(jax.eval_shape(
      TOK.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"])
  assert tok["cls"] == (1, 1, 32)


def test_scan_matches_unscanned_blocks():
  model = TOK
  params = random_params(model, jnp.zeros((1, IMAGE, IMAGE, 3)))
  stacked = dict(params)
  blocks = [params["Transformer"][f"encoderblock_{i}"] for i in range(TINY["depth"])]
  stacked["Transformer"] = {
      "encoderblock": jax.tree.map(lambda *a: np.stack(a), *blocks),
      "encoder_norm": params["Transformer"]["encoder_norm"]}
  x = images()
  y, aux = run(model, params, x)
  y_scan, aux_scan = run(model.clone(scan=True), stacked, x)
  np.testing.assert_allclose(y_scan, y, atol=1e-5)
  np.testing.assert_array_equal(aux_scan["tokens_per_block"], aux["tokens_per_block"])
  np.testing.assert_allclose(aux_scan["block01"]["+sa"], aux["block01"]["+sa"], atol=1e-5)


def test_scan_refuses_a_merge():
  model = vit.Model(10, **TINY, scan=True, merge=DropLast(2))
  with pytest.raises(ValueError, match="scan=True cannot merge"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))


ATTN = vit.MultiHeadDotProductAttention(num_heads=2)


def attention_inputs():
  """Queries ``(2, 4, 32)``, keys/values ``(2, 5, 32)`` and the attention's params."""
  rng = np.random.default_rng(0)
  q, kv = (rng.normal(size=(2, n, 32)).astype(np.float32) for n in (4, 5))
  return q, kv, random_params(ATTN, q, kv)


def test_attention_returns_keys_averaged_over_heads_and_scales_queries():
  q_in, kv, p = attention_inputs()
  out, keys = attend(ATTN, p, q_in, kv, np.ones((2, 5), bool), np.zeros((2, 5), np.float32))
  proj = lambda x, name: np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj(q_in, "query"), proj(kv, "key"), proj(kv, "value")
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(16)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd,hdo->bqo", w, v, p["out"]["kernel"]) + p["out"]["bias"]
  assert keys.shape == (2, 5, 16)
  np.testing.assert_allclose(keys, k.mean(axis=2), atol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_attention_log_size_bias_equals_duplicated_tokens():
  # ToMe's proportional attention: a token of size 2 attends like two copies of it;
  # the fifth key is padding in one call and the copy in the other.
  q, kv, p = attention_inputs()
  dup = np.concatenate([kv[:, :4], kv[:, 2:3]], axis=1)
  ones = np.ones((2, 5), bool)
  mask = ones.copy()
  mask[:, 4] = False
  size = np.array([[1, 1, 2, 1, 1]] * 2, np.float32)
  out_dup, _ = attend(ATTN, p, q, dup, ones, np.zeros((2, 5), np.float32))
  out_bias, _ = attend(ATTN, p, q, kv, mask, np.log(size))
  np.testing.assert_allclose(out_bias, out_dup, atol=1e-5)


def test_fully_masked_attention_is_finite():
  q, kv, p = attention_inputs()
  out, _ = attend(ATTN, p, q, kv, np.zeros((2, 5), bool), np.zeros((2, 5), np.float32))
  assert np.isfinite(np.asarray(out)).all()


def padded(x, pad, seed=5):
  """Appends ``pad`` junk tokens to ``x (B, L, D)``; returns them and a mask."""
  junk = 10 * np.random.default_rng(seed).normal(size=(x.shape[0], pad, x.shape[2]))
  mask = np.concatenate([np.ones(x.shape[:2], bool), np.zeros((x.shape[0], pad), bool)], 1)
  return np.concatenate([x, junk.astype(x.dtype)], axis=1), mask


def test_padded_tokens_do_not_change_the_encoder():
  enc = vit.Encoder(depth=2, mlp_dim=64, num_heads=2)
  x = np.random.default_rng(0).normal(size=(2, 7, 32)).astype(np.float32)
  p = random_params(enc, x)
  y, _, _, aux = run_module(enc, p, x)
  xp, mask = padded(x, 3)
  yp, mask_out, _, aux_p = run_module(enc, p, xp, mask)
  assert np.isfinite(np.asarray(yp)).all()
  np.testing.assert_allclose(yp[:, :7], y, atol=1e-5)
  np.testing.assert_array_equal(mask_out, mask)
  np.testing.assert_array_equal(aux_p["tokens_per_block"], [[7, 7], [7, 7]])
  np.testing.assert_array_equal(aux["tokens_per_block"], [[7, 7], [7, 7]])


def test_padded_tokens_do_not_change_gap_and_map_pooling():
  x = np.random.default_rng(0).normal(size=(2, 7, 32)).astype(np.float32)
  xp, mask = padded(x, 3)
  np.testing.assert_allclose(vit.masked_mean(xp, mask), x.mean(axis=1), atol=1e-6)
  head = vit.MAPHead(mlp_dim=64, num_heads=2)
  p = random_params(head, x)
  np.testing.assert_allclose(run_module(head, p, xp, mask), run_module(head, p, x), atol=1e-5)


def test_pooling_reads_class_token_or_averages_the_others():
  x = images()
  _, aux = run(TOK, random_params(TOK, x), x)
  np.testing.assert_array_equal(aux["head_input"], aux["encoded"][:, 0])
  gap = GAP
  params = random_params(gap, x)
  assert "encoder_norm" not in params["Transformer"]
  _, aux = run(gap, params, x)
  assert aux["encoded"].shape[1] == 17  # class token + 4 x 4 patches
  mean = np.asarray(aux["encoded"][:, 1:]).mean(axis=1)
  normed = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
  expected = normed * params["fc_norm"]["scale"] + params["fc_norm"]["bias"]
  np.testing.assert_allclose(aux["head_input"], expected, atol=1e-4)
  np.testing.assert_array_equal(aux["tokens_per_block"], [[17, 17], [17, 17]])


@dataclasses.dataclass(frozen=True)
class DropLast:
  """Toy merge: after block 0's attention, remove the last ``n`` tokens."""
  n: int

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0):
    assert keys.shape == x.shape[:2] + (16,)  # (B, L, head_dim)
    if layer != 0:
      return x, token_mask, size, {}
    n = self.n
    return x[:, :-n], token_mask[:, :-n], size[:, :-n], {"dropped": jnp.full(x.shape[:1], n)}


@dataclasses.dataclass(frozen=True)
class MaskLast:
  """Toy merge: after block 0's attention, mark the last ``n`` tokens as padding."""
  n: int

  def __call__(self, x, token_mask, size, keys, *, layer, num_special=0):
    if layer != 0:
      return x, token_mask, size, {}
    return x, token_mask.at[:, -self.n:].set(False), size, {}


def test_merge_hook_may_shrink_or_pad_the_sequence_between_blocks():
  x = images()
  base = GAP
  params = random_params(base, x)
  y_drop, aux_drop = run(base.clone(merge=DropLast(5)), params, x)
  y_mask, aux_mask = run(base.clone(merge=MaskLast(5)), params, x)
  np.testing.assert_array_equal(aux_drop["tokens_per_block"], [[12, 12]] * 2)
  np.testing.assert_array_equal(aux_mask["tokens_per_block"], [[12, 12]] * 2)
  assert aux_drop["encoded"].shape[1] == 12 and aux_mask["encoded"].shape[1] == 17
  np.testing.assert_array_equal(aux_drop["block00"]["merge"]["dropped"], [5, 5])
  # Padding is invisible: masking the tokens is the same as removing them.
  np.testing.assert_allclose(y_mask, y_drop, atol=1e-5)
  np.testing.assert_allclose(aux_mask["encoded"][:, :12], aux_drop["encoded"], atol=1e-5)
  y_plain, aux_plain = run(base, params, x)
  assert "token_mask" not in aux_plain
  np.testing.assert_array_equal(aux_plain["tokens_per_block"], [[17, 17]] * 2)
  assert not np.allclose(y_plain, y_drop, atol=1e-3)


def test_resample_posemb_shape_and_identity():
  pe = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
  assert vit.resample_posemb(pe, 4) is pe
  assert vit.resample_posemb(pe, (6, 5)).shape == (1, 30, 8)
  assert vit.resample_posemb(pe, 2).shape == (1, 4, 8)
  const = np.ones((1, 16, 8), np.float32) * 0.3
  np.testing.assert_allclose(vit.resample_posemb(const, 7), 0.3, atol=1e-6)
  with pytest.raises(ValueError, match="square"):
    vit.resample_posemb(pe[:, :15], 4)


def test_sincos_posemb_layout():
  pe = np.asarray(vit.posemb_sincos_2d(3, 4, 16))
  assert pe.shape == (1, 12, 16)
  np.testing.assert_allclose(pe[0, 0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  # token 6 is (y=1, x=2); the first channel of each quarter has frequency f = 1.
  np.testing.assert_allclose(pe[0, 6, [0, 4, 8, 12]],
                             [np.sin(2), np.cos(2), np.sin(1), np.cos(1)], rtol=1e-6)


def test_bfloat16_matmuls_stay_close_to_float32():
  x = images()
  model = TOK
  params = random_params(model, x)
  y32, _ = run(model, params, x)
  y16, aux16 = run(model.clone(dtype_mm="bfloat16"), params, x)
  assert aux16["block00"]["sa"].dtype == jnp.bfloat16
  assert y16.dtype == jnp.float32 and aux16["encoded"].dtype == jnp.float32
  shapes = jax.eval_shape(model.clone(dtype_mm="bfloat16").init, jax.random.key(0), x)
  assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
  err = np.abs(np.asarray(y16) - np.asarray(y32)).max() / np.abs(np.asarray(y32)).max()
  assert err < 0.05
