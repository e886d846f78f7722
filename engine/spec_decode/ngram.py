"""N-gram prompt lookup: a proposer with no model. If the sequence's last n tokens occurred
earlier in its own prompt + output, the tokens that followed that occurrence are a cheap
guess for what comes next (code edits, quoting, summaries that copy phrases)."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, max_lookback: int = 8192):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram sizes: need 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # Only the most recent tokens are searched, so a step's cost is bounded per sequence.
        self.max_lookback = max_lookback

    def propose_one(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed an earlier occurrence of the longest matching
        suffix (max_ngram down to min_ngram). [] if nothing matches."""
        if k <= 0 or len(token_ids) < self.min_ngram + 1:
            return []
        tokens = np.asarray(token_ids[-self.max_lookback:], dtype=np.int64)
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            suffix = tokens[L - n:]
            # Windows that start before the suffix itself and are followed by >= 1 token.
            windows = sliding_window_view(tokens[:L - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                # The most recent match is the likeliest to continue, but in a loop it sits
                # right before the suffix and has fewer than k tokens after it: then take
                # the latest match that has k, or failing that the earliest.
                full = hits[hits + n + k <= L]
                start = int(full[-1] if full.size else hits[0]) + n
                return tokens[start:start + k].tolist()
        return []

    def propose(self, seqs, ks: list[int]) -> list[tuple[list[int], None]]:
        """Per sequence (drafts, None): the proposal is deterministic, i.e. a point mass."""
        return [(self.propose_one(s.token_ids, k), None) for s, k in zip(seqs, ks)]

    def forget(self, seq_id: str) -> None:
        pass
