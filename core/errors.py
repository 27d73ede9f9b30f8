"""Errors shared across stages."""


class DataQualityError(RuntimeError):
    """The data is bad, so retrying the task cannot help: the pipeline run must stop."""
