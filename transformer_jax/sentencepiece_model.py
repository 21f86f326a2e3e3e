"""The parts of a SentencePiece ``.model`` file that a `tokenizers` Unigram needs, read without the sentencepiece or
protobuf packages: each piece with its score and type, and the normalizer's precompiled character map.

The file is a serialized ``ModelProto`` (sentencepiece_model.proto): field 1 holds the pieces (each a message of
``piece`` = 1, ``score`` = 2, ``type`` = 3), field 3 the ``NormalizerSpec``, whose field 2 is the charsmap.
"""

from __future__ import annotations

import struct

# SentencePiece.Type values; CONTROL (<pad>, </s>) and USER_DEFINED pieces are never split or merged.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
SPECIAL_KINDS = (CONTROL, USER_DEFINED)


def _varint(data: bytes, at: int) -> tuple[int, int]:
  """The varint at `at` and the offset after it."""
  value = shift = 0
  while True:
    byte = data[at]
    value |= (byte & 0x7F) << shift
    at, shift = at + 1, shift + 7
    if byte < 0x80:
      return value, at


def _fields(data: bytes):
  """Yields (field number, value) of a serialized message: ints for varints, bytes for the other wire types."""
  at = 0
  while at < len(data):
    key, at = _varint(data, at)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, at = _varint(data, at)
    elif wire == 2:
      size, at = _varint(data, at)
      value, at = data[at : at + size], at + size
    elif wire in (1, 5):  # fixed64, fixed32
      size = 8 if wire == 1 else 4
      value, at = data[at : at + size], at + size
    else:
      raise ValueError(f'not a SentencePiece model: protobuf wire type {wire} at byte {at}')
    yield number, value


def read_model(data: bytes) -> tuple[list[tuple[str, float, int]], bytes]:
  """``([(piece, score, type)], charsmap)`` of a serialized SentencePiece model, pieces in id order."""
  pieces, charsmap = [], b''
  for number, value in _fields(data):
    if number == 1:
      piece = dict(_fields(value))
      score = struct.unpack('<f', piece[2])[0] if 2 in piece else 0.0
      pieces.append((piece.get(1, b'').decode('utf-8'), score, piece.get(3, NORMAL)))
    elif number == 3:
      charsmap = dict(_fields(value)).get(2, b'')
  if not pieces:
    raise ValueError('not a SentencePiece model: it holds no pieces')
  return pieces, charsmap
