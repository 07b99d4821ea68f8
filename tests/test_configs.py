"""The config system: ``--config FILE.py[:arg]``, ``--config.a.b=value`` and the
short flags, for ``mame-jax eval`` / ``calibrate`` / ``visualize`` and ``train.py``."""

import ast
import glob
import json
import os
import re

import ml_collections
import pytest

import train
from mame_jax import cli
from mame_jax.cli import calibrate as calibrate_cli
from mame_jax.cli import eval as eval_cli
from mame_jax.cli import flags
from mame_jax.cli import visualize as visualize_cli
from mame_jax.configs import common
from mame_jax.eval import loop
from mame_jax.models import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
PAPER_CONFIGS = [p for p in CONFIGS  # train.py: the training config, tested by test_train.py
                 if os.path.basename(p) not in ("__init__.py", "common.py", "train.py")]
TINY_ARCH = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)


def _error(capsys, argv, parse=eval_cli.parse) -> str:
  """The stderr of a command line that must be refused (argparse's exit 2)."""
  with pytest.raises(SystemExit) as e:
    parse(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


# ----------------------------------------------------------------------------
# The config argument: "key=value,..."


def test_config_arguments_keep_the_types_of_their_defaults():
  arg = common.parse_config_arg("batch_size=512,tau=1,dtype=bfloat16,fast", batch_size=256,
                                tau=0.8, dtype="float32", fast=False, limit=0)
  assert arg.batch_size == 512 and isinstance(arg.batch_size, int)
  assert arg.tau == 1.0 and isinstance(arg.tau, float)
  assert arg.dtype == "bfloat16" and arg.fast is True and arg.limit == 0
  assert common.parse_config_arg(None, a=1).a == 1
  assert common.parse_config_arg("flag=false", flag=True).flag is False


def test_config_arguments_refuse_unknown_keys_and_bad_values():
  with pytest.raises(ValueError, match="'nope' unknown"):
    common.parse_config_arg("nope=1", batch_size=256)
  with pytest.raises(ValueError, match="batch_size"):
    common.parse_config_arg("batch_size=big", batch_size=256)


def test_a_paper_config_takes_its_argument():
  config = load_file(os.path.join(REPO, "configs", "deit_s.py"),
                     "batch_size=64,tome_r=0,dtype=bfloat16,limit=100,tau=0.7")
  assert (config.input.batch_size, config.model.dtype) == (64, "bfloat16")
  assert config.merge.tome_r == () and config.merge.tau == (0.7,)
  assert config.input.limit == 100
  augreg = load_file(os.path.join(REPO, "configs", "augreg_b16.py"), "res=384")
  assert augreg.model.image_size == 384 and load.KNOWN[augreg.model.checkpoint].url.endswith("res_384.npz")
  with pytest.raises(ValueError, match="res must be one of"):
    load_file(os.path.join(REPO, "configs", "augreg_b16.py"), "res=100")


def load_file(path, arg=None):
  return flags.load_config_file(path if arg is None else f"{path}:{arg}")


# ----------------------------------------------------------------------------
# Every config in configs/


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_every_config_loads_with_and_without_an_argument_and_fits_its_commands(path):
  for spec in (path, f"{path}:batch_size=8,limit=16"):
    config = flags.load_config_file(spec)
    assert isinstance(config, ml_collections.ConfigDict)
    assert {"model", "merge", "input"} <= set(config)
    # The same file serves eval and calibrate: every field is one of theirs.
    for default in (common.eval_config(), common.calibrate_config()):
      default.lock()
      flags.merge_into(default, config, spec)
  assert config.input.batch_size == 8 and config.input.limit == 16
  doc = ast.get_docstring(ast.parse(open(path).read()))
  name = os.path.basename(path)
  assert f"mame-jax eval --config configs/{name}" in doc
  assert re.search(r"Paper: (Table|Figure) \d", doc), "the docstring quotes the paper's figure"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configs_import_no_evaluation_code(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    for name in names:
      assert not name.startswith(("mame_jax.eval", "mame_jax.cli")), (path, name)
      assert name in ("typing", "absl", "ml_collections") or name.startswith(
          ("ml_collections.", "mame_jax.configs", "mame_jax.models.merging")), (path, name)


def test_every_command_has_its_default_config_with_typed_placeholders():
  for build in (common.eval_config, common.calibrate_config, common.visualize_config,
                common.train_config):
    config = build()
    assert isinstance(config, ml_collections.ConfigDict)
    json.loads(config.to_json_best_effort())
  assert flags.field_type(common.eval_config(), "input.limit") is int
  assert flags.field_type(common.eval_config(), "eval.progress") is bool


# ----------------------------------------------------------------------------
# --config.a.b=value overrides and the short flags


def test_overrides_keep_the_fields_types():
  config = eval_cli.parse(["--config.merge.tau=0.9", "--config.input.batch_size=64",
                           "--config.input.limit", "12", "--config.eval.distributed",
                           "--config.model.dtype=bfloat16", "--config.merge.tome_r=(4,8)"])
  assert config.merge.tau == (0.9,) and isinstance(config.merge.tau[0], float)
  assert config.input.batch_size == 64 and isinstance(config.input.batch_size, int)
  assert config.input.limit == 12 and isinstance(config.input.limit, int)
  assert config.eval.distributed is True and config.model.dtype == "bfloat16"
  assert config.merge.tome_r == (4, 8)
  config = eval_cli.parse(["--config.eval.progress=false", "--config.merge.tau=(0.5,0.7)"])
  assert config.eval.progress is False and config.merge.tau == (0.5, 0.7)


def test_an_unknown_field_is_an_error_naming_it(capsys):
  err = _error(capsys, ["--config.merge.nope=1"])
  assert "mame-jax eval: error:" in err and "merge.nope" in err and "tau" in err
  err = _error(capsys, ["--config.input.batch_size=2.5"])
  assert "--config.input.batch_size" in err
  err = _error(capsys, ["--config", "no_such_config.py"])
  assert "no_such_config.py" in err and "not found" in err
  err = _error(capsys, ["--config", os.path.join(REPO, "configs", "deit_s.py:bogus=1")])
  assert "'bogus' unknown" in err
  err = _error(capsys, ["--config.eval.runs=3"], parse=visualize_cli.parse)
  assert "mame-jax visualize: error:" in err and "eval.runs" in err


def test_a_config_file_field_the_command_lacks_is_an_error(tmp_path, capsys):
  path = tmp_path / "flat.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict(dict(checkpoint='x.npz'))\n")
  err = _error(capsys, ["--config", str(path)])
  assert "'checkpoint' is not a setting" in err and "model" in err


def test_precedence_defaults_file_overrides_short_flags(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
      "from mame_jax.configs import common\n\n"
      "def get_config(arg=None):\n"
      "  config = common.eval_config()\n"
      "  config.input.batch_size = 16\n"
      "  config.input.limit = 100\n"
      "  config.merge.tau = (0.5,)\n"
      "  config.eval.runs = 3\n"
      "  config.train = {'steps': 1}  # another command's part: ignored\n"
      "  return config\n")
  config = eval_cli.parse(["--config", str(path), "--config.input.batch_size=32",
                           "--config.input.limit=50", "--limit", "7", "--tau", "0.6", "0.7"])
  assert config.eval.runs == 3                       # the file over the default (7)
  assert config.input.batch_size == 32               # an override over the file
  assert config.input.limit == 7                     # a short flag over both
  assert config.merge.tau == (0.6, 0.7)
  assert config.eval.warmup == common.eval_config().eval.warmup  # the default
  assert "train" not in config
  # --random-init asks for random weights: the file's checkpoint is dropped.
  config = eval_cli.parse(["--config", os.path.join(REPO, "configs", "deit_s.py"),
                           "--random-init", "S/16", "--no-progress", "--limit", "0"])
  assert (config.model.checkpoint, config.model.variant) == (None, "S/16")
  assert config.eval.progress is False and config.input.limit is None


def test_calibrate_and_visualize_read_their_parts():
  config = calibrate_cli.parse(["--config", os.path.join(REPO, "configs", "mae_b.py"),
                                "--config.calibrate.tol=0.01", "--target-speedup", "2",
                                "--config.calibrate.calib_images=64", "--calib-images", "32"])
  assert config.calibrate.target_speedup == 2.0 and config.calibrate.tol == 0.01
  assert config.calibrate.calib_images == 32
  assert config.merge.tau == (0.8,)  # the paper config's row, compared
  config = visualize_cli.parse(["astronaut", "--config.merge.tau=0.6", "--tau", "0.7",
                                "--config.visualize.panel=64", "--tome-r", "match"])
  assert config.merge.tau == 0.7 and config.visualize.panel == 64
  assert config.merge.tome_r == "match" and config.visualize.images == ("astronaut",)


def test_arch_overrides_add_vit_attributes_typed_as_vit_model_has_them(tmp_path):
  config = eval_cli.parse([
      "--random-init", "Ti/16", "--image-size", "32", "--config.model.arch.num_heads=4",
      "--config.model.arch.ln_eps", "1e-5", "--config.model.arch.patch_size=(8, 8)",
      "--config.model.arch.depth=1", "--noconfig.model.arch.head_zeroinit",
      "--config.model.arch.input_norm=None", "--config.model.arch.attention=xla"])
  assert config.model.arch.to_dict() == dict(
      num_heads=4, ln_eps=1e-5, patch_size=(8, 8), depth=1, head_zeroinit=False,
      input_norm=None, attention="xla")
  assert isinstance(config.model.arch.ln_eps, float)
  model, params = flags.load_model_from(config)
  assert (model.num_heads, model.ln_eps, model.patch_size, model.depth) == (4, 1e-5, (8, 8), 1)
  assert params["pos_embedding"].shape == (1, 16, 192)
  # A key a config file put there keeps the file's type; others are still added.
  path = tmp_path / "mine.py"
  path.write_text(TRAIN_CONFIG.format(arch=TINY_ARCH))
  config, _ = train.parse(["--config", str(path), "--workdir", str(tmp_path / "w"),
                           "--config.model.arch.width=48", "--config.model.arch.scan"])
  assert config.model.arch.to_dict() == {**TINY_ARCH, "width": 48, "scan": True}


def test_arch_overrides_of_the_wrong_type_or_an_unknown_name_are_errors(capsys):
  err = _error(capsys, ["--config.model.arch.num_heads=4.5"])
  assert "--config.model.arch.num_heads" in err and "4.5" in err
  err = _error(capsys, ["--config.model.arch.num_head=4"])
  assert "vit.Model has no attribute 'num_head'" in err
  assert "num_heads" in err and "ln_eps" in err and "merge" not in err.split("takes:")[1]
  err = _error(capsys, ["--config.model.arch.depth.x=4"])
  assert "model.arch.depth.x" in err


def test_split_argv_sends_config_tokens_to_absl_and_the_rest_to_argparse():
  file, overrides, rest = flags.split_argv(
      ["--data", "x", "--config", "c.py:a=1", "--config.a.b", "3", "--config.c=4",
       "--config.flag", "--limit", "5"], is_bool=lambda path: path == "flag")
  assert file == "c.py:a=1"
  assert overrides == ["--config.a.b", "3", "--config.c=4", "--config.flag"]
  assert rest == ["--data", "x", "--limit", "5"]
  assert flags.split_argv(["--config=d.py"])[0] == "d.py"


def test_configs_dir_is_the_installed_package_and_resolves_configs_paths(tmp_path,
                                                                        monkeypatch):
  assert os.path.exists(os.path.join(flags.configs_dir(), "deit_s.py"))
  monkeypatch.chdir(tmp_path)  # no configs/ here: the installed copy is used
  assert flags.resolve_config_path("configs/deit_s.py") == os.path.join(
      flags.configs_dir(), "deit_s.py")


# ----------------------------------------------------------------------------
# The commands run from the resolved config


def test_eval_with_a_paper_config_and_an_override(monkeypatch):
  loads, calls = [], []
  real_load_model = load.load_model

  class Captured(Exception):
    pass

  def fake_load_model(source, **kwargs):
    loads.append((source, kwargs))
    return real_load_model(None, variant="Ti/16", num_classes=5, image_size=32,
                           **TINY_ARCH)

  def fake_evaluate(model, params, data_name, **kwargs):
    calls.append((data_name, kwargs))
    raise Captured

  monkeypatch.setattr(load, "load_model", fake_load_model)
  monkeypatch.setattr(loop, "evaluate", fake_evaluate)
  with pytest.raises(Captured):
    cli.main(["eval", "--config", "configs/deit_s.py:dtype=bfloat16",
              "--config.merge.tau=0.9", "--config.eval.runs=1", "--data", "photos",
              "--limit", "4"])
  (source, load_kw), = loads
  assert source == "deit_s" and load.KNOWN[source].url.startswith(
      "https://huggingface.co/timm/deit_small")
  assert load_kw["dtype"] == "bfloat16" and load_kw["image_size"] == 224
  (data_name, kw), = calls
  assert data_name == "photos"
  assert kw["taus"] == [0.9] and kw["tome_r"] == [16] and kw["merge_layers"] == "0-7"
  assert kw["limit"] == 4 and kw["runs"] == 1 and kw["preprocess"] == "timm"


def test_eval_without_a_model_names_both_ways_to_give_one(capsys):
  assert eval_cli.cli_main(["--data", "photos"]) == 2
  err = capsys.readouterr().err
  assert "--checkpoint" in err and "--config.model.checkpoint" in err


TRAIN_CONFIG = """
import ml_collections
from mame_jax.configs import common


def get_config(arg=None):
  arg = common.parse_config_arg(arg, steps=100, image_size=224)
  config = common.train_config()
  config.model.arch = ml_collections.ConfigDict({arch!r})
  config.input.image_size = arg.image_size
  config.merge.layers = "1"
  config.total_steps = arg.steps
  return config
"""


def test_train_reads_a_config_file_then_overrides(tmp_path, capsys):
  path = tmp_path / "tiny_train.py"
  path.write_text(TRAIN_CONFIG.format(arch=TINY_ARCH))
  config, workdir = train.parse(["--config", f"{path}:steps=2,image_size=32", "--workdir",
                                 str(tmp_path / "work"), "--config.lr=0.01",
                                 "--config.seed", "1"])
  assert config.total_steps == 2 and config.lr == 0.01 and config.seed == 1
  assert config.input.image_size == 32 and config.model.arch.depth == 2
  assert config.merge.layers == "1" and workdir == str(tmp_path / "work")
  with pytest.raises(SystemExit):
    train.parse(["--config", str(path), "--workdir", "w", "--config.train.steps=3"])
  assert "train.steps" in capsys.readouterr().err
