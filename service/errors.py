"""Error kinds of the service and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc

__all__ = [
    "ServiceError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "Overloaded",
    "Unavailable",
    "DeadlineExceeded",
    "status_of",
    "HTTP_STATUS",
    "http_status",
]

# The HTTP status of each gRPC status code (the HTTP/JSON API answers from the same errors)
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 409, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status answering a call that ended with gRPC ``code``."""
    return HTTP_STATUS[code.name]


class ServiceError(Exception):
    """Base of every error the service answers with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """A request field is malformed; the message names the field and the value."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


class NotFound(ServiceError):
    """An unknown model, collection or speaker."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """The request is valid but the state does not allow it (e.g. a collection of another model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(ServiceError):
    """The work queued ahead cannot be served in time; ``retry_after_s`` is when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """Not ready yet, or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The request's deadline passed while it waited."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an exception raised while serving a request.

    ``models.audio.AudioError`` (bad audio) is a validation error; anything not known here is
    INTERNAL with a generic message (details go to the log, not to the client).
    """
    from models.audio import AudioError

    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, AudioError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
