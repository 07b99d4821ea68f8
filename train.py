"""Training a ViT with MaMe in the loop: from scratch, fine-tuning, last block.

    python train.py --config configs/train.py:variant=Ti/16,merge=mame --workdir DIR \\
        [--config.input.data=imagenette] [--config.total_steps=N] [--config.FIELD=VALUE ...]

``merge=`` none | mame (blocks 3, 6, 9 counted from 1, tau 0.5, fixed
capacity 0: the paper's from-scratch and fine-tuning setting) | mame_last (the
last block only, fine-tuned from ``--config.init=CHECKPOINT``) | tome (ToMe at
about MaMe's token budget). The settings are ``mame_jax.configs.common.train_config``
< ``--config FILE.py[:arg]`` < ``--config.a.b=value`` (an unknown field is an
error naming it). ``DIR`` gets ``config.json``, ``metrics.jsonl``, orbax
checkpoints under ``checkpoints/<step>/`` and ``final.npz`` (big_vision
weights that ``mame_jax.load_model`` and ``mame-jax eval`` read); the same
command with the same ``DIR`` resumes from the newest checkpoint. The loop is
``mame_jax.train.loop``.
"""

from __future__ import annotations

import argparse
import sys

from mame_jax.cli import flags as flags_lib
from mame_jax.configs import common


def parse(argv=None):
  """``train.py`` arguments -> ``(config, workdir)``. Exits 2 on a bad argument."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  flags_lib.add_config_flag(parser)
  parser.add_argument("--workdir", required=True,
                      help="metrics.jsonl, checkpoints/<step>/ and final.npz go here; "
                           "an existing one is resumed")
  config, args = flags_lib.resolve("train.py", parser, argv, common.train_config(), {})
  return config, args.workdir


def main(argv=None) -> int:
  config, workdir = parse(argv)
  from mame_jax.train import loop  # pylint: disable=import-outside-toplevel
  if config.distributed:  # before anything touches the devices
    loop.initialize_distributed()
  try:
    loop.train(config, workdir)
  except loop.NonFiniteLoss as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 1
  except loop.TrainError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
