"""Specification of mame_jax.tokenizers: big_vision's SigLIP ("siglip": EOS appended,
sticky on truncation, padded with 1) and SigLIP 2 ("siglip2": Gemma rules, padded with
the pad id 0) tokenisation, case by case, with a SentencePiece model trained here."""

import numpy as np
import pytest
import sentencepiece

from mame_jax import tokenizers

WORDS = ("a photo of the cat dog bird car tree house small large red green blue "
         "white black sitting running on in under near one two three picture image "
         "of a very good bad old new happy sad").split()


def train_spm(folder, name, vocab_size=48, **ids):
  """A SentencePiece model trained on a few hundred lines of WORDS; ``ids``: its
  special ids (pad_id, eos_id, ...)."""
  rng = np.random.default_rng(0)
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(400)))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / name), vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, minloglevel=2, **ids)
  return folder / f"{name}.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Two vocabularies with the released models' special ids: T5's c4_en layout
  (pad 0, EOS 1, unk 2, no BOS) and Gemma's (pad 0, EOS 1, BOS 2, unk 3)."""
  folder = tmp_path_factory.mktemp("spm")
  t5 = train_spm(folder, "t5", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  gemma = train_spm(folder, "gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3)
  return {"siglip": t5, "siglip2": gemma}


def raw_ids(path, text):
  return list(sentencepiece.SentencePieceProcessor(model_file=str(path)).encode(
      text, out_type=int))


@pytest.mark.parametrize("style,pad", [("siglip", 1), ("siglip2", 0)])
def test_short_text_gets_eos_then_padding(models, style, pad):
  tok = tokenizers.Tokenizer(models[style], 12, style)
  ids = raw_ids(models[style], "a cat")
  out = tok(["a cat"])
  assert out.shape == (1, 12) and out.dtype == np.int32
  want = ids + [1] + [pad] * (12 - len(ids) - 1)
  np.testing.assert_array_equal(out[0], want)  # no BOS in front in either style


@pytest.mark.parametrize("style", ["siglip", "siglip2"])
def test_exact_length_is_kept_with_its_eos(models, style):
  text = "a photo of the cat"
  ids = raw_ids(models[style], text)
  tok = tokenizers.Tokenizer(models[style], len(ids) + 1, style)
  np.testing.assert_array_equal(tok(text)[0], ids + [1])


@pytest.mark.parametrize("style", ["siglip", "siglip2"])
def test_truncation_keeps_a_sticky_eos(models, style):
  text = " ".join(WORDS)
  ids = raw_ids(models[style], text)
  assert len(ids) > 10
  out = tokenizers.Tokenizer(models[style], 10, style)(text)[0]
  np.testing.assert_array_equal(out[:9], ids[:9])
  assert out[-1] == 1  # the last kept token is EOS, where the text tower pools


@pytest.mark.parametrize("style", ["siglip", "siglip2"])
def test_upper_case_is_lowered_ascii_only(models, style):
  tok = tokenizers.Tokenizer(models[style], 16, style)
  np.testing.assert_array_equal(tok("A PHOTO of The Cat"), tok("a photo of the cat"))
  # tf.strings.lower (big_vision) lowers ASCII only: a non-ASCII capital stays.
  assert tokenizers.ascii_lower("Éa B") == "Éa b"
  np.testing.assert_array_equal(tok("ÉCAT"), tok("Écat"))


def test_batches_and_styles_differ_only_in_padding(models):
  texts = ["a red car", "two happy dogs sitting near the old house", ""]
  a = tokenizers.Tokenizer(models["siglip"], 8, "siglip")(texts)
  assert a.shape == (3, 8)
  np.testing.assert_array_equal(a[2], [1] * 8)  # the empty text: EOS, padded with 1
  b = tokenizers.Tokenizer(models["siglip2"], 8, "siglip2")(texts)
  np.testing.assert_array_equal(b[2], [1] + [0] * 7)


def test_sticky_eos_rule():
  np.testing.assert_array_equal(tokenizers.sticky_eos([5, 6, 7, 1], 3, 0), [5, 6, 1])
  np.testing.assert_array_equal(tokenizers.sticky_eos([5, 1], 4, 9), [5, 1, 9, 9])
  np.testing.assert_array_equal(tokenizers.sticky_eos([5, 6, 1], 3, 0), [5, 6, 1])


def test_vocab_mismatch_names_both_sizes(models):
  tok = tokenizers.Tokenizer(models["siglip"], 8)
  good = {"txt": {"Embed_0": {"embedding": np.zeros((tok.vocab_size, 4))}}}
  tokenizers.check_vocab(tok, good)
  tok.check(good["txt"])  # a text tower's own params work too
  bad = {"txt": {"Embed_0": {"embedding": np.zeros((32000, 4))}}}
  with pytest.raises(ValueError, match=f"{tok.vocab_size} pieces.*32000 rows"):
    tokenizers.check_vocab(tok, bad)
  with pytest.raises(ValueError, match="no text tower"):
    tokenizers.check_vocab(tok, {"img": {}})


def test_bad_arguments_fail_clearly(models, tmp_path):
  with pytest.raises(ValueError, match="style must be one of"):
    tokenizers.Tokenizer(models["siglip"], 8, "clip")
  with pytest.raises(FileNotFoundError, match="no such file"):
    tokenizers.Tokenizer(tmp_path / "missing.model", 8)
  with pytest.raises(TypeError, match="strings"):
    tokenizers.Tokenizer(models["siglip"], 8)([3])


# ------------------------------------------------- zero-shot prompt clean-up (big_vision)


@pytest.mark.parametrize("name,want", [
    ("St. Bernard", "st bernard"),                      # punctuation deleted, lower-cased
    ("Geoffroy's spider monkey", "geoffroys spider monkey"),
    ("kite (bird of prey)", "kite bird of prey"),
    ("black-and-white colobus", "blackandwhite colobus"),  # hyphens go, words fuse
    ("great_white  shark ", "great white shark"),       # "_" -> space, whitespace collapsed
    ("tench, Tinca tinca", "tench"),                    # only the first alias
    ("a ,b", "a "),                                     # split after stripping: kept as is
    ("Éclair", "éclair"),                               # str.lower: Unicode too
])
def test_class_names_are_canonicalised_like_big_vision(name, want):
  assert tokenizers.canonical_class_name(name) == want


@pytest.mark.parametrize("template,want", [
    ("a photo of a {}.", "a photo of a {}"),
    ("A close-up photo of the {}.", "a closeup photo of the {}"),
    ("itap of my {}!", "itap of my {}"),
    ("{x} a {} b}", "x a {} b"),                        # only the exact "{}" survives
    ("{}", "{}"),
])
def test_templates_keep_their_slot_and_lose_punctuation(template, want):
  assert tokenizers.canonical_template(template) == want


def test_templates_are_filled_by_splitting_at_the_slot():
  assert tokenizers.fill_template("a {} of {x}", "cat") == "a cat of {x}"  # no str.format
  with pytest.raises(ValueError, match="exactly one"):
    tokenizers.fill_template("a {} {}", "cat")
  assert tokenizers.canonicalize_text("A,B c", keep=",") == "a,b c"
  assert tokenizers.canonicalize_text("A,B. c") == "ab c"
