"""The one exception type for mistakes the user can fix (a flag, a path, a config value).

main.py prints a UserError as one line, `error: ...`, and exits 1. Every other exception is a bug
(ours or a library's) and keeps its traceback. It subclasses ValueError so that code catching
ValueError around a check keeps working.
"""


class UserError(ValueError):
  """Bad input: the message names the input and the fix."""
