"""The benchmarks' interleaved timing: one call of each per round, each round starting one call later, warm-up
rounds untimed, each call's own samples (the decode benchmark's bandwidth bound takes the fastest of its probe's),
medians for the rest."""

import itertools

from benchmarks import harness


def test_rounds_interleave_and_warm_up_untimed(monkeypatch):
  clock = itertools.count()
  monkeypatch.setattr(harness.time, 'perf_counter', lambda: next(clock))
  order = []

  def call_of(name, ticks):
    def call():
      order.append(name)
      for _ in range(ticks):  # each tick of the fake clock is one second of this call
        next(clock)

    return call

  samples = harness.interleaved_samples(
    [call_of('a', 1), call_of('b', 3), call_of('c', 2)], warmup=2, repeats=3, pause_s=0
  )
  # two warm-up rounds in order, then three timed ones, each starting one call later
  assert order == list('abc' * 2 + 'abc' + 'bca' + 'cab')
  # a timed call spans its own ticks plus the tick of reading the clock after it
  assert samples == [[2, 2, 2], [4, 4, 4], [3, 3, 3]]


def test_time_interleaved_is_each_calls_median(monkeypatch):
  monkeypatch.setattr(harness, 'interleaved_samples', lambda calls, **_: [[5, 2, 3], [1, 8, 9]])
  assert harness.time_interleaved([None, None]) == [3, 8]
  monkeypatch.setattr(harness, 'interleaved_samples', lambda calls, **_: [[4, 1, 3, 2]])
  assert harness.time_interleaved([None]) == [3]  # of an even count, the upper middle
