"""The built-in translation task: integers to English words ("4217" -> "four thousand two hundred seventeen").

It needs no download, has an exact answer for every source, and still exercises what translation needs: the target
is longer than the source, word order depends on the digits' positions, and rare words ("million") appear only for
long inputs.
"""

from __future__ import annotations

import numpy as np

ONES = (
  'zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen '
  'seventeen eighteen nineteen'
).split()
TENS = 'zero ten twenty thirty forty fifty sixty seventy eighty ninety'.split()
SCALES = ((10**9, 'billion'), (10**6, 'million'), (1000, 'thousand'))


def _below_thousand(n: int) -> list[str]:
  words = []
  if n >= 100:
    words += [ONES[n // 100], 'hundred']
    n %= 100
  if n >= 20:
    words.append(TENS[n // 10])
    n %= 10
  if n or not words:
    words.append(ONES[n])
  return words


def number_to_words(n: int) -> str:
  """English words for ``0 <= n < 10**12``, American style without "and": 105 -> "one hundred five"."""
  if not 0 <= n < 10**12:
    raise ValueError(f'number_to_words covers 0 .. 10**12 - 1, got {n}')
  if n == 0:
    return 'zero'
  words = []
  for value, name in SCALES:
    if n >= value:
      words += _below_thousand(n // value) + [name]
      n %= value
  if n:
    words += _below_thousand(n)
  return ' '.join(words)


def number_pairs(
  count: int, max_digits: int, seed: int, exclude: frozenset[int] = frozenset(), min_digits: int = 1
) -> list[tuple[str, str]]:
  """``count`` distinct (digits, words) pairs with ``min_digits`` to ``max_digits`` digits, not in ``exclude``.

  The number of digits is drawn uniformly first, so short numbers are as common as long ones (drawing the number
  uniformly would make almost every example ``max_digits`` long).
  """
  if not 1 <= min_digits <= max_digits <= 12:
    raise ValueError(f'need 1 <= min_digits <= max_digits <= 12, got {min_digits} and {max_digits}')
  low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
  available = 10**max_digits - low - len(exclude)
  if count > available:
    raise ValueError(
      f'cannot draw {count} distinct numbers with {min_digits} to {max_digits} digits'
    )
  rng = np.random.default_rng(seed)
  chosen: dict[int, None] = {}  # insertion-ordered set
  while len(chosen) < count:
    digits = int(rng.integers(min_digits, max_digits + 1))
    n = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))
    if n not in exclude:
      chosen[n] = None
  return [(str(n), number_to_words(n)) for n in chosen]


def number_dataset(train_size: int, val_size: int, max_digits: int, seed: int):
  """Train and validation pairs with no number in both. Validation numbers have at least three digits (when
  ``max_digits`` allows): the hundred numbers below 100 are the words every longer number is built from, and there
  are too few of them to hold any out, so training sees them all."""
  val = number_pairs(val_size, max_digits, seed + 1, min_digits=min(3, max_digits))
  train = number_pairs(train_size, max_digits, seed, exclude=frozenset(int(s) for s, _ in val))
  return train, val
