"""Specification of zero-shot classification from the command line (``mame-jax eval``
with ``config.zeroshot``): a two-tower .npz and a SentencePiece model written here, a
folder of class folders, rows for baseline / MaMe / ToMe merging in the image tower whose
top-1 equals an independent ``ZeroShot.classify`` on the same batches; the ImageNet
class names / CLIP templates shipped as data; the Table 3 configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

import mame_jax
from mame_jax import cli, tokenizers
from mame_jax.cli import eval as eval_cli
from mame_jax.cli import flags
from mame_jax.configs import common
from mame_jax.eval import data, imagenet_classes, zeroshot
from mame_jax.eval.runner import Runner
from mame_jax.models import load, merging, siglip, text, two_towers, vit
from tests.test_tokenizers import train_spm
from tests.test_two_towers import random_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, LENGTH, VOCAB = 32, 12, 48  # 16 patches of 8 px; the SentencePiece model's 48 ids
CLASSES = ("bird", "car", "cat", "dog", "tree")  # folder names, sorted = label order
TEMPLATES = ("a photo of a {}.", "a bad picture of the {}.")
BATCH = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny SigLIP two-tower .npz (MAP-pooled image tower, no class token), a
  T5-layout SentencePiece model, a templates file and the 14 skimage photographs
  in 5 class folders named by words of the tokeniser's vocabulary."""
  root = tmp_path_factory.mktemp("zs")
  img = vit.Model(None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8),
                  pool_type="map", class_token=False)
  txt = text.Model(32, width=32, depth=2, mlp_dim=48, num_heads=4, vocab_size=VOCAB,
                   max_len=LENGTH, normalize=False)
  model = two_towers.Model(img=img, txt=txt, bias_init=0.0)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, LENGTH), jnp.int32))["params"]
  params = random_tree(shapes, 0)
  params["t"] = np.asarray([np.log(10.0)], np.float32)
  params["b"] = np.asarray([-2.0], np.float32)
  siglip.save_npz(params, root / "siglip.npz")
  spm = train_spm(root, "t5", vocab_size=VOCAB, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
  photos = root / "photos"
  for i, name in enumerate(data.PHOTOS):
    image = Image.fromarray(data.to_rgb_uint8(getattr(skimage.data, name)()))
    image.thumbnail((64, 64))
    os.makedirs(photos / CLASSES[i % 5], exist_ok=True)
    image.save(photos / CLASSES[i % 5] / f"{i:02d}.png")
  return dict(ckpt=str(root / "siglip.npz"), spm=str(spm), photos=str(photos),
              templates=str(root / "templates.txt"), root=root)


def argv(files, *more):
  return ["--checkpoint", files["ckpt"], "--data", files["photos"],
          f"--config.zeroshot.tokenizer={files['spm']}", "--config.zeroshot.classes=data",
          f"--config.zeroshot.templates={files['templates']}",
          f"--config.zeroshot.length={LENGTH}", "--merge-layers", "0-1",
          "--batch-size", str(BATCH), "--runs", "1", "--warmup", "0", "--no-progress", *more]


@pytest.fixture(scope="module")
def cli_run(files):
  out = files["root"] / "zs.json"
  assert eval_cli.cli_main(argv(files, "--tau", "0.5", "1.0", "--tome-r", "2",
                                "--json", str(out))) == 0
  return json.loads(out.read_text())


def classifier(files):
  """One ``ZeroShot`` for the module: one compiled text tower, cached class embeddings."""
  if "zs" not in files:
    model, params = mame_jax.load_model(files["ckpt"], tower="both")
    tok = tokenizers.Tokenizer(files["spm"], LENGTH, "siglip")
    files["zs"] = zeroshot.ZeroShot(model, params, tok, templates=TEMPLATES)
  return files["zs"]


def independent_predictions(files, merge):
  """argmax of ``ZeroShot.classify`` (its own Runner of the image tower with
  ``merge``) over the CLI's batches (same preprocessing, same padding)."""
  model, params = mame_jax.load_model(files["ckpt"], tower="both", merge=merge)
  assert model.img.merge == merge
  zs = classifier(files)
  zs.runner = Runner(model.img, params["img"])
  loader = data.Loader(data.load_source(files["photos"]), data.preprocess_fn("siglip", SIZE),
                       BATCH)
  preds, labels = [], []
  for batch in loader:
    p = np.asarray(jnp.argmax(zs.classify(batch.images, CLASSES), axis=-1))
    preds.append(p[batch.valid])
    labels.append(batch.labels[batch.valid])
  return np.concatenate(preds), np.concatenate(labels)


def test_rows_for_baseline_mame_and_tome_with_top1_of_an_independent_classifier(
    files, cli_run):
  rows = cli_run["rows"]
  assert [r["name"] for r in rows] == ["baseline", "MaMe(tau=0.5)", "MaMe(tau=1)", "ToMe(r=2)"]
  assert cli_run["num_images"] == 14 and cli_run["preprocess"] == "siglip"
  assert cli_run["image_size"] == SIZE
  configs = [None, merging.MergeConfig(tau=0.5, layers=(0, 1)),
             merging.MergeConfig(tau=1.0, layers=(0, 1)),
             merging.ToMeConfig.recipe("timm", r=2)]
  preds = []
  for row, merge in zip(rows, configs):
    pred, labels = independent_predictions(files, merge)
    assert row["top1"] == pytest.approx(100.0 * np.mean(pred == labels))
    preds.append(pred)
    for key in ("images_per_s", "gflops_per_image", "measured_speedup", "ideal_speedup"):
      assert row[key] > 0
    assert len(row["tokens_per_layer"]) == 2
  # No special token in a MAP-pooled tower: all 16 patches enter; ToMe takes 2 per block.
  assert rows[0]["tokens_per_layer"] == [16.0, 16.0]
  assert rows[3]["tokens_per_layer"] == [14.0, 12.0]
  assert rows[1]["mean_tokens_per_layer"] <= 16.0
  # tau >= 1: nothing is similar enough to merge -- the baseline's predictions.
  np.testing.assert_array_equal(preds[2], preds[0])
  assert rows[2]["top1"] == rows[0]["top1"]
  assert rows[2]["tokens_per_layer"] == [16.0, 16.0]


def test_timed_program_includes_the_class_embedding_product(files, cli_run):
  """The head (class logits, C=5) is part of each row's program: its GFLOPs exceed
  those of the image tower alone by about 2*B*E*C per batch."""
  model, params = mame_jax.load_model(files["ckpt"], tower="img")
  x = jnp.zeros((BATCH, SIZE, SIZE, 3))
  from mame_jax.eval import timing  # pylint: disable=import-outside-toplevel
  tower = timing.gflops(jax.jit(lambda p, x: model.apply({"params": p}, x)[0]), params,
                        x) / BATCH
  head = cli_run["rows"][0]["gflops_per_image"] - tower
  assert 2 * 32 * len(CLASSES) * 1e-9 <= head < 1e-3 * tower + 1e-5


def test_zero_shot_needs_a_two_tower_checkpoint(files, tmp_path, capsys):
  from mame_jax.models import checkpoints  # pylint: disable=import-outside-toplevel
  model = vit.Model(5, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
  p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  checkpoints.save_npz(p, tmp_path / "vit.npz")
  args = argv(files)
  args[1] = str(tmp_path / "vit.npz")
  assert eval_cli.cli_main(args) == 2
  assert "txt" in capsys.readouterr().err  # names the missing text tower
  assert eval_cli.cli_main(argv(files, "--config.zeroshot.classes=nope.txt")) == 2
  assert "zeroshot.classes 'nope.txt'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data


def test_imagenet_class_names_and_clip_templates():
  names = imagenet_classes.IMAGENET_CLASSES
  assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
  assert (names[0], names[1], names[207], names[999]) == (
      "tench", "goldfish", "Golden Retriever", "toilet paper")
  assert len(imagenet_classes.CLIP_TEMPLATES) == 80
  assert len(set(imagenet_classes.CLIP_TEMPLATES)) == 80
  assert all(t.count("{}") == 1 for t in imagenet_classes.BIG_VISION_TEMPLATES)
  assert imagenet_classes.BIG_VISION_TEMPLATES[-1] == "{}"
  assert zeroshot.class_names_from("imagenet") is names
  assert zeroshot.templates_from("clip") == imagenet_classes.CLIP_TEMPLATES


# -------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,taus,ckpt,tok,style", [
    ("siglip_b16_512", (0.8, 0.9), "siglip_b16_512", "siglip_tokenizer", "siglip"),
    ("siglip2_b16_512", (0.9, 0.95), "siglip2_b16_512", "gemma_tokenizer", "siglip2")])
