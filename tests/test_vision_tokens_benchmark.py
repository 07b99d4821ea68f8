"""benchmarks/vision_tokens_throughput.py: the encoders it times are CLIP ViT-L/14
(224 and 336 px, LLaVA's penultimate layer) and SigLIP So400m/14 (224 px,
PaliGemma's last layer) -- checked by shape, never run at full size; a tiny run
writes rows with every field, hands the language model every patch at tau >= 1,
and its BENCHMARKS.md section says the command, device, date and the misses."""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

import mame_jax as mj
from benchmarks import vision_tokens_throughput as bench

RESULTS = (pathlib.Path(__file__).resolve().parent.parent / "results"
           / "vision_tokens_throughput.json")
FIELDS = ("model", "image_size", "batch", "method", "ms_per_batch", "images_per_s",
          "tokens_out", "patches_held", "gflops_per_image", "measured_speedup",
          "ideal_speedup", "compile_s")


def shapes(enc):
  """The full encoder (depth checked apart) and its parameter and vision-token
  shapes, traced (two of its blocks), not run."""
  full = bench.tower(enc)
  model = full.clone(depth=2)
  image = jax.ShapeDtypeStruct((1, enc.image_size, enc.image_size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
  out = jax.eval_shape(lambda p, x: mj.vision_tokens(model, p, x, layer=enc.layer,
                                                     norm=enc.norm), params, image)
  return full, params, out


@pytest.mark.parametrize("key,size,patches", [("clip_l14_224", 224, 256),
                                              ("clip_l14_336", 336, 576)])
def test_the_clip_encoders_are_vit_l14_in_clips_layout(key, size, patches):
  enc = bench.PRESETS["full"][key]
  assert (enc.image_size, enc.layer, enc.patches) == (size, -2, patches)  # LLaVA's layer
  model, params, (tokens, sizes, mask) = shapes(enc)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (1024, 24, 16, 4096)
  assert model.patch_size == (14, 14) and model.has_class_token
  assert model.pre_norm and model.activation == "quick_gelu" and model.ln_eps == 1e-5
  assert params["pos_embedding"].shape == (1, patches, 1024) and "pre_norm" in params
  assert tokens.shape == (1, patches, 1024) and sizes.shape == mask.shape == (1, patches)


def test_the_siglip_encoder_is_so400m14_without_its_head():
  enc = bench.PRESETS["full"]["so400m_224"]
  assert (enc.image_size, enc.layer, enc.norm, enc.patches) == (224, -1, True, 256)
  model, params, (tokens, _, _) = shapes(enc)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (1152, 27, 16, 4304)
  assert model.patch_size == (14, 14) and not model.has_class_token
  assert model.pool_type == "map" and not model.num_classes and "head" not in params
  assert tokens.shape == (1, 256, 1152)


def test_the_quick_preset_cuts_the_models_not_the_token_counts():
  for key, full in bench.PRESETS["full"].items():
    quick = bench.PRESETS["quick"][key]
    assert (quick.image_size, quick.patch, quick.layer, quick.patches) == (
        full.image_size, full.patch, full.layer, full.patches)
    assert (quick.width, quick.depth) == (full.width // 4, full.depth // 4)
    assert quick.width // quick.num_heads == full.width // full.num_heads
  assert "not the full-size" in bench.NOTES["quick"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("vt") / "vision_tokens_throughput.json"
  bench.main(["--preset", "tiny", "--encoders", "clip_l14_336", "so400m_224", "--batches",
              "1", "--runs", "1", "--warmup", "0", "--taus", "1.0", "--json", str(path)])
  return path, json.loads(path.read_text())


def test_a_tiny_run_writes_every_field(tiny_run):
  _, run = tiny_run
  assert run["preset"] == "tiny" and run["batches"] == [1] and "tiny" in run["note"]
  assert run["command"].startswith("python -m benchmarks.vision_tokens_throughput --preset")
  assert {(r["model"], r["image_size"]) for r in run["rows"]} == {
      ("CLIP ViT-L/14", 336), ("SigLIP So400m/14", 224)}
  for row in run["rows"]:
    assert all(f in row for f in FIELDS), sorted(set(FIELDS) - set(row))
    assert row["ms_per_batch"] > 0 and row["gflops_per_image"] > 0
  methods = [r["method"] for r in run["rows"]]
  assert methods.count("baseline") == methods.count("mame(1)") == 2
  # tau = 1 costs what the baseline does: ToMe's matching r is 0, one row for it.
  assert methods.count("tome(r=0)") == 2 and len(methods) == 6
  assert all(r["matches_tau"] == [1.0] for r in run["rows"] if r["method"] == "tome(r=0)")


def test_at_tau_one_the_language_model_reads_every_patch_and_no_class_token(tiny_run):
  _, run = tiny_run
  for row in run["rows"]:
    expected = {224: 256, 336: 576}[row["image_size"]]
    assert row["tokens_out"] == row["patches_held"] == row["patches"] == expected


def test_section_renders_the_run_and_its_misses(tiny_run):
  path, run = tiny_run
  text = "\n".join(bench.section(path))
  assert f"`{run['command']}`" in text and run["device"] in text and run["date"] in text
  assert text.count("| mame(1) ") == 2 and "| tome(r=0) " in text
  assert "batch 32: not measured" in text and "batch 1: not measured" not in text
  assert "full-size encoders" in text and "(tiny preset)" in text
  assert "not measured yet" in "\n".join(bench.section(path.parent / "none.json")).lower()


def test_section_says_when_mame_is_slower_than_tome_or_the_baseline(tmp_path):
  def row(method, ms, tokens_out=100.0, **kw):
    return dict(model="CLIP ViT-L/14", image_size=336, batch=1, method=method,
                ms_per_batch=ms, images_per_s=1e3 / ms, tokens_out=tokens_out, patches=576,
                gflops_per_image=10.0, measured_speedup=40.0 / ms, ideal_speedup=1.5, **kw)
  run = dict(command="python -m benchmarks.vision_tokens_throughput --quick",
             device="cpu: cpu x1 (2 cores), jax 0.10.2", platform="cpu", date="2026-12-01",
             dtype="float32", preset="full", note="the full-size encoders", batches=[1, 32],
             rows=[row("baseline", 40.0), row("mame(0.7)", 50.0, tokens_out=576.0, tau=0.7),
                   row("mame(0.8)", 30.0, tau=0.8), row("tome(r=9)", 25.0, matches_tau=[0.7, 0.8])])
  path = tmp_path / "run.json"
  path.write_text(json.dumps(run))
  text = "\n".join(bench.section(path))
  assert "| 0.7, 0.8 " in text
  assert "336 px batch 1 mame(0.7): slower than the baseline (0.80x)" in text
  assert "mame(0.8): 30.0 ms, slower than its GFLOPs-matched tome(r=9) (25.0 ms" in text
  assert "mame(0.7): merged nothing (576 tokens out of 576 patches)" in text
  assert "mame(0.8): merged nothing" not in text
  assert "not measured in this run" in text  # the GPU
  assert "preset)" not in text and "batch 32" not in text
  # At batch 1 the mask is the image's own: the note does not blame the batch.
  assert "At batch 1 no other of the photographs can keep a token" in text
  assert "batch-wide (docs" not in text


def test_section_blames_the_batch_wide_mask_only_at_a_batch(tmp_path):
  run = dict(command="python -m benchmarks.vision_tokens_throughput --quick",
             device="cpu: cpu x1 (2 cores), jax 0.10.2", platform="cpu", date="2026-12-01",
             dtype="float32", preset="full", note="the full-size encoders", batches=[1, 32],
             rows=[dict(model="CLIP ViT-L/14", image_size=336, batch=32, method=method,
                        ms_per_batch=ms, images_per_s=32e3 / ms, tokens_out=576.0, patches=576,
                        gflops_per_image=10.0, measured_speedup=40.0 / ms, ideal_speedup=1.0,
                        **kw)
                   for method, ms, kw in (("baseline", 40.0, {}),
                                          ("mame(0.7)", 40.0, dict(tau=0.7)))])
  path = tmp_path / "run.json"
  path.write_text(json.dumps(run))
  text = "\n".join(bench.section(path))
  assert ("batch 32 mame(0.7): merged nothing (576 tokens out of 576 patches). "
          "MaMe's preservation mask is batch-wide") in text
  assert "any of the batch's 32 photographs keeps it" in text and "At batch 1" not in text


def test_committed_results_render():
  run = json.loads(RESULTS.read_text())
  assert run["rows"][0]["method"] == "baseline" and 1 in run["batches"]
  assert all(all(f in r for f in FIELDS) for r in run["rows"])
  assert run["command"] in "\n".join(bench.section(RESULTS))
