"""Typed errors raised by the engine. All are ValueError subclasses so that callers that
only know "bad input" can catch ValueError; the serving layer maps them to gRPC statuses."""

from planes.errors import InvalidRequestError  # noqa: F401  (defined there: the router raises it without the engine)


class ModelLoadError(ValueError):
    """The model name is unknown or its files cannot be read."""


class CapacityError(ValueError):
    """The request can never fit: more KV blocks than the whole pool has."""
