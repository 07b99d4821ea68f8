"""train.py and mame_jax.train: the paper's training settings, exact resume,
orbax checkpoints, final.npz, sharding over devices and processes.

One tiny setting (a 2-block ViT on 32-px images of four colour classes) is
shared by every run of this module, so its step compiles once in-process."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from mame_jax import MergeConfig, ToMeConfig
from mame_jax.models import checkpoints, load
from mame_jax.train import data as train_data
from mame_jax.train import loop, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = '{"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}'


def write_classes(root, per_class=8, size=40, seed=0):
  """Four classes: red, green, blue and a white top half, with noise."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)
  for c in range(4):
    os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(per_class):
      image = rs.randint(0, 60, (size, size, 3)).astype(np.uint8)
      if c < 3:
        image[..., c] += 180
      else:
        image[: size // 2] = 255
      Image.fromarray(image).save(os.path.join(root, f"class{c}", f"{i}.png"))
  return root


def argv(data, workdir, *more):
  return ["--config", f"configs/train.py:merge=mame,data={data},batch_size=8,image_size=32,"
          "steps=24", "--workdir", str(workdir), f"--config.model.arch={ARCH}",
          "--config.merge.layers=1", "--config.num_classes=4", "--config.lr=0.003",
          "--config.warmup_steps=4", "--config.log_steps=4", "--config.ckpt_steps=8",
          "--config.keep_ckpts=2", "--config.input.workers=2", "--config.progress=false",
          *more]


def run(args):
  config, workdir = train.parse(args)
  return loop.train(config, workdir, log=lambda *a: None)


def rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run (with a held-out evaluation at the end) and one
  stopped after 10 steps and restarted."""
  tmp = tmp_path_factory.mktemp("train")
  data = write_classes(str(tmp / "data"))
  full = run(argv(data, tmp / "full", f"--config.input.eval_data={data}"))
  stopped = run(argv(data, tmp / "resumed", "--config.stop_after=10"))
  resumed = run(argv(data, tmp / "resumed"))
  return dict(tmp=tmp, data=data, full=full, stopped=stopped, resumed=resumed)


def test_loss_falls_and_the_workdir_has_metrics_checkpoints_and_eval(runs):
  work = runs["tmp"] / "full"
  train_rows = [r for r in rows(work) if "loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24]
  assert train_rows[-1]["loss"] < 0.6 * train_rows[0]["loss"]
  for r in train_rows:
    assert {"lr", "images_per_s", "dropped", "tokens", "grad_norm"} <= set(r)
    assert r["tokens"] == [17.0, 9.0]  # 16 patches + cls; 2:1 in block 1
  assert train_rows[0]["lr"] == pytest.approx(0.003 * 3 / 4)  # warm-up, step 3 of 4
  (ev,) = [r for r in rows(work) if "eval_top1" in r]
  assert ev["step"] == 24 and ev["eval_images"] == 32 and ev["eval_method"] == "MaMe(tau=0.5)"
  assert ev["eval_top1"] >= 50.0  # chance is 25
  # orbax: every 8 steps and at the end, the newest 2 kept.
  assert sorted(os.listdir(work / "checkpoints")) == ["16", "24"]


def test_a_stopped_and_restarted_run_ends_with_the_same_params(runs):
  assert runs["stopped"].stopped and runs["stopped"].step == 10
  assert runs["resumed"].step == 24
  assert [r["step"] for r in rows(runs["tmp"] / "resumed") if "loss" in r] == [4, 8, 12, 16,
                                                                               20, 24]
  same = jax.tree.map(np.array_equal, runs["full"].params, runs["resumed"].params)
  assert all(jax.tree.leaves(same))


def test_final_npz_loads_in_load_model_with_the_trained_params(runs):
  model, params = load.load_model(str(runs["tmp"] / "full" / "final.npz"))
  assert (model.depth, model.width, model.num_classes) == (2, 32, 4)
  flat, _ = checkpoints.canonicalize(runs["full"].params)
  mine, _ = checkpoints.canonicalize(params)
  assert sorted(flat) == sorted(mine)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(mine[k]), err_msg=k)


def test_a_non_finite_loss_stops_naming_the_step_and_no_checkpoint_holds_it(runs, capsys):
  work = runs["tmp"] / "nan"
  # lr 1e37, the same program as the other runs: step 0 is at lr 0 (warm-up), step
  # 1's update (lr 2.5e36) is finite, step 2's forward overflows.
  rc = train.main(argv(runs["data"], work, "--config.lr=1e37", "--config.ckpt_steps=1"))
  assert rc == 1
  assert "non-finite loss at step 2" in capsys.readouterr().err
  assert not os.path.exists(work / "final.npz")
  assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
  ckpts = loop.checkpoint_lib.Checkpoints(work)
  for step in (1, 2):
    state, _ = ckpts.restore(step, jax.eval_shape(lambda: run_state_like(runs)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state["params"]))
  assert float(np.abs(state["params"]["embedding"]["kernel"]).max()) > 1e30  # it did blow up


def run_state_like(runs):
  tx, _ = optim.optimizer(lr=1.0, total_steps=24, warmup_steps=4, wd=0.05)
  return loop.init_state(runs["full"].params, tx, 0)


# ----------------------------------------------------------------------------
# The settings


def test_the_paper_settings_build_as_the_paper_has_them():
  built = {}
  for method in ("none", "mame", "mame_last", "tome"):
    config, _ = train.parse(["--config", f"configs/train.py:merge={method}", "--workdir", "w"])
    built[method] = loop.merge_for(config, depth=12, num_patches=196)
  assert built["none"] is None
  assert built["mame"] == MergeConfig(tau=0.5, layers=(2, 5, 8), mode="fixed",
                                      capacities=(0, 0, 0))
  assert built["mame_last"].layers == (11,) and built["mame_last"].capacities == (0,)
  assert isinstance(built["tome"], ToMeConfig) and built["tome"].layers is None
  # ToMe's r puts its blocks' token count closest to MaMe's.
  target = sum(a + m for a, m in loop.mame_tokens(197, (2, 5, 8), 12))
  cost = lambda r: abs(sum(a + m for a, m in loop.tome_tokens(197, r, 12)) - target)
  assert cost(built["tome"].r) <= min(cost(built["tome"].r - 1), cost(built["tome"].r + 1))


def test_the_last_block_setting_runs_a_step():
  config, _ = train.parse(["--config", "configs/train.py:merge=mame_last,image_size=16",
                           "--workdir", "w", f"--config.model.arch={ARCH}",
                           "--config.num_classes=3"])
  model, params = loop.build_model(config)
  assert model.merge.layers == (1,)
  tx, schedule = optim.optimizer(lr=1.0, total_steps=4, warmup_steps=1, wd=0.05)
  step = jax.jit(loop.make_step(model, tx, schedule, num_classes=3))
  images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  state, metrics = step(loop.init_state(params, tx, 0, 1e-3), images, jnp.arange(4) % 3)
  assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
  assert metrics["tokens"].tolist() == [5, 3]  # 4 patches + cls; 2:1 in the last block


def test_gradients_reach_the_blocks_before_the_merge_through_the_fusion_weights():
  # d loss / d tau is non-zero only if the gradient passes through MaMe's fusion
  # weights (eqs. 3-8), computed from block 0's attention output; block 1's
  # attention carries the merged tokens into the class token.
  model, params = load.load_model(None, variant="Ti/16", num_classes=3, image_size=16,
                                  width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4)
  images = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)

  def loss(tau, params):
    merge = MergeConfig(tau=tau, layers=(0,), mode="fixed", capacities=(0,))
    logits, _ = model.clone(merge=merge, head_zeroinit=False).apply({"params": params}, images)
    return optim.loss_fn(logits, optim.soft_targets(jnp.arange(2), 3))

  params = dict(params, head={"kernel": jnp.ones((16, 3)) * jnp.arange(3.0), "bias": jnp.zeros(3)})
  d_tau, d_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.float32(0.2), params)
  assert np.isfinite(float(d_tau)) and float(d_tau) != 0.0
  before = [d_params["embedding"]["kernel"], d_params["pos_embedding"]]
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in before)


# ----------------------------------------------------------------------------
# Config, data and optimiser details


def test_a_bad_config_field_fails_naming_it(capsys):
  with pytest.raises(SystemExit) as e:
    train.parse(["--config", "configs/train.py", "--workdir", "w", "--config.totl_steps=3"])
  assert e.value.code == 2 and "totl_steps" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train.parse(["--config", "configs/train.py:merge=mame,stepz=3", "--workdir", "w"])
  assert "stepz" in capsys.readouterr().err
  config, _ = train.parse(["--config", "configs/train.py:merge=mamee", "--workdir", "w"])
  with pytest.raises(loop.TrainError, match="merge.method 'mamee'"):
    loop.merge_for(config, 12, 196)


def test_batch_k_depends_on_seed_and_k_only_and_each_process_gets_its_rows(tmp_path):
  source = train_data.load_train_source(write_classes(str(tmp_path / "d"), per_class=3))
  kw = dict(batch_size=4, image_size=16, total_steps=5)
  one = train_data.Batches(source, seed=3, **kw)
  images, labels = one.batch(4)
  again = list(one.from_step(2))
  assert len(again) == 3 and np.array_equal(again[2][0], images)
  second = train_data.Batches(source, seed=3, process_index=1, process_count=2, **kw).batch(4)
  assert np.array_equal(second[0], images[2:]) and np.array_equal(second[1], labels[2:])
  assert not np.array_equal(train_data.Batches(source, seed=4, **kw).batch(4)[0], images)
  assert images.shape == (4, 16, 16, 3) and -1 <= images.min() < images.max() <= 1


def test_weight_decay_skips_norms_biases_and_embeddings():
  model, params = load.load_model(None, variant="Ti/16", num_classes=3, image_size=16,
                                  width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8)
  mask = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  assert mask["embedding/kernel"] and mask["head/kernel"]
  assert mask["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
  for k in ("pos_embedding", "cls", "head/bias", "Transformer/encoder_norm/scale",
            "Transformer/encoderblock_0/LayerNorm_0/bias"):
    assert not mask[k], k
  sched = optim.schedule(1.0, 10, 2)
  assert [float(sched(i)) for i in (0, 1, 2)] == [0.0, 0.5, 1.0] and float(sched(10)) == 0.0


# ----------------------------------------------------------------------------
# Devices and processes

SHARDED = r"""
import sys
sys.argv = ["train.py"] + sys.argv[1:]
import jax
import train
sys.exit(train.main())
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_four_devices_and_two_processes_of_two_give_the_params_of_one_device(runs):
  tmp, data = runs["tmp"], runs["data"]
  base = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = os.environ.get("XLA_FLAGS", "")  # the session's (tests/conftest.py), kept
  four = dict(base, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4")
  two = dict(base, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-c", SHARDED, *argv(data, tmp / "four")],
                            env=four, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)]
  for pid in (0, 1):
    procs.append(subprocess.Popen(
        [sys.executable, "-c", SHARDED, *argv(data, tmp / "two", "--config.distributed")],
        env=dict(two, JAX_PROCESS_ID=str(pid)), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  assert "over 4 device(s) x 1 process(es)" in outs[0]
  assert "over 4 device(s) x 2 process(es)" in outs[1]
  final = {name: checkpoints.read_arrays(str(tmp / name / "final.npz"))
           for name in ("four", "two")}
  # Data parallelism changes only the order of the gradient sums: the losses agree to
  # float32 rounding, and so do the parameters -- up to Adam's normalisation, which
  # turns the rounding noise of parameters without a real gradient (the key bias,
  # which softmax ignores) into updates of up to lr per step.
  losses = {name: [r["loss"] for r in rows(tmp / name) if "loss" in r]
            for name in ("full", "four", "two")}
  np.testing.assert_allclose(losses["four"], losses["full"], rtol=1e-4)
  np.testing.assert_allclose(losses["two"], losses["four"], rtol=1e-4)
  one, _ = checkpoints.canonicalize(runs["full"].params)
  for k, v in one.items():
    tol = 24 * 0.003 if k.endswith("key/bias") else 1e-3
    np.testing.assert_allclose(final["four"][k], v, atol=tol, err_msg=k)
    np.testing.assert_allclose(final["two"][k], final["four"][k], atol=tol, err_msg=k)
  assert [r["step"] for r in rows(tmp / "two") if "loss" in r] == [4, 8, 12, 16, 20, 24]



def test_the_benchmark_sections_render_their_json_with_command_device_and_date(
    tmp_path, monkeypatch):
  from benchmarks import digits, train_step  # pylint: disable=import-outside-toplevel
  from mame_jax.eval.report import write_json  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  assert "Not run yet." in "\n".join(digits.section() + train_step.section())
  device = dict(description="cpu x2", platform="cpu", kind="cpu", count=1)
  write_json("results/train_step_cpu.json", dict(
      command="python -m benchmarks.train_step --quick", device=device, date="2026-12-01",
      variant="S/16", batch=8, dtype="float32",
      rows=[dict(method="none", step_ms=10.0, speedup=1.0)]))
  write_json("results/train_digits_cpu.json", dict(
      command="python -m benchmarks.digits --quick", device=device, date="2026-12-01",
      steps=80, batch=32, loader_images_per_s=900.0,
      rows=[dict(method="mame", eval_top1=90.0)]))
  step_md, digits_md = "\n".join(train_step.section()), "\n".join(digits.section())
  for md, command in ((step_md, "benchmarks.train_step --quick"),
                      (digits_md, "benchmarks.digits --quick")):
    assert command in md and "cpu x2" in md and "2026-12-01" in md
  assert "No GPU figure yet" in step_md and "| none" in step_md
  assert "not ImageNet" in digits_md and "900 images/s" in digits_md


# ----------------------------------------------------------------------------
# A real kill, and TensorBoard


def test_train_py_killed_during_an_async_checkpoint_write_resumes_to_the_same_final_npz(
    runs, capsys):
  tmp, data = runs["tmp"], runs["data"]
  work = tmp / "killed"
  ckpts = work / "checkpoints"
  # The session's XLA_FLAGS (tests/conftest.py) are inherited as they are: the
  # same compiler settings as the in-process uninterrupted run.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with open(tmp / "killed.err", "w") as err:
    proc = subprocess.Popen([sys.executable, "train.py", *argv(data, work)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
      # Step 8's checkpoint is finished first; step 16's folder appears when orbax
      # begins writing it in the background (a write takes some 0.1-0.5 s here):
      # kill at once, mid-write.
      while proc.poll() is None and not (ckpts.is_dir() and any(
          n.startswith("16") for n in os.listdir(ckpts))):
        time.sleep(0.002)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL, (tmp / "killed.err").read_text()[-3000:]
  left = sorted(os.listdir(ckpts))
  finished = [int(n) for n in left if n.isdigit()]
  unfinished = [n for n in left if ".orbax-checkpoint-tmp" in n]
  assert left and len(finished) + len(unfinished) == len(left), left
  assert 8 in finished  # orbax renames a step's folder once all of it is written
  # The same command again, to the end (train.main is what `python train.py` runs;
  # in-process, it reuses the compiled step of the module's other runs). An
  # unfinished step is no checkpoint: it resumes from the newest finished one (8,
  # unless the kill came after step 16's rename), written by the killed process.
  assert train.main(argv(data, work)) == 0
  newest = max(finished)
  assert f"resumed from {ckpts}/{newest} (step {newest})" in capsys.readouterr().out
  assert sorted(os.listdir(ckpts)) == ["16", "24"]  # nothing unfinished left behind
  assert [r["step"] for r in rows(work) if "loss" in r] == [4, 8, 12, 16, 20, 24]
  want = checkpoints.read_arrays(str(tmp / "full" / "final.npz"))
  got = checkpoints.read_arrays(str(work / "final.npz"))
  assert sorted(got) == sorted(want)
  for k in want:
    assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k


def read_scalars(logdir):
  """``{tag: {step: value}}`` of every event file in ``logdir``, read as TFRecords
  (length (8 bytes), its masked CRC-32C (4), the Event protobuf, its CRC (4))
  with tensorboardX's own protobuf and checksum; the last value of a step wins."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  scalars, files = {}, sorted(os.listdir(logdir))
  for name in files:
    blob, pos = open(os.path.join(logdir, name), "rb").read(), 0
    while pos < len(blob):
      header = blob[pos:pos + 8]
      (n,) = struct.unpack("<Q", header)
      (crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
      payload = blob[pos + 12:pos + 12 + n]
      (data_crc,) = struct.unpack("<I", blob[pos + 12 + n:pos + 16 + n])
      assert crc == masked_crc32c(header) and data_crc == masked_crc32c(payload)
      pos += 16 + n
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return files, scalars


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(runs):
  work = runs["tmp"] / "full"
  files, scalars = read_scalars(work / "tensorboard")
  assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
  logged = rows(work)
  train_rows = [r for r in logged if "loss" in r]
  for key in ("loss", "lr", "images_per_s", "grad_norm", "accuracy", "dropped"):
    assert sorted(scalars[key]) == [4, 8, 12, 16, 20, 24], key
    for r in train_rows:
      assert scalars[key][r["step"]] == pytest.approx(r[key], rel=1e-6), key
  assert scalars["tokens/0"][24] == 17.0 and scalars["tokens/1"][24] == 9.0
  (ev,) = [r for r in logged if "eval_top1" in r]
  assert scalars["eval_top1"] == {24: pytest.approx(ev["eval_top1"])}
  assert "eval_method" not in scalars  # text fields stay in metrics.jsonl only
  # The stopped-and-resumed run: one file per run, every step once.
  files, scalars = read_scalars(runs["tmp"] / "resumed" / "tensorboard")
  assert len(files) == 2 and sorted(scalars["loss"]) == [4, 8, 12, 16, 20, 24]


def test_without_tensorboardx_the_loop_writes_no_events(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
  assert loop.TensorBoard.open(str(tmp_path), 0) is None
  assert not (tmp_path / "tensorboard").exists()
