"""Typed errors raised by the engine. All are ValueError subclasses so that callers that
only know "bad input" can catch ValueError; the serving layer maps them to gRPC statuses."""


class InvalidRequestError(ValueError):
    """A request field is out of range. `field` names it so the message can be mapped 1:1."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(ValueError):
    """The model name is unknown or its files cannot be read."""


class CapacityError(ValueError):
    """The request can never fit: more KV blocks than the whole pool has."""
