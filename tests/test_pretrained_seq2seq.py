"""``pretrained.load`` of BART, Marian and T5 against transformers on tiny random checkpoints saved with
``save_pretrained``, tokenizers trained here: ``translate`` and ``summarize`` return what ``generate`` + the target
tokenizer's ``batch_decode`` return (transformers 4's translation pipeline; transformers 5 removed it), greedy and
with 4 beams; ``save`` writes directories transformers decodes alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from tokenizer_helpers import train_byte_bpe, train_spm

from transformer_jax import pretrained
from transformer_jax.convert import ConversionError
from transformer_jax.pretrained_seq2seq import Seq2SeqPretrained

pytestmark = [
  pytest.mark.filterwarnings('ignore:Recommended. pip install sacremoses'),
  # the default under test: 20 new tokens when nothing sets a length
  pytest.mark.filterwarnings('ignore:Using the model-agnostic default `max_length`'),
]

ENGLISH = [
  'The film was a wonderful surprise, and the actors were great.',
  'A dull, tedious story; I left before the end.',
  'Café crème and jalapeño: über good!',
  'Numbers like 3.14 and 2048 appear here.',
]
GERMAN = [
  'Der Film war eine wunderbare Überraschung.',
  'Eine langweilige Geschichte; ich ging vor dem Ende.',
  'Grüße aus München: Straße, Äpfel, Öl.',
  'Zahlen wie 3,14 und 2048 stehen hier.',
]
TEXTS = [
  'The film was great.',
  'Über good café, with numbers 3.14 and 2048 and more words after them',
  'x',
]
SHAPE = dict(
  d_model=24,
  encoder_layers=2,
  decoder_layers=2,
  encoder_attention_heads=2,
  decoder_attention_heads=2,
  encoder_ffn_dim=20,
  decoder_ffn_dim=20,
  max_position_embeddings=64,
  dropout=0.0,
)
TASKS = {
  'summarization': {'prefix': 'summarize: ', 'num_beams': 2, 'max_length': 9, 'min_length': 3},
  'translation_en_to_de': {'prefix': 'translate English to German: '},
}


def _marian_tokenizer(root):
  """Source and target SentencePiece models with an opus-mt style shared vocab.json ('<pad>' last)."""
  pieces = []
  for name, lines, size in (('source.spm', ENGLISH, 60), ('target.spm', GERMAN, 70)):
    (root / name).write_bytes(train_spm(lines, size, bos_id=-1, eos_id=-1))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / name))
    pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
  vocab = ['</s>', '<unk>'] + sorted(set(pieces)) + ['<pad>']
  (root / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(vocab)}))
  files = [str(root / name) for name in ('source.spm', 'target.spm', 'vocab.json')]
  return transformers.MarianTokenizer(*files)


def _bart_tokenizer(root):
  vocab, merges = train_byte_bpe(ENGLISH + GERMAN, 300)
  return transformers.BartTokenizerFast(vocab=vocab, merges=merges)


def _t5_tokenizer(root):
  """T5's layout (<pad> 0, </s> 1, <unk> 2, 100 sentinels), converted by transformers from spiece.model."""
  (root / 'spiece.model').write_bytes(
    train_spm(ENGLISH + GERMAN, 90, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  )
  (root / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'T5Tokenizer'}))
  return transformers.AutoTokenizer.from_pretrained(root)


# How far each family's end token is pushed up (BART, Marian: final_logits_bias; T5's tied head: the factor on its
# row) and BART's learned decoder positions scaled, so that random models' rows finish at different steps.
EOS_BOOST = {'bart': 1.6, 'marian': 1.0, 't5': 8.0}
BART_POSITIONS = 10.0


def _model(name: str, vocab: int):
  """A tiny random model of `name`'s family with `vocab` rows, its weights perturbed far from init, and a
  generation config that forbids repeated bigrams (the repetition random models fall into)."""
  torch.manual_seed(0)
  if name == 'marian':
    config = transformers.MarianConfig(
      vocab_size=vocab,
      pad_token_id=vocab - 1,
      decoder_start_token_id=vocab - 1,
      eos_token_id=0,
      **SHAPE,
    )
    model = transformers.MarianMTModel(config)
  elif name == 'bart':
    model = transformers.BartForConditionalGeneration(
      transformers.BartConfig(vocab_size=vocab, **SHAPE)
    )
  else:
    config = transformers.T5Config(
      vocab_size=vocab,
      d_model=24,
      d_kv=12,
      num_heads=2,
      d_ff=20,
      num_layers=2,
      num_decoder_layers=2,  # transformers 5.24's T5 generate fails on unequal counts
      dropout_rate=0.0,
      decoder_start_token_id=0,
      task_specific_params=TASKS,
    )
    model = transformers.T5ForConditionalGeneration(config)
  eos = model.config.eos_token_id
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    if name == 't5':
      model.shared.weight[eos] *= EOS_BOOST[name]
    else:
      model.final_logits_bias.normal_(0.0, 0.5)
      model.final_logits_bias[0, eos] += EOS_BOOST[name]
    if name == 'bart':
      model.model.decoder.embed_positions.weight *= BART_POSITIONS
  model.generation_config.no_repeat_ngram_size = 2
  return model.eval()


