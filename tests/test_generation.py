"""MaMe + MaRe for generation (eqs. 17-18) and ToMe-SD, the baseline:
mame_jax.generation, mame_jax.restore.copy_back, mame_jax.tome_sd,
mame_jax.models.dit_blocks (docs/design.md, §2 MaRe, §3 Static shapes, §4 Placement)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mame_jax import MergeConfig, mame, mame_mare
from mame_jax import generation, tome_sd
from mame_jax.models import vit
from mame_jax.models.dit_blocks import GenerationStack
from mame_jax.models.merging import merge_records
from tests import reference as ref

enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64


def softmax_attend(t, mask):
  """A parameter-free self-attention that ignores masked keys: (B, L, D) -> (B, L, D)."""
  logits = jnp.einsum("bqd,bkd->bqk", t, t) / math.sqrt(t.shape[-1])
  logits = jnp.where(mask[:, None, :], logits, -1e30)
  return jax.nn.softmax(logits, axis=-1) @ t


def identity_attend(t, mask):
  del mask
  return t


def tokens(seed, batch=2, length=16, dim=8, dtype=np.float32):
  return jnp.asarray(ref.clustered_tokens(np.random.default_rng(seed), batch, length, dim),
                     dtype)


# ----------------------------------------------------------------------------
# mame_mare


def test_tau_at_least_one_returns_attend_exactly():
  x = tokens(0)
  want = softmax_attend(x, jnp.ones(x.shape[:2], bool))
  for tau in (1.0, 1.5):
    np.testing.assert_array_equal(np.asarray(mame_mare(softmax_attend, x, tau)), want)
  # Under jit: the same program as the jitted mixer (eager and jitted XLA round apart).
  jitted = jax.jit(lambda x: mame_mare(softmax_attend, x, 1.0, capacity=0))
  want_jit = jax.jit(lambda x: softmax_attend(x, jnp.ones(x.shape[:2], bool)))(x)
  np.testing.assert_array_equal(np.asarray(jitted(x)), np.asarray(want_jit))
  # A traced tau cannot be skipped: the merge runs, merges nothing, and MaRe puts
  # the reordered tokens back, so only rounding differs.
  traced = jax.jit(lambda x, t: mame_mare(softmax_attend, x, t, capacity=8))(x, 1.0)
  np.testing.assert_allclose(np.asarray(traced), want, atol=1e-6)


@pytest.mark.parametrize("num_special", [0, 1])
def test_identity_attend_is_mare_of_mame_transcription(num_special):
  x = ref.clustered_tokens(np.random.default_rng(3 + num_special), 3, 17, 5)
  with enable_x64(True):
    out, info = mame_mare(identity_attend, jnp.asarray(x), 0.6, num_special=num_special,
                          return_info=True)
    y, _ = mame(jnp.asarray(x), 0.6, num_special=num_special)
    out, y = np.asarray(out), np.asarray(y)
  assert 0 < int(info.num_preserved) < 8, "some sources merged, some were preserved"
  outputs, records, _ = ref.mame(x, 0.6, num_special)
  for b in range(3):
    want = ref.mare(outputs[b], records[b], num_special, 17)   # eqs. (11)-(13)
    np.testing.assert_allclose(out[b], want, atol=1e-10)
  # Mass: per sample the restored tokens sum to the merged ones (docs/design.md, §2).
  np.testing.assert_allclose(out.sum(1), y.sum(1), atol=1e-10)
  assert not np.allclose(out, x), "MaRe(MaMe(x)) is not x once tokens merged"


def test_copy_restore_gives_every_token_a_whole_output():
  rng = np.random.default_rng(5)
  x = ref.clustered_tokens(rng, 2, 20, 6)
  proj = rng.normal(size=(6, 4))

  def mixer(t, mask):
    del mask
    return jnp.tanh(t @ proj)

  with enable_x64(True):
    got, info = mame_mare(mixer, jnp.asarray(x), 0.55, restore="copy", return_info=True)
    y, _ = mame(jnp.asarray(x), 0.55)
    z = np.asarray(mixer(y, None))
    got = np.asarray(got)
    const = np.asarray(mame_mare(lambda t, m: jnp.ones(t.shape[:2] + (3,)), jnp.asarray(x),
                                 0.55, restore="copy"))
  outputs, records, _ = ref.mame(x, 0.55)
  single = 0
  for b, r in enumerate(records):
    m, wf, keep = len(r["dst"]), r["wf"], r["keep"]
    want = np.zeros((20, 4))
    for i, p in enumerate(r["dst"]):
      want[p] = z[b, i]                         # a destination keeps its own output
    k = 0
    for j, p in enumerate(r["src"]):
      if keep[j]:
        want[p] = z[b, m + k]                   # a preserved source keeps its own
        k += 1
      else:                                     # a merged source: its destinations'
        col = wf[:, j]
        want[p] = col @ z[b, :m] / col.sum()
        single += int((col > 0).sum() == 1)
        if (col > 0).sum() == 1:                # ... an exact copy of the one left
          np.testing.assert_allclose(got[b, p], z[b, np.argmax(col)], atol=1e-12)
    np.testing.assert_allclose(got[b], want, atol=1e-10)
  assert single > 0 and not keep.all()
  np.testing.assert_allclose(const, 1.0, atol=1e-12)  # copies do not split a constant


def test_jit_with_static_capacity_equals_eager_exact():
  x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 24, 8)), jnp.float32)
  eager, info = mame_mare(softmax_attend, x, 0.2, return_info=True)
  r = int(info.num_preserved)
  assert 0 < r < 12
  for c in (r, 12):
    out, cinfo = jax.jit(lambda x, c=c: mame_mare(softmax_attend, x, 0.2, capacity=c,
                                                  return_info=True))(x)
    assert not bool(cinfo.overflow)
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-6)
  _, small = jax.jit(lambda x: mame_mare(softmax_attend, x, 0.2, capacity=r - 1,
                                         return_info=True))(x)
  assert bool(small.overflow) and int(small.dropped.max()) == 1
  with pytest.raises(ValueError, match="capacity"):
    jax.jit(lambda x: mame_mare(softmax_attend, x, 0.5))(x)


def test_gradients_through_mame_and_mare_are_finite():
  x = tokens(8)

  def loss(x, tau, restore):
    return jnp.sum(mame_mare(softmax_attend, x, tau, capacity=8, restore=restore) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  for restore in ("mare", "copy"):
    gx, gtau = grad(x, 0.5, restore)
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(float(gtau))
    assert np.abs(np.asarray(gx)).sum() > 0 and float(gtau) != 0.0


def test_bad_arguments_are_named():
  x = tokens(9)
  with pytest.raises(ValueError, match="restore"):
    mame_mare(softmax_attend, x, 0.5, restore="nearest")
  with pytest.raises(ValueError, match="attend must return"):
    mame_mare(lambda t, m: t[:, :3], x, 0.5)
  with pytest.raises(TypeError, match="attend"):
    mame_mare(None, x, 0.5)


# ----------------------------------------------------------------------------
# ToMe-SD against a transcription of its rules


def ref_tome_sd(x, h, w, sx, sy, r, choice):
  """ToMe-SD's bipartite_soft_matching_random2d + merge, one sample at a time:
  returns (merged (B, L - r, D), slot (B, L) of every input token)."""
  b_size, length, _ = x.shape
  dst = sorted((i * sy + choice[i, j] // sx) * w + j * sx + choice[i, j] % sx
               for i in range(h // sy) for j in range(w // sx))
  src = [p for p in range(length) if p not in dst]
  r = min(r, len(src))
  merged_out, slots = [], []
  for b in range(b_size):
    sim = np.array([[ref.cosine(x[b, s], x[b, d]) for d in dst] for s in src])
    best, best_dst = sim.max(1), sim.argmax(1)
    order = sorted(range(len(src)), key=lambda j: (-best[j], j))
    merged, kept = order[:r], sorted(order[r:])
    slot = np.zeros(length, int)
    rows = []
    for k, j in enumerate(kept):
      slot[src[j]] = k
      rows.append(x[b, src[j]])
    for k, d in enumerate(dst):
      group = [d] + [src[j] for j in merged if best_dst[j] == k]
      slot[group] = len(kept) + k
      rows.append(x[b, group].mean(0))
    merged_out.append(np.stack(rows))
    slots.append(slot)
  return np.stack(merged_out), np.stack(slots)


@pytest.mark.parametrize("h, w, sx, sy, ratio, random", [
    (4, 4, 2, 2, 0.5, True), (5, 6, 2, 2, 0.5, False), (6, 6, 3, 2, 0.3, True),
    (4, 4, 2, 2, 1.0, False)])
def test_tome_sd_matches_transcription_of_its_rules(h, w, sx, sy, ratio, random):
  x = ref.clustered_tokens(np.random.default_rng(h * w + sx), 2, h * w, 6)
  key = jax.random.key(h + w) if random else None
  choice = np.asarray(jax.random.randint(key, (h // sy, w // sx), 0, sx * sy)
                      if random else np.zeros((h // sy, w // sx), int))
  r = int(h * w * ratio)
  with enable_x64(True):
    record = tome_sd.bipartite_soft_matching_random2d(jnp.asarray(x), h, w, r=r, sx=sx,
                                                      sy=sy, key=key)
    merged = np.asarray(tome_sd.merge(record, jnp.asarray(x)))
    z = jnp.asarray(np.random.default_rng(0).normal(size=merged.shape[:2] + (3,)))
    restored = np.asarray(tome_sd.unmerge(record, z))
  want, slot = ref_tome_sd(x, h, w, sx, sy, r, choice)
  num_dst = (h // sy) * (w // sx)
  assert record.r == min(r, h * w - num_dst)                  # merge ratio, clipped
  assert merged.shape == (2, h * w - record.r, 6)
  np.testing.assert_array_equal(np.asarray(record.source), slot)
  np.testing.assert_allclose(merged, want, atol=1e-12)
  for b in range(2):                                          # unmerge by copy
    np.testing.assert_array_equal(restored[b], np.asarray(z)[b, slot[b]])
  if random:
    assert sorted(np.asarray(record.dst_pos)) != sorted(
        ((i * sy) * w + j * sx) for i in range(h // sy) for j in range(w // sx)), \
        "the key moved some destinations off the top-left corners"


def test_tome_sd_around_a_mixer_keeps_the_length():
  x = tokens(11, length=16)
  out, record = tome_sd.tome_sd(softmax_attend, x, 4, 4, ratio=0.5,
                                key=jax.random.key(0), return_record=True)
  assert out.shape == x.shape and record.num_out == 8
  y = tome_sd.merge(record, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(tome_sd.unmerge(
      record, softmax_attend(y, jnp.ones(y.shape[:2], bool)))), atol=1e-6)
  jitted = jax.jit(lambda x, k: tome_sd.tome_sd(softmax_attend, x, 4, 4, key=k))
  np.testing.assert_allclose(np.asarray(jitted(x, jax.random.key(0))), np.asarray(out),
                             atol=1e-6)
  with pytest.raises(ValueError, match="h \\* w"):
    tome_sd.tome_sd(softmax_attend, x, 4, 5)


# ----------------------------------------------------------------------------
# The generation block and stack


def stack(merge=None, **kw):
  return GenerationStack(depth=2, num_heads=2, mlp_dim=64, merge=merge, **kw)


@pytest.fixture(scope="module")
def params():
  x = tokens(12, length=16, dim=32)
  return stack().init(jax.random.key(0), x)["params"]


def test_block_with_tau_at_least_one_is_the_plain_block(params):
  x = tokens(13, length=16, dim=32)
  plain, _ = stack().apply({"params": params}, x)
  off, aux = stack(MergeConfig(tau=1.0, layers=(0, 1))).apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
  assert merge_records(aux) == [{}, {}]
  # The plain generation block is the ViT block without a merge: same weights, same values.
  block = vit.Encoder1DBlock(num_heads=2, mlp_dim=64)
  want, *_ = block.apply({"params": params["encoderblock_0"]}, x)
  got, _ = stack().apply({"params": params}, x)
  one, _ = GenerationStack(depth=1, num_heads=2, mlp_dim=64).apply(
      {"params": {"encoderblock_0": params["encoderblock_0"]}}, x)
  np.testing.assert_allclose(np.asarray(one), np.asarray(want), atol=1e-6)
  assert got.shape == x.shape


def test_block_merges_and_restores_with_mare_and_copy(params):
  x = tokens(14, length=16, dim=32)
  plain, _ = stack().apply({"params": params}, x)
  cfg = MergeConfig(tau=0.3, layers=(0, 1))
  for restore in ("mare", "copy"):
    out, aux = stack(cfg, restore=restore).apply({"params": params}, x)
    info = merge_records(aux)[0]["info"]
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    assert int(aux["tokens_per_block"][0, 0]) < 16, "attention ran on fewer tokens"
    assert not np.allclose(np.asarray(out), np.asarray(plain), atol=1e-3)
    assert int(info.num_preserved) <= 8
  with pytest.raises(ValueError, match="metric"):
    stack(MergeConfig(tau=0.3, layers=(0,), metric="keys")).apply({"params": params}, x)


def test_padding_is_invisible_through_the_blocks(params):
  x = np.asarray(tokens(15, batch=2, length=12, dim=32))
  pad_at = [3, 7, 8, 13]
  keep = [p for p in range(16) if p not in pad_at]
  xp = np.zeros((2, 16, 32), np.float32)
  xp[:, keep] = x
  xp[:, pad_at] = 5.0                                     # garbage in the padding
  mask = np.zeros((2, 16), bool)
  mask[:, keep] = True
  cfg = MergeConfig(tau=0.2, layers=(0, 1))
  want, aux = stack(cfg).apply({"params": params}, jnp.asarray(x))
  assert int(merge_records(aux)[0]["info"].num_preserved) < 6, "tokens merged"
  got, _ = stack(cfg).apply({"params": params}, jnp.asarray(xp), jnp.asarray(mask))
  got = np.asarray(got)
  np.testing.assert_allclose(got[:, keep], np.asarray(want), atol=2e-5)
  np.testing.assert_array_equal(got[:, pad_at], 5.0)      # padding passes through


def test_exact_mode_grows_capacities_and_equals_full_capacity(params):
  x = tokens(16, batch=2, length=16, dim=32)
  cfg = MergeConfig(tau=0.3, layers=(0, 1), bucket_step=2)
  full, _ = stack(cfg).apply({"params": params}, x)      # capacities None: N = 8
  programs = {}

  def step(caps):
    if caps not in programs:
      model = stack(cfg.replace(capacities=caps))
      programs[caps] = jax.jit(lambda p, x: (lambda o, a: (o, generation.summary(
          model.merge, a)))(*model.apply({"params": p}, x)))
    return programs[caps](params, x)

  out, stats, caps = generation.run_exact(step, cfg, 16, capacities=(0, 0))
  assert not np.asarray(stats["overflow"]).any() and len(programs) >= 2, "it grew"
  assert all(c in generation.layer_buckets(cfg, 16) for c in caps)
  assert all(c >= n for c, n in zip(caps, np.asarray(stats["num_preserved"])))
  # Equal up to float32 rounding (jit against eager, other padding lengths).
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-4, rtol=1e-4)
  # Fixed mode: the capacities as given, dropped tokens counted.
  _, fixed = step((0, 0))
  assert np.asarray(fixed["overflow"]).any() and np.asarray(fixed["dropped"]).sum() > 0
  assert generation.initial_capacities(cfg, 16) == (4, 4)
  # One token short in one layer: one more program, that layer grown to exactly its
  # need (buckets of one token).
  fine = cfg.replace(bucket_step=1)
  need = tuple(int(n) for n in np.asarray(stats["num_preserved"]))
  for layer in range(2):
    short = tuple(n - (i == layer) for i, n in enumerate(need))
    before = len(programs)
    _, _, caps = generation.run_exact(step, fine, 16, capacities=short)
    assert caps == need and len(programs) <= before + 2 and short in programs


def test_tome_sd_in_the_stack(params):
  x = tokens(17, length=16, dim=32)
  out, aux = stack(tome_sd.ToMeSDConfig(ratio=0.5)).apply({"params": params}, x)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_block"]), 8)
  none, _ = stack(tome_sd.ToMeSDConfig(ratio=0.0)).apply({"params": params}, x)
  plain, _ = stack().apply({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))
  with pytest.raises(ValueError, match="grid"):
    stack(tome_sd.ToMeSDConfig()).apply({"params": params}, tokens(1, length=12, dim=32))
