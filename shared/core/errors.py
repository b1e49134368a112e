"""The one error tree of Syncline: every failure is either retriable or permanent, with an operator reason.

    SyncError                         base; carries `reason` (short code) and `detail` (actionable text)
    ├── RetriableError                try again later: the cause is expected to go away by itself
    │   ├── ThrottledError            429 / service protection; `retry_after` seconds when the server said
    │   ├── TransientError            5xx, timeouts, connection resets, 498/499 after a failed refresh
    │   ├── AmbiguousWriteError       the write may have been applied (e.g. 504); re-check before retrying
    │   ├── ParentPendingError        a parent record has no target id yet; the child waits
    │   ├── RecordBusyError           another process holds the record's lease; try again shortly
    │   └── AuthError                 credentials rejected even after one refresh: a rotation or consent
    │                                 takes minutes to land, so it is retried on the queue like any failure
    │                                 and dead-letters only when it lasts every allowed attempt
    └── PermanentError                retrying cannot help; dead-letter with the reason
        ├── SpecError                 a flow spec is invalid (file, path, problem)
        ├── EnvelopeError             a queue message or webhook body is malformed
        ├── MappingError              a value cannot be translated (unmapped choice, bad unit, bad geometry)
        ├── ValidationError           a required field is missing or a value breaks a rule
        ├── RejectedError             the target refused the record (4xx other than throttling)
        └── ParentMissingError        a parent never arrived within the wait budget

Triggers map `RetriableError` to "abandon / schedule again" and `PermanentError` to "dead-letter with
`reason` as DeadLetterReason and `detail` as DeadLetterErrorDescription". Reasons are stable codes listed
in `REASONS`; the operations runbook has one entry per code.
"""

from __future__ import annotations

from typing import Any, ClassVar

#: Every reason code the code base can produce, with a one-line meaning (the runbook expands each).
REASONS: dict[str, str] = {
    "THROTTLED": "The target system asked us to slow down (429 / service protection limit).",
    "TRANSIENT": "A network error, timeout or 5xx from the target system.",
    "AMBIGUOUS_WRITE": "The target may have applied the write (e.g. 504); it is re-checked before retrying.",
    "PARENT_PENDING": "The parent record has not been synced yet; the child waits for it.",
    "RECORD_BUSY": "Another process (a webhook, another instance) is writing the record; retried shortly.",
    "SPEC_INVALID": "A flow spec file is invalid.",
    "ENVELOPE_INVALID": "A queue message or webhook body is malformed.",
    "UNKNOWN_FLOW": "The message names a flow that the loaded specs do not define.",
    "UNMAPPED_CHOICE": "A choice / coded value has no entry in the flow's value map.",
    "MAPPING_FAILED": "A value could not be translated (unit, date, geometry, type).",
    "REQUIRED_FIELD_MISSING": "A field the target requires is empty in the source record.",
    "AUTH_FAILED": "The target rejected our credentials even after a token refresh.",
    "TARGET_REJECTED": "The target refused the record (validation or business rule in the target).",
    "PARENT_MISSING": "The parent record never arrived within the wait budget.",
    "MAX_DELIVERY_EXCEEDED": "A retriable failure persisted for every allowed delivery attempt.",
}


class SyncError(Exception):
    """Base of every Syncline failure: a stable `reason` code plus actionable `detail` text."""

    retriable: ClassVar[bool] = False
    default_reason: ClassVar[str] = "TRANSIENT"

    def __init_subclass__(cls, *, reason: str | None = None, **kwargs: Any) -> None:
        # A kind of failure is its place in the tree and its code: `class X(Parent, reason="CODE")`.
        super().__init_subclass__(**kwargs)
        if reason is not None:
            cls.default_reason = reason

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason or self.default_reason
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}; add it to REASONS and the runbook")
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class RetriableError(SyncError, reason="TRANSIENT"):
    """The failure is expected to clear by itself; the change is retried later."""

    retriable = True


class ThrottledError(RetriableError, reason="THROTTLED"):
    """The target throttled us; `retry_after` holds the server's advice in seconds, when given."""

    def __init__(self, detail: str, *, retry_after: float | None = None, reason: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after = retry_after


class TransientError(RetriableError, reason="TRANSIENT"):
    """A network error, timeout or server-side 5xx."""


class AmbiguousWriteError(RetriableError, reason="AMBIGUOUS_WRITE"):
    """The write may have been applied; the retry path must look the record up before writing again."""


class ParentPendingError(RetriableError, reason="PARENT_PENDING"):
    """A parent has no target id yet; the child is deferred, not failed."""


class RecordBusyError(RetriableError, reason="RECORD_BUSY"):
    """Another process holds the record's lease: nothing was done; retried shortly, never a failed attempt."""


class AuthError(RetriableError, reason="AUTH_FAILED"):
    """Credentials were rejected even after a refresh; retried with the queue's backoff, alarmed when sustained."""


class PermanentError(SyncError, reason="TARGET_REJECTED"):
    """Retrying cannot help; the change is dead-lettered with its reason."""

    retriable = False


class SpecError(PermanentError, reason="SPEC_INVALID"):
    """A flow spec is invalid; the message names the file, the path inside it and the problem."""


class EnvelopeError(PermanentError, reason="ENVELOPE_INVALID"):
    """A queue message or webhook body is malformed."""


class MappingError(PermanentError, reason="MAPPING_FAILED"):
    """A value cannot be translated into the target's representation."""


class ValidationError(PermanentError, reason="REQUIRED_FIELD_MISSING"):
    """A record breaks a rule of the flow (for example a required field is empty)."""


class RejectedError(PermanentError, reason="TARGET_REJECTED"):
    """The target system refused the record."""


class ParentMissingError(PermanentError, reason="PARENT_MISSING"):
    """The parent never arrived within the wait budget."""
