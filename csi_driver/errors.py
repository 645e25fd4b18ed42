"""The one place that maps core errors to gRPC status codes, and the error type services raise."""

from __future__ import annotations

import grpc

from modelcache.errors import Kind, ModelCacheError

CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.INTEGRITY: grpc.StatusCode.DATA_LOSS,
    Kind.UNSAFE_CONTENT: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class CsiError(Exception):
    """An RPC failure with its gRPC code and a message for humans (details stay empty, as the spec asks)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def from_core(exc: ModelCacheError, context: str = "") -> CsiError:
    """The :class:`CsiError` for a core error, its message prefixed with ``context``."""
    message = f"{context}: {exc}" if context else str(exc)
    return CsiError(CODES.get(exc.kind, grpc.StatusCode.INTERNAL), message)


def invalid(message: str) -> CsiError:
    """INVALID_ARGUMENT."""
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)
