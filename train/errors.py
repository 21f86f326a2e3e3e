"""How the command-line entry points fail: one message that names the problem, a non-zero exit, no traceback.

A user's mistake (a flag, a config value, a data file, a workdir of another run, an unreadable checkpoint) raises
``ValueError`` or ``OSError`` (``FileNotFoundError``, ``PermissionError``...) somewhere below, and a run that had to
stop raises :class:`RunStopped`; :func:`run_main` turns each into ``error: <message>`` and exit status 1. Anything
else is a bug: it gets one line too, with the way to see the whole traceback for a report: ``--verbose`` or
``TRANSFORMER_JAX_VERBOSE=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags

VERBOSE_ENV = 'TRANSFORMER_JAX_VERBOSE'
INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C

flags.DEFINE_bool(
  'verbose',
  False,
  f'Show the full traceback of an error, for a bug report (or set {VERBOSE_ENV}=1).',
)


class RunStopped(RuntimeError):
  """The run stopped for a reason the user can act on (the message says which)."""


USER_ERRORS = (ValueError, OSError, RunStopped)


def first_line(error: Exception) -> str:
  """The first line of an error's message (its type's name when it has none)."""
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def unknown_field(error: Exception, argv: list[str]) -> str:
  """The message for an override of a config field that does not exist. ml_collections raises a bare
  ``AttributeError``/``KeyError`` naming the last part of the path, when the flag is defined or parsed."""
  key = str(error).strip('"\'')
  named = [arg.split('=')[0] for arg in argv if key in arg.split('=')[0].split('.')[1:]]
  return f'error: no config field {named[0] if named else repr(key)}; --helpfull lists the fields'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (give it to ``app.run(main, flags_parser=parse_flags)``), with every mistake on one line:
  a bad value, an unknown ``--config.`` field (ml_collections raises a bare ``AttributeError`` for those), a config
  file that does not load."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e} (--helpfull lists the flags)')
  except (AttributeError, KeyError) as e:
    sys.exit(unknown_field(e, argv))
  if 'config' in flags.FLAGS:
    try:
      flags.FLAGS.config.to_dict()  # a file that failed to load fails here, with a message of several lines
    except Exception as e:  # noqa: BLE001
      reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      sys.exit(
        f'error: cannot load the config file {flags.FLAGS["config"].config_filename}: {reason}'
      )
  if len(rest) > 1:
    sys.exit(
      f'error: unexpected arguments {rest[1:]}; set config fields as --config.<field>=<value>'
    )
  return rest


def run_main(main: Callable[[], None]) -> None:
  """Calls ``main()`` (flags already parsed) and exits with one clean message on an error, unless ``--verbose`` or
  the environment asks for the traceback."""
  show_traceback = flags.FLAGS.verbose or os.environ.get(VERBOSE_ENV, '') not in ('', '0')
  try:
    main()
  except KeyboardInterrupt:
    if show_traceback:
      raise
    print('interrupted', file=sys.stderr)
    sys.exit(INTERRUPTED)
  except USER_ERRORS as e:
    if show_traceback:
      raise
    sys.exit(f'error: {e}')
  except Exception as e:  # noqa: BLE001  (a bug: still one line, and the way to the details)
    if show_traceback:
      raise
    sys.exit(
      f'internal error: {type(e).__name__}: {first_line(e)}\n'
      f'rerun with --verbose (or {VERBOSE_ENV}=1) for the traceback, and please report it'
    )
