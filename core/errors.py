"""Errors shared across stages.

:class:`UserError` and its subclasses carry a message that alone tells the user what to
fix (the file, key or record and what is wrong with it): the command line prints it as
one line and exits non-zero, without a traceback unless ``--debug``.
"""


class UserError(Exception):
    """A known error whose message names the file, key or record at fault."""


class ConfigError(UserError, ValueError):
    """A settings file or ``HYPERREC_*`` variable that cannot be read or does not validate."""


class InputFileError(UserError, ValueError):
    """An input file or directory that is missing, empty, of an unsupported format or
    without the columns a table needs."""


class DataQualityError(RuntimeError):
    """The data is bad, so retrying the task cannot help: the pipeline run must stop."""
