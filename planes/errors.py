"""The bad-input error shared by the router and the engine: a ``ValueError`` naming the
field, raised by :meth:`planes.sampling_params.SamplingParams.validate` and by the engine's
checks; the serving layer maps it to INVALID_ARGUMENT / HTTP 400. Re-exported by
:mod:`engine.errors` (and ``engine``) with the engine's other errors."""


class InvalidRequestError(ValueError):
    """A request field is out of range. `field` names it so the message can be mapped 1:1."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
