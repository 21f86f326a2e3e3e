"""Data files the way they come: JSON Lines for every task, string labels, headers, and a line number on every
malformed line; tasks that read everything before writing anything."""

import json
import os

import numpy as np
import pytest
from train_helpers import tiny_config

from train import readers
from train.tasks import build_task


def write(path, content, mode='w'):
  with open(path, mode) as f:
    f.write(content)
  return str(path)


def jsonl(path, records):
  return write(path, ''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))


# ------------------------------------------------------------------------------------------------- JSON Lines
def test_jsonl_texts_are_the_records_text_fields(tmp_path):
  path = jsonl(
    tmp_path / 'docs.jsonl', [{'text': 'first doc', 'id': 1}, {'text': 'second', 'id': 2}]
  )
  assert ''.join(readers.read_texts(path)) == 'first doc\n\nsecond\n\n'


def test_jsonl_field_names_are_configurable(tmp_path):
  path = jsonl(tmp_path / 'pairs.jsonl', [{'en': 'one', 'de': 'eins'}, {'en': 'two', 'de': 'zwei'}])
  assert readers.read_pairs(path, 'en', 'de') == [('one', 'eins'), ('two', 'zwei')]
  rows = jsonl(
    tmp_path / 'rows.jsonl', [{'review': 'fine', 'stars': 4}, {'review': 'bad', 'stars': '1'}]
  )
  assert readers.read_labelled(rows, 'review', 'stars') == [('fine', '4'), ('bad', '1')]


@pytest.mark.parametrize(
  'line, message',
  [
    ('{"text": "ok", "label": 1', r'rows.jsonl:2: not valid JSON'),
    ('["text", 1]', r'rows.jsonl:2: expected a JSON object, got list'),
    ('{"txt": "ok", "label": 1}', r"rows.jsonl:2: no field 'text' \(fields: \['label', 'txt'\]\)"),
    ('{"text": 5, "label": 1}', r"rows.jsonl:2: field 'text' must be a string, got 5"),
    (
      '{"text": "ok", "label": true}',
      r'rows.jsonl:2: a label must be a string or an integer, got true',
    ),
    (
      '{"text": "ok", "label": 1.5}',
      r'rows.jsonl:2: a label must be a string or an integer, got 1.5',
    ),
  ],
  ids=[
    'truncated',
    'not_an_object',
    'missing_field',
    'text_not_a_string',
    'bool_label',
    'float_label',
  ],
)
def test_a_malformed_jsonl_line_names_file_and_line(line, message, tmp_path):
  path = jsonl(tmp_path / 'rows.jsonl', [{'text': 'fine', 'label': 0}, line])
  with pytest.raises(ValueError, match=message):
    readers.read_labelled(path)


def test_blank_jsonl_lines_are_skipped_and_line_numbers_still_count_them(tmp_path):
  path = write(tmp_path / 'p.jsonl', '{"source": "a", "target": "b"}\n\n{"source": "c"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:3: no field 'target'"):
    readers.read_pairs(path)


def test_undecodable_bytes_name_their_line(tmp_path):
  path = write(tmp_path / 'latin1.txt', b'fine\n' * 3 + b'caf\xe9\n' + b'fine\n' * 5000, 'wb')
  with pytest.raises(ValueError, match=r'latin1.txt:4: not valid UTF-8'):
    list(readers.read_texts(path))


# ---------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
  'content, expected',
  [
    (
      'text,label\ngreat,positive\nawful,negative\n',
      [('great', 'positive'), ('awful', 'negative')],
    ),
    ('great,positive\nawful,negative\n', [('great', 'positive'), ('awful', 'negative')]),
    ('review,sentiment\ngreat,1\nawful,0\n', [('great', '1'), ('awful', '0')]),
    ('great,1\nawful, 0 \n', [('great', '1'), ('awful', '0')]),
    ('"a, quoted text",positive\n', [('a, quoted text', 'positive')]),
  ],
  ids=['named_header', 'names_no_header', 'integer_header', 'integers_no_header', 'quoted_comma'],
)
def test_csv_headers_and_labels(content, expected, tmp_path):
  assert readers.read_labelled(write(tmp_path / 'rows.csv', content)) == expected


