"""How transformers 5's tokenizer classes set up their pipeline, for :mod:`transformer_jax.tokenizer` to do the same.

transformers does not run ``tokenizer.json`` as saved for ``BertTokenizer``, ``GPT2Tokenizer``, ``RobertaTokenizer``
(which ``BartTokenizer`` is), ``T5Tokenizer``, ``LlamaTokenizer`` and ``Qwen2Tokenizer``: their constructors rebuild
the normalizer, pre-tokenizer, decoder and (but for Llama's and Qwen2's, which keep the file's) post-processor from
``tokenizer_config.json``, with the class defaults below. T5's ``spiece.model`` alone is read as transformers converts
it. ``PreTrainedTokenizerFast`` (``TokenizersBackend``, which Llama 3 style checkpoints name) runs the file as saved.

Which class that is depends on the model type too (:func:`auto_class`): a Qwen2 model always gets ``Qwen2Tokenizer``,
a Mistral model the file as saved, whatever the config names, and so does a byte-level file that names
``LlamaTokenizer`` (whose Metaspace would break it).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from transformer_jax.sentencepiece_model import SPECIAL_KINDS, read_model

SPECIAL_TOKENS = ('pad', 'unk', 'cls', 'sep', 'mask', 'bos', 'eos')
# The classes whose constructors rebuild the pipeline, and their defaults.
FAMILY_OF_CLASS = {'BertTokenizer': 'bert', 'DistilBertTokenizer': 'bert', 'GPT2Tokenizer': 'gpt2'}
FAMILY_OF_CLASS |= {'RobertaTokenizer': 'roberta', 'BartTokenizer': 'roberta', 'T5Tokenizer': 't5'}
FAMILY_OF_CLASS |= {'LlamaTokenizer': 'llama', 'Qwen2Tokenizer': 'qwen2'}
# The class AutoTokenizer registers for a model type; llama has none (then the named class, else the file as saved).
CLASS_OF_MODEL_TYPE = dict(bert='BertTokenizer', distilbert='BertTokenizer', gpt2='GPT2Tokenizer')
CLASS_OF_MODEL_TYPE |= dict(bart='BartTokenizer', roberta='RobertaTokenizer', t5='T5Tokenizer')
CLASS_OF_MODEL_TYPE |= dict(
  marian='MarianTokenizer', mistral='TokenizersBackend', qwen2='Qwen2Tokenizer'
)
# The names of the class that runs tokenizer.json as saved.
BACKENDS = ('TokenizersBackend', 'PreTrainedTokenizerFast')
# Model types whose registered class wins over the named one (transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
_REGISTERED_WINS = {'qwen2'}
_BERT = {f'{name}_token': f'[{name.upper()}]' for name in ('pad', 'unk', 'cls', 'sep', 'mask')}
_GPT2 = {f'{name}_token': '<|endoftext|>' for name in ('unk', 'bos', 'eos')}
_ROBERTA = dict(
  bos_token='<s>', cls_token='<s>', eos_token='</s>', sep_token='</s>', unk_token='<unk>'
)
_ROBERTA |= dict(pad_token='<pad>', mask_token='<mask>')
FAMILY_DEFAULTS = {
  'bert': dict(_BERT, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True),
  'gpt2': dict(_GPT2, add_prefix_space=False),
  'roberta': dict(_ROBERTA, add_prefix_space=False, trim_offsets=True),
  't5': dict(eos_token='</s>', unk_token='<unk>', pad_token='<pad>', extra_ids=100),
  'llama': dict(
    unk_token='<unk>', bos_token='<s>', eos_token='</s>', add_prefix_space=True, legacy=False
  ),
  'qwen2': dict(_GPT2, bos_token=None, pad_token='<|endoftext|>', add_prefix_space=False),
  None: {},
}
# A class attribute rather than a constructor default: tokenizer.json's padding wins over it.
PADDING_SIDE = {'llama': 'left'}
# T5's word boundary: a split at whitespace, then '▁' before each word.
_METASPACE = dict(replacement='▁', prepend_scheme='always', split=True)
# Qwen2Tokenizer's split before the bytes: GPT-2's, but one digit at a time and no space before a word.
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
  r'|\s+(?!\S)|\s+'
)


# transformers' `clean_up_tokenization`, applied after decoding when the config asks for it.
_CLEANUPS = [(f' {s}', s) for s in ('.', '?', '!', ',')] + [(" ' ", "'")]
_CLEANUPS += [(f' {s}', s) for s in ("n't", "'m", "'s", "'ve", "'re")]


def clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
  for dirty, clean in _CLEANUPS:
    text = text.replace(dirty, clean)
  return text


def auto_class(named: str | None, model_type: str | None, byte_level) -> str | None:
  """The class ``AutoTokenizer`` picks when the tokenizer config names `named` (or None) and config.json says
  `model_type`; `byte_level()`: whether tokenizer.json mentions ``ByteLevel``."""
  registered = CLASS_OF_MODEL_TYPE.get(model_type)
  if model_type in _REGISTERED_WINS:
    return registered
  # A Llama 3 style file naming LlamaTokenizer is run as saved: that class would put Metaspace on bytes.
  if registered in BACKENDS or (
    (named or '').removesuffix('Fast') == 'LlamaTokenizer' and byte_level()
  ):
    return 'TokenizersBackend'
  return named or registered


def content(token) -> str | None:
  """A special token as written in a config: a string, or an AddedToken-like dict with its `content`."""
  return token.get('content') if isinstance(token, dict) else token


def t5_from_spiece(file: Path, config: dict) -> tokenizers.Tokenizer:
  """The Unigram that transformers converts a T5 ``spiece.model`` into: its pieces and scores, then the
  ``extra_ids`` sentinels last to first, its normalizer's charsmap. Its control pieces become the config's additional
  special tokens, as the conversion makes them."""
  pieces, charsmap = read_model(file.read_bytes())
  sentinels = [f'<extra_id_{i}>' for i in reversed(range(config['extra_ids']))]
  vocab = [(piece, score) for piece, score, _ in pieces] + [(s, 0.0) for s in sentinels]
  backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  if charsmap:
    backend.normalizer = normalizers.Precompiled(charsmap)
  config['additional_special_tokens'] = [p for p, _, kind in pieces if kind in SPECIAL_KINDS]
  return backend


def _precompiled(normalizer: dict | None):
  """T5Tokenizer keeps only the SentencePiece charsmap of a saved normalizer (a ``Sequence`` may hold it)."""
  parts = (normalizer or {}).get('normalizers') or [normalizer or {}]
  for part in parts:
    if part.get('type') == 'Precompiled' and part.get('precompiled_charsmap'):
      return normalizers.Precompiled(base64.b64decode(part['precompiled_charsmap']))
  return None


def _set_up_t5(backend: tokenizers.Tokenizer) -> None:
  if isinstance(backend.model, models.Unigram):
    state = json.loads(backend.to_str())
    vocab = [tuple(entry) for entry in state['model']['vocab']]
    backend.model = models.Unigram(
      vocab, unk_id=2, byte_fallback=False
    )  # T5Tokenizer's fixed unk id
    backend.normalizer = _precompiled(state['normalizer'])
  backend.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**_METASPACE)]
  )
  backend.decoder = decoders.Metaspace(**_METASPACE)


def _plain_bpe(bpe: models.BPE, byte_fallback: bool) -> None:
  """The BPE settings that LlamaTokenizer (`byte_fallback`) and the byte-level classes build their model with."""
  bpe.dropout = bpe.unk_token = None
  bpe.continuing_subword_prefix = bpe.end_of_word_suffix = None if byte_fallback else ''
  bpe.fuse_unk = bpe.byte_fallback = byte_fallback
  bpe.ignore_merges = False


def _set_up_llama(backend: tokenizers.Tokenizer, config: dict) -> None:
  if isinstance(backend.model, models.BPE):
    _plain_bpe(backend.model, byte_fallback=True)
  # None (as transformers 5 saves it) means the default
  prefix = config['add_prefix_space'] is not False
  # transformers' `_get_prepend_scheme`: a legacy tokenizer puts '▁' after each added token too.
  scheme = ('always' if config['legacy'] else 'first') if prefix else 'never'
  backend.normalizer = None
  backend.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement='▁', prepend_scheme=scheme, split=False
  )
  steps = [decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()]
  backend.decoder = decoders.Sequence(steps + [decoders.Strip(' ', 1, 0)] if prefix else steps)


def set_up(backend: tokenizers.Tokenizer, config: dict, family: str | None) -> None:
  """Gives `backend` the pipeline and special tokens that the transformers class of `family` gives it."""
  if family == 'bert':
    if isinstance(backend.model, models.WordPiece):
      backend.model.unk_token = content(config['unk_token'])
      backend.model.continuing_subword_prefix = '##'
      backend.model.max_input_chars_per_word = 100
    backend.normalizer = normalizers.BertNormalizer(
      clean_text=True,
      handle_chinese_chars=config['tokenize_chinese_chars'],
      strip_accents=config['strip_accents'],
      lowercase=config['do_lower_case'],
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix='##')
  elif family in ('gpt2', 'roberta', 'qwen2'):
    if isinstance(backend.model, models.BPE):
      _plain_bpe(backend.model, byte_fallback=False)
    prefix = bool(config['add_prefix_space'])
    if family == 'qwen2':
      backend.normalizer = normalizers.NFC()
      split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior='isolated', invert=False)
      backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)]
      )
    else:
      backend.normalizer = None
      backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    backend.decoder = decoders.ByteLevel()
  elif family == 't5':
    _set_up_t5(backend)
  elif family == 'llama':
    _set_up_llama(backend, config)

  # The config's special tokens that are not added tokens yet become ones (matched whole, never split).
  present = {str(t) for t in backend.get_added_tokens_decoder().values()}
  extra = config.get('extra_special_tokens') or config.get('additional_special_tokens') or []
  extra = [content(t) for t in extra]
  if family == 't5' and not any('<extra_id_' in t for t in extra):  # T5Tokenizer adds its sentinels
    extra += [f'<extra_id_{i}>' for i in range(config['extra_ids'])]
  specials = [content(config.get(f'{name}_token')) for name in SPECIAL_TOKENS] + extra
  missing = list(dict.fromkeys(t for t in specials if t and t not in present))
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

  # transformers' `update_post_processor`: bos/eos when the config asks (only without a tokenizer.json).
  if 'add_bos_token' in config or 'add_eos_token' in config:
    bos, eos = (content(config.get(f'{name}_token')) for name in ('bos', 'eos'))
    bos = [bos] if bos and config.get('add_bos_token') else []
    eos = [eos] if eos and config.get('add_eos_token') else []
    single = ' '.join([f'{t}:0' for t in bos] + ['$A:0'] + [f'{t}:0' for t in eos])
    pair = ' '.join([single] + [f'{t}:1' for t in bos] + ['$B:1'] + [f'{t}:1' for t in eos])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(bos + eos)]
    backend.post_processor = processors.TemplateProcessing(single, pair, special)
  # These classes set their template last, whatever the file or config said.
  if family == 'bert':
    cls, sep = content(config['cls_token']), content(config['sep_token'])
    ids = [backend.token_to_id(t) for t in (cls, sep)]
    special = [(cls, 2 if ids[0] is None else ids[0]), (sep, 3 if ids[1] is None else ids[1])]
    single, pair = f'{cls}:0 $A:0 {sep}:0', f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1'
    backend.post_processor = processors.TemplateProcessing(single, pair, special)
  elif family == 'roberta':
    sep, cls = content(config['sep_token']), content(config['cls_token'])
    backend.post_processor = processors.RobertaProcessing(
      (sep, backend.token_to_id(sep)),
      (cls, backend.token_to_id(cls)),
      trim_offsets=config['trim_offsets'],
      add_prefix_space=config['add_prefix_space'],
    )
  elif family == 't5':  # '</s>' as T5Tokenizer writes it, with the eos token's id
    eos = backend.token_to_id(content(config['eos_token']))
    backend.post_processor = processors.TemplateProcessing(
      single=['$A', '</s>'], pair=['$A', '</s>', '$B', '</s>'], special_tokens=[('</s>', eos)]
    )
