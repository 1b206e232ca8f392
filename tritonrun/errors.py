"""The exceptions that end a run with one line for the user (the CLI prints them; no traceback)."""


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


class InitError(Exception):
    """--init-from could not load its weights; str says why (one line)."""


class TrainingStopped(Exception):
    """The run cannot go on (e.g. repeated non-finite steps); str is the one-line reason with the fix."""


class WriteFailed(UserError, OSError):
    """A file could not be written (full disk, read-only file system, no permission): str names the path, the
    bytes it needs, the free space and the fix. Nothing half-written is left under the file's name. Also an
    OSError, so that code which already handled a failed write (a cache that only costs a re-run) still does."""