FAMILIES = {'bart': _bart_tokenizer, 'marian': _marian_tokenizer, 't5': _t5_tokenizer}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """name -> (directory, transformers model, transformers tokenizer, ours loaded from the directory)."""
  out = {}
  for name, tokenizer_of in FAMILIES.items():
    root = tmp_path_factory.mktemp(name)
    tokenizer = tokenizer_of(root)
    tokenizer.save_pretrained(root)
    _model(name, len(tokenizer)).save_pretrained(root)
    # the checkpoint as transformers reads it (Marian's sinusoid tables, perturbed above, are not saved)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(root).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(root)
    out[name] = root, model, tokenizer, pretrained.load(root)
  return out


def _tokens(model, tokenizer, texts, prefix: str = '', **options) -> np.ndarray:
  """``(B, T)`` new tokens of ``generate`` on the padded texts (after the start token)."""
  batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors='pt')
  with torch.no_grad():
    return model.generate(**batch, do_sample=False, **options).numpy()[:, 1:]


def _generate(model, tokenizer, texts, prefix: str = '', **options) -> list[str]:
  """What transformers 4's translation pipeline did: pad the texts, generate, decode without special tokens."""
  tokens = _tokens(model, tokenizer, texts, prefix, **options)
  return tokenizer.batch_decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize('beams', [1, 4])
@pytest.mark.parametrize('name', list(FAMILIES))
def test_translate_equals_generate(checkpoints, name, beams):
  _, model, tokenizer, ours = checkpoints[name]
  assert isinstance(ours, Seq2SeqPretrained)
  tokens = _tokens(model, tokenizer, TEXTS, num_beams=beams)
  assert ours.translate(TEXTS, num_beams=beams) == tokenizer.batch_decode(
    tokens, skip_special_tokens=True
  )
  # rows end at different steps (None: the longest translation the config allows)
  eos = model.generation_config.eos_token_id
  ends = {row.index(eos) if eos in row else None for row in tokens.tolist()}
  assert len(ends) > 1, tokens


def test_t5_tasks_bring_their_prefix_and_settings(checkpoints):
  """A summary of one text (a string gives a string) with the checkpoint's prefix and settings for the task."""
  _, model, tokenizer, ours = checkpoints['t5']
  text, summary = TEXTS[0], {k: v for k, v in TASKS['summarization'].items() if k != 'prefix'}
  theirs = _generate(model, tokenizer, [text], 'summarize: ', **summary)[0]
  assert ours.summarize(text) == theirs
  # both matter for this text: without the prefix, or without the settings, transformers writes otherwise
  assert theirs not in _generate(model, tokenizer, [text], **summary) + _generate(
    model, tokenizer, [text], 'summarize: ', num_beams=2
  )
  with pytest.raises(ValueError, match="task 'translation_en_to_fr' is not in this checkpoint"):
    ours.translate(TEXTS, task='translation_en_to_fr')


@pytest.mark.parametrize('name', list(FAMILIES))
def test_saved_directories_decode_alike_in_transformers(checkpoints, tmp_path, name):
  _, _, _, ours = checkpoints[name]
  ours.save(tmp_path)
  model = type(checkpoints[name][1]).from_pretrained(tmp_path).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert _generate(model, tokenizer, TEXTS, num_beams=4) == ours.translate(TEXTS, num_beams=4)
  again = pretrained.load(tmp_path)
  assert again.model.config == ours.model.config and again.hf_config == ours.hf_config
  np.testing.assert_array_equal(
    again.tokenizer(TEXTS)['input_ids'], ours.tokenizer(TEXTS)['input_ids']
  )


def test_a_tokenizer_larger_than_the_model_is_refused(checkpoints):
  bart, t5 = checkpoints['bart'][0], checkpoints['t5'][0]
  with pytest.raises(
    ConversionError, match='the source tokenizer has 300 tokens but the model embeds only'
  ):
    pretrained.load(t5, tokenizer=bart)
