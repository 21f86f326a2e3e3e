"""Reading data files: plain text, ``source<TAB>target`` TSV, ``text,label`` CSV/TSV and JSON Lines for every task.

Every reader checks what it reads and raises a ``ValueError`` (or ``FileNotFoundError``) whose message starts with
``file:line:`` where a line is at fault, before anything is trained or written. A ``.jsonl`` file holds one JSON
object per line; which fields hold the text, label, source and target is set in ``config.data`` (``text_field``,
``label_field``, ``source_field``, ``target_field``).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from typing import Iterator

BUILTIN = 'builtin'
LABELS_FILE = 'labels.json'  # a classification run's label names, in its workdir
# texts are read and tokenized about a megabyte at a time, so memory stays flat
CHUNK_CHARS = 1 << 20
_INTEGER = re.compile(r'[+-]?\d+')


def is_jsonl(path: str) -> bool:
  return path.endswith('.jsonl')


# ----------------------------------------------------------------------------------------------------------- lines
def _lines(path: str) -> Iterator[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'data file {path} does not exist' if not os.path.exists(path) else f'{path} is not a file'
    )
  try:
    with open(path, encoding='utf-8', newline='') as f:
      yield from f
  except UnicodeDecodeError as e:
    raise ValueError(
      f'{path}:{_first_undecodable_line(path)}: not valid UTF-8 text ({e.reason}); save the file as '
      'UTF-8'
    ) from None


def _first_undecodable_line(path: str) -> int:
  """The line the decoder choked on (it reads ahead in blocks, so its own position says little)."""
  with open(path, 'rb') as f:
    for number, line in enumerate(f, 1):
      try:
        line.decode('utf-8')
      except UnicodeDecodeError:
        return number
  return 0


def read_jsonl(path: str, fields: tuple[str, ...]) -> Iterator[tuple[int, tuple]]:
  """``(line number, values of fields)`` for each non-blank line of a JSON Lines file."""
  for number, line in enumerate(_lines(path), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{number}: not valid JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(record, dict):
      raise ValueError(f'{path}:{number}: expected a JSON object, got {type(record).__name__}')
    missing = [name for name in fields if name not in record]
    if missing:
      raise ValueError(
        f'{path}:{number}: no field {missing[0]!r} (fields: {sorted(record)}); set the '
        'data.*_field options to the names this file uses'
      )
    yield number, tuple(record[name] for name in fields)


def _string(path: str, number: int, field: str, value) -> str:
  if not isinstance(value, str):
    raise ValueError(
      f'{path}:{number}: field {field!r} must be a string, got {json.dumps(value)[:40]}'
    )
  return value


# ------------------------------------------------------------------------------------------------------------ text
def text_files(path: str) -> list[str]:
  """The files a text source names: one file, or every file under a folder (sorted, hidden ones skipped)."""
  if os.path.isdir(path):
    files = sorted(
      f
      for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
      if os.path.isfile(f) and not os.path.basename(f).startswith('.')
    )
    if not files:
      raise ValueError(f'the folder {path} holds no files')
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f'data file {path} does not exist')
  return [path]


def builtin_corpus() -> str:
  """The Python reference documentation that ships with every Python (``pydoc_data.topics``), about 0.5 MB."""
  from pydoc_data.topics import topics

  return '\n\n'.join(topics[k] for k in sorted(topics))


def _file_chunks(name: str, text_field: str) -> Iterator[str]:
  if is_jsonl(name):  # one document per record, separated by a blank line
    for number, (text,) in read_jsonl(name, (text_field,)):
      yield _string(name, number, text_field, text) + '\n\n'
    return
  chunk, size = [], 0
  for line in _lines(name):
    chunk.append(line)
    size += len(line)
    if size >= CHUNK_CHARS:
      yield ''.join(chunk)
      chunk, size = [], 0
  if chunk:
    yield ''.join(chunk)


def read_texts(path: str, text_field: str = 'text') -> Iterator[str]:
  """Yields the UTF-8 text of ``path`` (a file, a folder, or ``'builtin'``) in chunks of whole lines; the records'
  ``text_field`` for ``.jsonl`` files.

  Raises ``ValueError`` naming the file for undecodable bytes or when the source holds no text at all.
  """
  if path == BUILTIN:
    yield builtin_corpus()
    return
  empty = True
  for name in text_files(path):
    for chunk in _file_chunks(name, text_field):
      empty = empty and not chunk.strip()
      yield chunk
  if empty:
    raise ValueError(f'the text source {path} is empty')


# ------------------------------------------------------------------------------------------------------ examples
def read_pairs(
  path: str, source_field: str = 'source', target_field: str = 'target'
) -> list[tuple[str, str]]:
  """``source<TAB>target`` lines of a UTF-8 file (blank lines skipped), or the two fields of a ``.jsonl`` file."""
  if is_jsonl(path):
    pairs = [
      (_string(path, n, source_field, s), _string(path, n, target_field, t))
      for n, (s, t) in read_jsonl(path, (source_field, target_field))
    ]
  else:
    pairs = []
    for number, line in enumerate(_lines(path), 1):
      if not line.strip():
        continue
      if '\t' not in line:
        raise ValueError(f'{path}:{number}: no tab in this line; expected "source<TAB>target"')
      source, target = line.rstrip('\r\n').split('\t', 1)
      pairs.append((source, target))
  if not pairs:
    raise ValueError(f'{path} holds no source/target pairs')
  return pairs


def _label_text(path: str, number: int, label) -> str:
  """A label as its canonical string: ``"3"`` for ``3`` or ``" 3 "``; names are kept as written (stripped)."""
  if isinstance(label, bool) or not isinstance(label, (str, int)):
    raise ValueError(
      f'{path}:{number}: a label must be a string or an integer, got {json.dumps(label)[:40]}'
    )
  return (
    str(int(label))
    if isinstance(label, int) or _INTEGER.fullmatch(label.strip())
    else label.strip()
  )


def read_labelled(
  path: str, text_field: str = 'text', label_field: str = 'label'
) -> list[tuple[str, str]]:
  """``(text, label)`` rows of a CSV (or a TSV, by extension) of ``text,label`` rows, or of a ``.jsonl`` file.

  Labels come back as strings, integers in canonical form (see :class:`LabelSet`). The first CSV row is a header
  when its label cell reads ``label_field``, or when it alone of all rows has a label that is not an integer.
  """
  if is_jsonl(path):
    rows = [
      (_string(path, n, text_field, text), _label_text(path, n, label))
      for n, (text, label) in read_jsonl(path, (text_field, label_field))
    ]
  else:
    delimiter = '\t' if path.endswith('.tsv') else ','
    rows, numbers = [], []
    for number, row in enumerate(csv.reader(_lines(path), delimiter=delimiter), 1):
      if not row:
        continue
      if len(row) < 2:
        raise ValueError(f'{path}:{number}: expected "text{delimiter}label", got {row!r}')
      rows.append((delimiter.join(row[:-1]), _label_text(path, number, row[-1])))
      numbers.append(number)
    if rows and numbers[0] == 1 and _is_header(rows, label_field):
      rows = rows[1:]
  if not rows:
    raise ValueError(f'{path} holds no text/label rows')
  return rows


def _is_header(rows: list[tuple[str, str]], label_field: str) -> bool:
  first = rows[0][1]
  if first.lower() == label_field.lower():
    return True
  return (
    len(rows) > 1
    and not _INTEGER.fullmatch(first)
    and all(_INTEGER.fullmatch(label) for _, label in rows[1:])
  )


class LabelSet:
  """Class ids of a classification run. Integer labels are their own ids; names (``positive``, ``negative``...)
  become ids in sorted order, taken from the training rows and saved with the run as ``labels.json``."""

  def __init__(self, names: list[str] | None):
    self.names = None if names is None else list(names)
    self.ids = None if names is None else {name: i for i, name in enumerate(self.names)}

  @classmethod
  def from_labels(cls, labels) -> 'LabelSet':
    labels = set(labels)
    numbers = sorted(label for label in labels if _INTEGER.fullmatch(label))
    if not numbers:
      return cls(sorted(labels))
    if len(numbers) < len(labels):
      names = sorted(labels - set(numbers))
      raise ValueError(
        f'the training labels mix integers ({numbers[0]!r}) and names ({names[0]!r}); use one or '
        'the other'
      )
    return cls(None)

  def encode(self, labels, split: str) -> list[int]:
    if self.ids is None:
      unnamed = sorted({label for label in labels if not _INTEGER.fullmatch(label)})
      if unnamed:
        raise ValueError(
          f'the {split} labels {unnamed[:5]} are not integers, but the run was set up with integer '
          'labels; use a new workdir'
        )
      return [int(label) for label in labels]
    unseen = sorted(set(labels) - set(self.ids))
    if unseen:
      raise ValueError(
        f'the {split} label(s) {unseen[:5]} never occur in the training labels {self.names}'
      )
    return [self.ids[label] for label in labels]

  def name(self, class_id: int) -> str:
    return str(class_id) if self.names is None else self.names[class_id]

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'names': self.names}, f, ensure_ascii=False)

  @classmethod
  def load(cls, path: str) -> 'LabelSet':
    with open(path, encoding='utf-8') as f:
      return cls(json.load(f)['names'])
