"""How transformers 5's tokenizer classes set up their pipeline, for :mod:`transformer_jax.tokenizer` to do the same.

transformers does not run ``tokenizer.json`` as saved for ``BertTokenizer`` and ``GPT2Tokenizer``: their constructors
rebuild the normalizer, pre-tokenizer, decoder (and BERT's post-processor) from ``tokenizer_config.json``, with the
class defaults below.
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ('pad', 'unk', 'cls', 'sep', 'mask', 'bos', 'eos')
# The classes whose constructors rebuild the pipeline, and their defaults.
FAMILY_OF_CLASS = {'BertTokenizer': 'bert', 'DistilBertTokenizer': 'bert', 'GPT2Tokenizer': 'gpt2'}
CLASS_OF_MODEL_TYPE = dict(bert='BertTokenizer', distilbert='BertTokenizer', gpt2='GPT2Tokenizer')
_BERT = {f'{name}_token': f'[{name.upper()}]' for name in ('pad', 'unk', 'cls', 'sep', 'mask')}
_GPT2 = {f'{name}_token': '<|endoftext|>' for name in ('unk', 'bos', 'eos')}
FAMILY_DEFAULTS = {
  'bert': dict(_BERT, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True),
  'gpt2': dict(_GPT2, add_prefix_space=False),
  None: {},
}


def content(token) -> str | None:
  """A special token as written in a config: a string, or an AddedToken-like dict with its `content`."""
  return token.get('content') if isinstance(token, dict) else token


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
  elif family == 'gpt2':
    if isinstance(backend.model, models.BPE):
      bpe = backend.model
      bpe.dropout = bpe.unk_token = None
      bpe.continuing_subword_prefix = bpe.end_of_word_suffix = ''
      bpe.fuse_unk = bpe.byte_fallback = bpe.ignore_merges = False
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config['add_prefix_space'])
    backend.decoder = decoders.ByteLevel()

  # The config's special tokens that are not added tokens yet become ones (matched whole, never split).
  present = {str(t) for t in backend.get_added_tokens_decoder().values()}
  extra = config.get('extra_special_tokens') or config.get('additional_special_tokens') or []
  specials = [content(config.get(f'{name}_token')) for name in SPECIAL_TOKENS]
  specials += [content(t) for t in extra]
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
  if family == 'bert':  # BertTokenizer sets its template last, whatever the file or config said
    cls, sep = content(config['cls_token']), content(config['sep_token'])
    ids = [backend.token_to_id(t) for t in (cls, sep)]
    special = [(cls, 2 if ids[0] is None else ids[0]), (sep, 3 if ids[1] is None else ids[1])]
    single, pair = f'{cls}:0 $A:0 {sep}:0', f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1'
    backend.post_processor = processors.TemplateProcessing(single, pair, special)
