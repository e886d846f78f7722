"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), verification of
their tokens in one target forward (greedy match or rejection sampling), and the
adaptive choice of how many tokens to propose."""
from engine.spec_decode.adaptive import SpecController, SpecTuning, expected_tokens
from engine.spec_decode.decoder import SpecDecoder, SpecStats
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.rejection import processed_probs, rejection_sample, verify_greedy

__all__ = ["SpecController", "SpecTuning", "expected_tokens", "SpecDecoder", "SpecStats", "NgramProposer",
           "processed_probs", "rejection_sample", "verify_greedy"]
