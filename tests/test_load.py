"""The one model-loading path, mame_jax.models.load.load_model: files, URLs served by a
local HTTP server, known names, random variants, and downloads that fail or are corrupt.
Nothing here touches the network: every URL is 127.0.0.1 or file://."""

import functools
import hashlib
import http.server
import threading
import types

import jax.numpy as jnp
import numpy as np
import pytest

import mame_jax as mj
from mame_jax.models import checkpoints, load
from mame_jax.vis import pictures

SIZE = 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
  """Every test starts offline-safe: the cache in tmp_path, MAME_JAX_OFFLINE unset."""
  monkeypatch.setenv(load.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(load.OFFLINE_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny():
  return load.random_vit(SIZE, depth=1, width=32)


@pytest.fixture
def served(tmp_path, tiny):
  """A local HTTP server on 127.0.0.1 serving ``tmp_path / "www"``, holding
  ``tiny.npz`` (the tiny model in the old AugReg layout). Yields ``(base URL,
  served folder, sha256 of tiny.npz)``."""
  root = tmp_path / "www"
  root.mkdir()
  checkpoints.save_npz(tiny[1], root / "tiny.npz", layout="old")
  digest = hashlib.sha256((root / "tiny.npz").read_bytes()).hexdigest()

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
      pass

  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", root, digest
  finally:
    server.shutdown()
    server.server_close()


def same_params(a, b):
  np.testing.assert_allclose(np.asarray(a["embedding"]["kernel"]),
                             np.asarray(b["embedding"]["kernel"]))
  np.testing.assert_allclose(np.asarray(a["cls"]), np.asarray(b["cls"]))


def test_a_file_loads_with_its_merge_config(tmp_path, tiny):
  path = tmp_path / "tiny.npz"
  checkpoints.save_npz(tiny[1], path)
  cfg = mj.MergeConfig(tau=0.5, layers=(0,))
  model, params = load.load_model(path, merge=cfg)
  assert model.merge == cfg and model.depth == 1 and model.width == 32
  same_params(params, tiny[1])
  also, _ = mj.load_model(str(path), merge=cfg)        # the package's entry point
  assert also == model


def test_a_url_is_downloaded_once_into_the_cache(tmp_path, served, tiny):
  base, root, _ = served
  url = f"{base}/tiny.npz"
  model, params = load.load_model(url)
  assert model.depth == 1
  same_params(params, tiny[1])
  cached = tmp_path / "cache" / load.cache_name(url)
  assert cached.exists() and list((tmp_path / "cache").iterdir()) == [cached]
  (root / "tiny.npz").unlink()                         # the cache is read next time
  _, again = load.load_model(url)
  same_params(again, tiny[1])


def test_a_file_url_is_copied_into_the_cache_dir(tmp_path, tiny):
  src = tmp_path / "src.npz"
  checkpoints.save_npz(tiny[1], src)
  path = load.fetch(src.as_uri(), cache_dir=tmp_path / "elsewhere")
  assert path.parent == tmp_path / "elsewhere" and path.name.endswith("-src.npz")
  assert path.read_bytes() == src.read_bytes()
  assert load.fetch(src) == src                        # a plain path stays as it is


def test_a_known_name_is_checked_against_its_sha256(monkeypatch, tmp_path, served, tiny):
  base, _, digest = served
  monkeypatch.setitem(load.KNOWN, "tiny", load.Known(f"{base}/tiny.npz", digest, "a test"))
  model, params = load.load_model("tiny", image_size=48)
  assert model.depth == 1 and params["pos_embedding"].shape == (1, 9, 32)   # resampled
  assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_corrupt_download_fails_clearly_and_leaves_nothing(monkeypatch, tmp_path, served):
  base, _, digest = served
  wrong = "0" * 64
  monkeypatch.setitem(load.KNOWN, "tiny", load.Known(f"{base}/tiny.npz", wrong, "a test"))
  with pytest.raises(load.ChecksumError) as info:
    load.load_model("tiny")
  message = str(info.value)
  assert f"{base}/tiny.npz" in message and wrong in message and "SHA256" in message
  assert "nothing was kept" in message
  cache = tmp_path / "cache"
  assert not cache.exists() or list(cache.iterdir()) == []


def test_an_unreachable_url_is_a_download_error_naming_it(tmp_path):
  url = "http://127.0.0.1:9/x.npz"                     # the discard port: refused
  with pytest.raises(load.DownloadError, match="could not download http://127.0.0.1:9/x.npz"):
    load.load_model(url, timeout=2)
  cache = tmp_path / "cache"
  assert not cache.exists() or list(cache.iterdir()) == []


def test_gs_urls_are_read_through_their_https_mirror(monkeypatch, tmp_path):
  import pooch
  seen = {}

  def retrieve(url, known_hash, fname, path, downloader, progressbar):
    seen.update(url=url, fname=fname)
    (path / fname).write_bytes(b"x")
    return str(path / fname)

  monkeypatch.setattr(pooch, "retrieve", retrieve)
  path = load.download("gs://vit_models/augreg/S_16.npz", cache_dir=tmp_path)
  assert seen["url"] == "https://storage.googleapis.com/vit_models/augreg/S_16.npz"
  assert path.name == seen["fname"] == load.cache_name("gs://vit_models/augreg/S_16.npz")


def test_known_names_are_public_urls():
  for name, known in load.KNOWN.items():
    assert load.is_url(known.url) and known.url.startswith(("https://", "gs://")), name
    assert known.sha256 is None or len(known.sha256) == 64, name
  assert {"augreg_b16", "augreg_s16", "deit_s", "deit_b"} <= set(load.KNOWN)
  assert "S_16-i21k" in load.KNOWN["augreg_s16"].url


def test_a_random_variant_is_a_class_token_vit_of_that_size():
  model, params = load.load_model(variant="Ti/16", num_classes=10, image_size=SIZE,
                                  dtype="bfloat16", seed=3)
  assert (model.width, model.depth, model.num_heads) == (192, 12, 3)
  assert model.pool_type == "tok" and model.has_class_token
  assert model.dtype_mm == "bfloat16"
  assert params["head"]["kernel"].shape == (192, 10)
  assert params["pos_embedding"].shape == (1, 4, 192)
  assert params["cls"].dtype == jnp.float32
  _, same = load.load_model(variant="Ti/16", num_classes=10, image_size=SIZE, seed=3)
  same_params(params, same)


def test_missing_or_wrong_arguments_say_what_was_expected(tmp_path):
  with pytest.raises(ValueError, match="pass a checkpoint .* or a variant"):
    load.load_model()
  with pytest.raises(FileNotFoundError, match="no_such.npz.*augreg_b16"):
    load.load_model(str(tmp_path / "no_such.npz"))
  with pytest.raises(ValueError, match="dtype must be one of"):
    load.load_model(variant="Ti/16", dtype="int8")


def test_tome_r_is_matched_through_the_clip():
  # 196 patches and a class token; ToMe clips r to half of the non-special tokens.
  assert pictures.tome_token_counts(197, 24, 8)[-1] == 15          # 24 x 7, then only 14
  fake = types.SimpleNamespace(soft=np.zeros((1, 196, 1)), num_tokens=np.array([4, 4]))
  maps = [fake] * 8
  r = pictures.matched_tome_r(maps, range(8))
  final = pictures.tome_token_counts(197, r, 8)[-1]
  assert abs(final - 4) == min(abs(pictures.tome_token_counts(197, q, 8)[-1] - 4)
                               for q in range(198))
  assert final <= 5
