"""Tokenizer models trained in the tests (no downloads): SentencePiece for Marian and T5, byte-level BPE for BART."""

import io
import json

import sentencepiece
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

BART_SPECIALS = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']


def train_spm(lines, size: int, **ids) -> bytes:
  """The bytes of a SentencePiece unigram model of about ``size`` pieces trained on ``lines``; ``ids``: the special
  ids (``bos_id=-1`` leaves a piece out)."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(lines * 4),
    model_writer=model,
    vocab_size=size,
    character_coverage=1.0,
    hard_vocab_limit=False,
    minloglevel=2,
    **ids,
  )
  return model.getvalue()


def train_byte_bpe(lines, size: int) -> tuple[dict, list[tuple[str, str]]]:
  """A byte-level BPE with BART's special tokens trained on ``lines``: its ``(vocab, merges)``."""
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=size,
    special_tokens=BART_SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  raw.train_from_iterator(lines, trainer)
  model = json.loads(raw.to_str())['model']
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  return model['vocab'], merges
