"""Errors a client can cause or see, as first-class types.

Every module raises these; the API turns each into a JSON body
`{"error": {"type": ..., "message": ..., "field": ...}}` with the type's status code.
`field` names the request field (with a list index where it applies, e.g. `text[2]`).
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"type": self.error_type, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but a value is wrong: say which and what to send."""

    status_code = 422
    error_type = "invalid_request"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class Conflict(ServiceError):
    """The request clashes with what exists (e.g. a voice name already taken)."""

    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(ServiceError):
    """Credentials that are wrong rather than missing, e.g. a tampered or expired signed download URL."""

    status_code = 403
    error_type = "forbidden"


class ModelUnavailable(ServiceError):
    """The model cannot be found, downloaded or loaded; other models keep serving."""

    status_code = 503
    error_type = "model_unavailable"


class EngineFailed(ModelUnavailable):
    """A device fault (a CUDA error) stopped the model's engine; it is being rebuilt: retry shortly."""

    error_type = "engine_failed"
    retry_after_s = 30  # sent as Retry-After: an engine's warm-up takes about that long or more


class Overloaded(ServiceError):
    """The model's queue is full: try again after `retry_after_s` (sent as Retry-After)."""

    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class QueueUnavailable(ServiceError):
    """The job queue's broker cannot be reached: the job was not accepted; try again after `retry_after_s`."""

    status_code = 503
    error_type = "queue_unavailable"
    retry_after_s = 10


class StorageUnavailable(ServiceError):
    """The metadata database cannot be reached, or stays busy: try again after `retry_after_s`."""

    status_code = 503
    error_type = "storage_unavailable"
    retry_after_s = 5

    def __init__(self, message: str = "the server's database is unreachable or busy; retry") -> None:
        super().__init__(message)


class StorageFull(ServiceError):
    """The server's disk (or its quota) is full, so what the request had to write was not written. Not the
    client's fault; an operator frees space, or expiring files make room."""

    status_code = 507
    error_type = "storage_full"
    retry_after_s = 60

    def __init__(self, message: str = "the server's disk is full; retry later (an operator must free space)") -> None:
        super().__init__(message)


class DeadlineExceeded(ServiceError):
    """The request's own `timeout_s` passed; its work was cancelled."""

    status_code = 504
    error_type = "deadline_exceeded"