def test_table3_configs_name_known_checkpoints_and_tokenizers(name, taus, ckpt, tok, style):
  path = os.path.join(REPO, "configs", f"{name}.py")
  config = flags.load_config_file(path)
  defaults = common.eval_config()
  defaults.lock()
  flags.merge_into(defaults, config, path)  # every field is one of eval's
  assert config.merge.tau == taus and config.merge.tome_r == (32,)
  assert merging.parse_layers(config.merge.layers) == tuple(range(8))
  assert (config.model.image_size, config.model.preprocess) == (512, "siglip")
  assert config.model.checkpoint == ckpt and config.zeroshot.tokenizer == tok
  assert config.zeroshot.style == style and config.zeroshot.length == 64
  for known in (ckpt, tok):
    assert load.KNOWN[known].url.startswith("gs://")
  doc = open(path).read()
  assert f"mame-jax eval --config configs/{name}.py" in doc and "Table 3" in doc
  small = flags.load_config_file(f"{path}:batch_size=4,tome_r=0,limit=10")
  assert (small.input.batch_size, small.merge.tome_r, small.input.limit) == (4, (), 10)


def test_calibrate_scores_the_zero_shot_classifier_at_the_calibrated_tau(files, cli_run):
  """``mame-jax calibrate`` with a zero-shot config: tau from the image tower's token
  counts; the held-out rows are zero-shot rows, as in ``mame-jax eval``."""
  out = files["root"] / "cal.json"
  args = argv(files, "--target-speedup", "1.1", "--calib-images", "8", "--tol", "0.01",
              "--calib-data", files["photos"], "--json", str(out))
  assert cli.main(["calibrate", *args]) == 0
  payload = json.loads(out.read_text())
  assert payload["met"] and payload["speedup"] >= 1.1 and -1 <= payload["tau"] < 1
  held = payload["heldout"]
  assert held["num_images"] == 14 and held["preprocess"] == "siglip"  # another source: all
  base, mame = held["rows"]
  assert (base["method"], mame["method"]) == ("baseline", "mame")
  # The zero-shot head is in the program (its FLOPs) and scores it: mame-jax eval's
  # baseline, whose top-1 the test above checks against an independent classifier.
  assert base["gflops_per_image"] == pytest.approx(cli_run["rows"][0]["gflops_per_image"])
  assert base["top1"] == cli_run["rows"][0]["top1"]
  assert mame["tau"] == pytest.approx(payload["tau"]) and mame["mean_tokens_per_layer"] < 16
  assert 0 <= mame["top1"] <= 100  # (XLA counts the merge too: a 2-block toy gains little)


def test_prompts_are_canonicalised_before_the_text_tower(files):
  """big_vision's evaluator lower-cases and strips punctuation from class names and
  templates (first alias only): the class embedding is that of the cleaned prompt."""
  zs = classifier(files)
  zs.templates = ("a photo of the {}",)  # what ("A photo of the {}!",) canonicalises to
  clean = zeroshot.ZeroShot(zs.model, zs.params, zs.tokenizer, templates=("A photo of the {}!",))
  assert clean.templates == zs.templates
  assert clean.prompts(["Red_Car, automobile", "Bird."]) == [
      "a photo of the red car", "a photo of the bird"]
  np.testing.assert_array_equal(zs.class_embeddings(["Red_Car, automobile", "Bird."]),
                                zs.class_embeddings(["red car", "bird"]))
  raw = zeroshot.ZeroShot(zs.model, zs.params, zs.tokenizer, templates=("A photo of the {}!",),
                          canonicalize=False)
  assert raw.prompts(["Red_Car, automobile"]) == ["A photo of the Red_Car, automobile!"]
  zs.templates = TEMPLATES
