"""VideoMAE-B (16 x 224^2, tubelet 2, 1568 tokens), fine-tuned on Kinetics-400: Table 6.

Paper: Table 6, VideoMAE-B on Kinetics-400 (RTX 3090, FP16, batch 1): baseline
76.81% at 13.24 videos/s; MaMe tau = 0.9 76.03% at 13.33, tau = 0.85 74.23% at
13.81; ToMe r = 96 75.54% at 13.76, r = 128 73.34% at 14.06.

    mame-jax eval --config configs/videomae_b_k400.py:data=/data/k400/val
    mame-jax eval --config configs/videomae_b_k400.py:data=/data/k400/val,dtype=float16 --limit 500
    mame-jax eval --config configs/videomae_b_k400.py:data=/data/k400/val,clips=5,crops=3,batch_size=4

Rows: baseline, MaMe (tau = 0.9 and 0.85, first 8 blocks, no class token:
every token may merge) and ToMe (r = 96 and 128, every block, ToMe's MAE
recipe); frames, views and data are described in ``configs/common.py``
(``table6_config``); ``--config.video.stride=2`` etc. set the sampling. GFLOPs
are XLA's (2 per multiply-add), per video with all its views.

Checkpoint: ``MCG-NJU/videomae-base-finetuned-kinetics`` on the Hugging Face hub
(transformers layout: ``config.json`` + ``model.safetensors``), downloaded once
into ``~/.cache/mame_jax``; ``--checkpoint FOLDER`` uses a local copy.
"""

from mame_jax.configs import common

# A name mame_jax.models.load knows (videomae.KNOWN_FOLDERS: the hub repository).
CHECKPOINT = "videomae_b_k400"


def get_config(arg=None):
  return common.table6_config(arg, checkpoint=CHECKPOINT, taus=(0.9, 0.85),
                              tome_r=(96, 128))
