"""The one exception type for mistakes the user can fix (a flag, a path, a config value).

main.py prints a UserError as one line, `error: ...`, and exits 1. Every other exception is a bug
(ours or a library's) and keeps its traceback. It subclasses ValueError so that code catching
ValueError around a check keeps working.
"""


class UserError(ValueError):
  """Bad input: the message names the input and the fix."""


class MissingPackageError(UserError, ImportError):
  """An optional package a chosen feature needs is not installed; the message says what to install."""


class UserPathError(UserError, OSError):
  """A path the user gave cannot be used (e.g. an unwritable --workdir)."""


def describe_exception(e: BaseException) -> str:
  """'Type: first non-empty line of the message' for a one-line report; never raises (an exception's
  message may be empty, or only blank lines)."""
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:200] if lines else '(no message)'}"
