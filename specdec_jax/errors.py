"""The one exception type that entry points turn into a single error line."""


class UserError(ValueError):
  """Bad input from the user: reported as one line, exit status 2."""
