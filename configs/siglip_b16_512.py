"""SigLIP B/16 at 512 px (big_vision, WebLI English): zero-shot ImageNet-1k.

Paper: Table 3 (zero-shot classification on ImageNet-1k, RTX 3090, FP32, batch
size 1) -- SigLIP (ViT-B/16) at 512 px: baseline 46.28 img/s, 75.61% top-1;
ToMe(r=32) 55.10 img/s, 74.33%; ToMe(r=64) 71.94 img/s, 70.66%;
MaMe(tau=0.8) 79.25 img/s, 71.17%; MaMe(tau=0.9) 58.10 img/s, 74.50%.

    mame-jax eval --config configs/siglip_b16_512.py
    mame-jax eval --config configs/siglip_b16_512.py:tome_r=64,limit=5000
    mame-jax eval --config configs/siglip_b16_512.py --checkpoint webli_en_b16_512_68580893.npz \
        --config.zeroshot.tokenizer=sentencepiece.model

Rows: baseline, MaMe at tau 0.8 and 0.9 in the first 8 blocks of the image
tower (its MAP head pools, so there is no special token to keep) and ToMe(r=32)
in every block. Each image embedding is classified against the 1000 ImageNet
class names (CLIP's list) in the CLIP paper's 80 prompt templates, the class
embeddings computed once. Throughput depends on device, dtype and batch size
(the paper times batch size 1): compare the speedup ratios. Our GFLOPs are
XLA's count (2 per multiply-add).

Checkpoint and tokeniser: ``siglip_b16_512`` and ``siglip_tokenizer`` (T5's
c4_en SentencePiece model; SigLIP's text is 64 tokens, EOS appended, padded
with 1) from big_vision's public buckets, downloaded once into
``~/.cache/mame_jax`` (``$MAME_JAX_CACHE``); the third command takes local
copies. SigLIP preprocessing: resize to 512 x 512, values in [-1, 1].

Data: ImageNet-1k validation for tfds (``imagenet2012``, prepared offline as for
Table 1), or ``:data=PATH`` for a folder of class folders named by WordNet id
with ``--label-map imagenet``. ``arg`` keys: batch_size, dtype, data, tome_r,
limit (``common.table3_config``).
"""

from mame_jax.configs import common

TAUS = (0.8, 0.9)


def get_config(arg=None):
  return common.table3_config(arg, checkpoint="siglip_b16_512", tokenizer="siglip_tokenizer",
                              style="siglip", taus=TAUS, tome_r=32)
