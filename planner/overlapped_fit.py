"""The "overlapped" form of a step's time: host work and device work run side by side, and
the step lasts as long as the longer of the two.

    t      = step_s + max(host, device)
    host   = graph_host_s * [no prefill chunk]          replaying a captured decode graph
           + eager_host_s * [a prefill chunk]            launching an eager step kernel by kernel
           + mixed_host_s * [a chunk and decodes]        the eager path's extra inputs for decodes
    device = max(weights_s + decode_s_per_context_token*K + decode_seq_s*D,   memory bound
                 per_token_s*(P+D) + attention_s_per_pair*A                    compute bound
                 + dense_attention_s_per_pair*A_dense)

(P prefill tokens with A attention pairs through the paged kernel and A_dense through dense
attention, D decoded sequences attending to K tokens; costmodel.py says which pairs are which.)

Why: with overlapped scheduling the engine launches step n+1 while the device runs step n, and
an eager (prefill-containing) step's launches themselves overlap its kernels, so a step costs
whichever is longer: the host's launches or the device's work. A small eager step is
launch-bound (its time flat in tokens); a long chunk is compute bound; a decode step is a
weight (and KV) read. Each host constant belongs to one kind of step only, so the three are
identifiable from the profile's prefill, decode and mixed points separately.

The fit (:func:`fit`) minimises relative residuals: the max() makes the model piecewise
linear, so it alternates between assigning each point to the branch that wins for it and
solving non-negative least squares with those branches fixed, from several starting
assignments (by kind of step and chunk size, and a few seeded random ones), keeping the best.
"""
from __future__ import annotations

import numpy as np

from planner.profile_format import entry_pairs_by_path

NAME = "overlapped"
COEFFICIENTS = ("step_s", "graph_host_s", "eager_host_s", "mixed_host_s", "weights_s",
                "decode_s_per_context_token", "decode_seq_s", "per_token_s", "attention_s_per_pair",
                "dense_attention_s_per_pair")
FORM = ("step_s + max(graph_host_s*[S=0] + eager_host_s*[S>0] + mixed_host_s*[S>0,D>0], "
        "max(weights_s + decode_s_per_context_token*K + decode_seq_s*D, per_token_s*(P+D) + attention_s_per_pair*A "
        "+ dense_attention_s_per_pair*A_dense))")

_HOST, _MEMORY, _COMPUTE = 0, 1, 2
_RANDOM_STARTS = 12
_MAX_ROUNDS = 60


def _branch_rows(prefill_seqs, prefill_tokens, paged_pairs, dense_pairs, decode_seqs, context) -> np.ndarray:
    """[3, n, len(COEFFICIENTS)]: each branch's features (step_s is in all three)."""
    one = np.ones_like(prefill_tokens, dtype=float)
    z = np.zeros_like(one)
    eager = (prefill_seqs > 0).astype(float)
    mixed = eager * (decode_seqs > 0)
    host = np.column_stack([one, 1 - eager, eager, mixed, z, z, z, z, z, z])
    memory = np.column_stack([one, z, z, z, one, context, decode_seqs, z, z, z])
    compute = np.column_stack([one, z, z, z, z, z, z, prefill_tokens + decode_seqs, paged_pairs, dense_pairs])
    return np.stack([host, memory, compute])


def rows_from_steps(steps: list[dict], paged_pairs: np.ndarray,
                    dense_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The branches' rows and the measured seconds; the steps' attention pairs come split by
    path (costmodel.attention_split)."""
    col = lambda k: np.array([float(s[k]) for s in steps])   # noqa: E731
    return (_branch_rows(col("num_prefill_seqs"), col("prefill_tokens"), paged_pairs, dense_pairs,
                         col("decode_seqs"), col("decode_context")), col("seconds"))


def _solve(rows: np.ndarray, y: np.ndarray, assign: np.ndarray, nnls) -> tuple[float, np.ndarray]:
    """Alternate branch assignment and NNLS from one start; the best (error, coefficients) seen."""
    w = 1.0 / y
    idx = np.arange(len(y))
    best = (np.inf, np.zeros(rows.shape[2]))
    for _ in range(_MAX_ROUNDS):
        x = nnls(rows[assign, idx] * w[:, None], np.ones_like(y))
        pred = (rows @ x).max(axis=0)
        err = float(np.sum((pred * w - 1.0) ** 2))
        if err < best[0] - 1e-15:
            best = (err, x)
        new = np.argmax(rows @ x, axis=0)
        if np.array_equal(new, assign):
            break
        assign = new
    return best


def fit(steps: list[dict], nnls, paged_pairs: np.ndarray, dense_pairs: np.ndarray) -> dict[str, float]:
    """The coefficients (non-negative) that best fit the measured steps, relative residuals.
    A path no step took leaves its attention coefficient at zero (the caller fills it in)."""
    rows, y = rows_from_steps(steps, paged_pairs, dense_pairs)
    prefill_seqs = np.array([s["num_prefill_seqs"] for s in steps])
    tokens = np.array([s["prefill_tokens"] for s in steps])
    decode_work = np.array([s["decode_context"] for s in steps], dtype=float)
    # Starts: prefill chunks from some size up compute bound, the rest launch-bound; decode
    # steps memory bound, or the smallest of them (a share by context) bound by the host.
    decode_cuts = [-1.0] + [float(np.quantile(decode_work[prefill_seqs == 0], q)) for q in (0.25, 0.5)
                            if (prefill_seqs == 0).any()]
    starts = [np.where(prefill_seqs == 0, np.where(decode_work <= d, _HOST, _MEMORY),
                       np.where(tokens >= t, _COMPUTE, _HOST))
              for t in (0, 256, 512, 1024, 2048, np.inf) for d in decode_cuts]
    starts.append(np.where(prefill_seqs == 0, _HOST, _COMPUTE))
    rng = np.random.default_rng(0)     # seeded: the same profile always fits the same
    starts += [rng.integers(0, 3, len(y)) for _ in range(_RANDOM_STARTS)]
    _, x = min((_solve(rows, y, a.astype(int), nnls) for a in starts), key=lambda r: r[0])
    return {k: float(v) for k, v in zip(COEFFICIENTS, x)}


def parts(c: dict[str, float], prefill_tokens: float, paged_pairs: float, dense_pairs: float, num_chunks: int,
          decode_seqs: int, context: float) -> tuple[float, float, float]:
    """(step_s, host, device) of one step; its time is step_s + max(host, device)."""
    if num_chunks:
        host = c["eager_host_s"] + (c["mixed_host_s"] if decode_seqs else 0.0)
    else:
        host = c["graph_host_s"]
    memory = c["weights_s"] + c["decode_s_per_context_token"] * context + c["decode_seq_s"] * decode_seqs
    compute = (c["per_token_s"] * (prefill_tokens + decode_seqs) + c["attention_s_per_pair"] * paged_pairs
               + c["dense_attention_s_per_pair"] * dense_pairs)
    return c["step_s"], host, max(memory, compute)


def predict_entry(c: dict[str, float], s: dict, dense_prefill: bool = False) -> float:
    """A profile entry's predicted seconds (dense_prefill: the profiled engine's setting; an
    entry whose path its sums do not tell is priced as paged)."""
    paged_pairs, dense_pairs = entry_pairs_by_path(s, dense_prefill) or (s["prefill_context"], 0)
    serial, host, device = parts(c, s["prefill_tokens"], paged_pairs, dense_pairs, s["num_prefill_seqs"],
                                 s["decode_seqs"], s["decode_context"])
    return serial + max(host, device)
