"""Errors a user can cause or meet, reported as one line (no traceback) by the command line.
DataError (a mistake in the input, exit 2) lives with the data schema: shared/data/schema.py."""


class RunFailed(RuntimeError):
    """A run started but produced nothing usable (for example: no round trained). Exit 1."""


class BundleError(Exception):
    """A model bundle that cannot be used: missing, torn, tampered with, or of another format
    (shared/bundle.py). Exit 2."""


class UserFileError(ValueError):
    """A file the user gave (a certificate, a key, a device store) that cannot be used; the message
    names the file and what to do. The CLI prints it as one line, exit 2."""


class RunMismatch(UserFileError):
    """An output folder holds a run with another configuration: resuming it would mix two runs."""