def test_label_names_become_ids_in_sorted_order_and_survive_saving(tmp_path):
  labels = readers.LabelSet.from_labels(['positive', 'negative', 'neutral', 'negative'])
  assert labels.names == ['negative', 'neutral', 'positive']
  assert labels.encode(['positive', 'negative'], 'training') == [2, 0]
  labels.save(str(tmp_path / 'labels.json'))
  assert readers.LabelSet.load(str(tmp_path / 'labels.json')).encode(['neutral'], 'validation') == [
    1
  ]


def test_integer_labels_are_their_own_ids():
  labels = readers.LabelSet.from_labels(['1', '0', '3'])
  assert (
    labels.names is None
    and labels.encode(['3', '0'], 'training') == [3, 0]
    and labels.name(3) == '3'
  )


def test_a_validation_label_never_seen_in_training_is_named():
  labels = readers.LabelSet.from_labels(['positive', 'negative'])
  with pytest.raises(
    ValueError, match=r"the validation label\(s\) \['neutral'\] never occur in the training labels"
  ):
    labels.encode(['positive', 'neutral'], 'validation')


def test_integers_and_names_mixed_is_an_error():
  with pytest.raises(ValueError, match=r"mix integers \('1'\) and names \('negative'\)"):
    readers.LabelSet.from_labels(['1', 'negative'])


# ------------------------------------------------------------------------------------------------------ tasks
def sentiment_rows(count=60):
  names = ['negative', 'neutral', 'positive']
  return [{'text': f'{names[i % 3]} text number {i}', 'label': names[i % 3]} for i in range(count)]


def test_classify_trains_on_named_labels_and_keeps_them_with_the_run(tmp_path):
  path = jsonl(tmp_path / 'rows.jsonl', sentiment_rows())
  config = tiny_config('classify', **{'data.path': path, 'model.num_labels': 3})
  task = build_task(config, str(tmp_path / 'work'))
  assert task.labels.names == ['negative', 'neutral', 'positive']
  by_text = {r['text']: r['label'] for r in sentiment_rows()}
  assert [task.labels.name(int(t)) for t in task.val['targets']] == [
    by_text[text] for text in task.texts
  ]
  task.save()
  saved = readers.LabelSet.load(str(tmp_path / 'work' / 'labels.json'))
  assert saved.names == task.labels.names


def test_classify_names_the_label_count_to_set(tmp_path):
  path = jsonl(tmp_path / 'rows.jsonl', sentiment_rows())
  with pytest.raises(
    ValueError, match=r'has 3 labels .* model.num_labels=2: set --config.model.num_labels=3'
  ):
    build_task(tiny_config('classify', **{'data.path': path}), str(tmp_path / 'work'))


@pytest.mark.parametrize(
  'task, make_file',
  [
    ('lm', lambda d: jsonl(d / 'docs.jsonl', [{'text': 'some words of text ' * 10}] * 4)),
    ('mlm', lambda d: write(d / 'docs.txt', 'some words of text ' * 40)),
    (
      'translation',
      lambda d: jsonl(
        d / 'pairs.jsonl', [{'source': str(i), 'target': f'n{i}'} for i in range(40)]
      ),
    ),
    (
      'classify',
      lambda d: write(d / 'rows.csv', ''.join(f'text {i},{"ab"[i % 2]}\n' for i in range(40))),
    ),
  ],
)
def test_building_a_task_writes_nothing_until_saved(task, make_file, tmp_path):
  workdir = tmp_path / 'work'
  built = build_task(tiny_config(task, **{'data.path': make_file(tmp_path)}), str(workdir))
  assert not workdir.exists()
  built.save()
  assert os.path.exists(workdir / 'vocab.json')
  rebuilt = build_task(tiny_config(task, **{'data.path': built.config.data.path}), str(workdir))
  assert not rebuilt.pending  # a resumed run reuses what the first one saved
  if task in ('lm', 'mlm'):
    np.testing.assert_array_equal(rebuilt.train_tokens, built.train_tokens)
