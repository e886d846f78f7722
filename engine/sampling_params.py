"""Per-request sampling parameters: defined in :mod:`planes.sampling_params` (the router
and the request plane use them without loading the engine); re-exported here so the
engine's API is unchanged."""
from planes.sampling_params import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,  # noqa: F401
                                    SamplingParams)

__all__ = ["SamplingParams"]
