"""VideoMAE-L (16 x 224^2, tubelet 2, 1568 tokens), fine-tuned on Kinetics-400: Table 6.

Paper: Table 6, VideoMAE-L on Kinetics-400 (RTX 3090, FP16, batch 1): baseline
82.31% at 6.25 videos/s; ToMe r = 32 82.05% at 6.97; MaMe tau = 0.8 81.47% at
9.28 (1.48x the baseline).

    mame-jax eval --config configs/videomae_l_k400.py:data=/data/k400/val
    mame-jax eval --config configs/videomae_l_k400.py:data=/data/k400/val,dtype=float16 --limit 500
    mame-jax eval --config configs/videomae_l_k400.py:data=/data/k400/val,clips=5,crops=3,batch_size=2

Rows: baseline, MaMe (tau = 0.8, first 8 of the 24 blocks, no class token) and
ToMe (r = 32, every block, ToMe's MAE recipe); frames, views and data are
described in ``configs/common.py`` (``table6_config``).

Checkpoint: ``MCG-NJU/videomae-large-finetuned-kinetics`` on the Hugging Face hub
(transformers layout), downloaded once into ``~/.cache/mame_jax``;
``--checkpoint FOLDER`` uses a local copy.
"""

from mame_jax.configs import common

# A name mame_jax.models.load knows (videomae.KNOWN_FOLDERS: the hub repository).
CHECKPOINT = "videomae_l_k400"


def get_config(arg=None):
  return common.table6_config(arg, checkpoint=CHECKPOINT, taus=(0.8,), tome_r=(32,))
