"""Errors raised by the analysis layer.

::

    AnalysisError
    └── ImageSkipped        one image (or frame) cannot or must not be shown; the reason is kept
                            in the manifest and the rest of the study goes on
"""


class AnalysisError(Exception):
    """Base of every analysis failure."""


class ImageSkipped(AnalysisError):
    """This image is left out of what the model sees; the message says why."""
