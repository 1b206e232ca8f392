"""The exceptions that end a run with one line for the user (the CLI prints them; no traceback)."""


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


class InitError(Exception):
    """--init-from could not load its weights; str says why (one line)."""


class TrainingStopped(Exception):
    """The run cannot go on (e.g. repeated non-finite steps); str is the one-line reason with the fix."""
