"""Errors raised by the analysis layer. The class, not the message, says whether to retry.

::

    AnalysisError
    ├── ImageSkipped            one image (or frame) cannot or must not be shown; the reason is
    │                           kept in the manifest and the rest of the study goes on
    └── VisionError             the vision API did not give usable findings
        ├── VisionRetryable     try the study again later: 408/409/429/5xx, timeouts, connection
        │   │                   errors, once the client's own retries are spent
        │   └── CircuitOpen     the provider failed repeatedly; no call was made
        └── VisionPermanent     retrying cannot help: 400, 401, 403, quota, text-only model
            ├── BudgetExceeded  the study's estimated cost is over the configured budget
            ├── InvalidFindings the reply, even after one repair request, is not valid findings
            └── ModelRefused    the model declined to answer (an OpenAI refusal, Anthropic
                                stop_reason "refusal", a content filter); its reason is kept
"""


class AnalysisError(Exception):
    """Base of every analysis failure."""


class ImageSkipped(AnalysisError):
    """This image is left out of what the model sees; the message says why."""


class VisionError(AnalysisError):
    """The vision API did not give usable findings."""


class VisionRetryable(VisionError):
    """A transient failure: the study may be tried again later."""


class CircuitOpen(VisionRetryable):
    """The provider failed repeatedly; calls are held off until the cool-down ends."""


class VisionPermanent(VisionError):
    """A failure that the same request will meet again."""


class BudgetExceeded(VisionPermanent):
    """The estimated cost of the study is over ``vision.max_cost_usd_per_study``."""


class InvalidFindings(VisionPermanent):
    """The model's reply is not valid findings, even after a repair request."""

    def __init__(self, message: str, raw_reply: str) -> None:
        super().__init__(message)
        self.raw_reply = raw_reply


class ModelRefused(VisionPermanent):
    """The model declined to answer; asking again the same way gets the same answer."""
