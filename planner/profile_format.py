"""The profile file `pdserve profile` writes and `pdserve plan` reads: JSON, version 1.

    {"version": 1, "created": "2025-01-01T00:00:00+00:00",
     "hardware": {"device": "cuda"|"cpu", "name", "count", "cpu_cores", "memory_gb"},
     "versions": {"pdserve", "torch", "triton", "python"},
     "model":    {"name", "dtype", "num_layers", "kv_bytes_per_token", "num_params", ...shape},
     "engine":   {"block_size", "max_num_batched_tokens", "max_num_seqs", "num_kv_blocks",
                  "kernel_backend", "async_scheduling", "dense_prefill"},   # dense_prefill optional
     "steps":    [{"kind", "prefill_tokens", "prefill_context", "num_prefill_seqs",
                   "decode_seqs", "decode_context", "seconds"}, ...],
     "transfer": {"backend", "points": [{"bytes", "seconds"}, ...], "notes"},
     "overheads": {"router_direct_s", "router_disaggregated_s", "per_token_stream_s", "notes",
                   "frontend_direct_s", "per_prompt_token_s", "frontend_notes",     # optional from here
                   "method", "deployed", "reference", "prompt_residual",    # deploy/deployed_probe.py
                   "path_jitter_s", "per_stream_s", "per_stream_upto", "prefill_serial_s"},
     "fit":      {"model", "form", "coefficients": {name: value}, "relative_error": {...},
                  "candidates": {...}, ...}}   # optional; "model": the form's name (costmodel.FORMS)

A step is one measured engine step. Its prefill part is a list of chunks (new tokens, tokens
of the same sequence already cached or computed before the chunk); the file keeps the sums
the cost model uses:
  - prefill_tokens: sum of new tokens;
  - prefill_context: the causal attention work, in (query, key) pairs: a chunk's i-th new
    token (1-based) attends to cached + i keys, so a chunk adds new*cached + new*(new+1)/2
    (:func:`attention_pairs`);
  - decode_context: sum over the decoded sequences of the tokens each one attends to (its
    length including the token being decoded).
Which attention kernel a step's chunks took follows from them and engine.dense_prefill (the
engine's resolved EngineConfig.dense_prefill; absent in profiles written before it was
recorded, read as off; costmodel.dense_prefill_of also reads a KV cache in another dtype than
the model's as off): with it on, a step whose chunks of more than one token all start their
sequence attends densely (on the triton backend only a step of one such chunk), any other
through the paged kernel (prefill_sums). An entry of one
chunk (every entry the step probe writes) says which: its cached tokens follow from its pairs
(entry_chunks); one of several chunks does not, and a fit then prices both paths alike.
A derived profile (CostModel.scaled, CostModel.synthetic) has no steps and carries the fit's
coefficients instead (and its form's name in fit.model; absent: "additive", as written before
there were two forms). Unknown keys are ignored (later versions may add some); every known
field is checked, and a bad one raises ValueError naming it (e.g. "profile.steps[3].seconds").
"""
from __future__ import annotations

import datetime
import json
import math
import os

VERSION = 1
MAX_PROFILE_BYTES = 64 * 2**20
MAX_STEPS = 100_000
MAX_TRANSFER_POINTS = 10_000
MAX_COEFFICIENTS = 64
MAX_STR = 256
MAX_NOTES = 4096
MAX_INT = 2**53           # integers stay exact as JSON numbers in any reader
MAX_SECONDS = 24 * 3600.0
STEP_KINDS = ("prefill", "decode", "mixed")


def attention_pairs(new_tokens: int, cached_tokens: int) -> int:
    """(query, key) pairs of causal attention for a chunk of new tokens after cached ones."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1) // 2


def prefill_sums(prefill_chunks, dense_prefill: bool, *, several_prompts: bool) -> tuple[int, int, int]:
    """(new tokens, paged attention pairs, dense attention pairs) of a step's chunks
    [(new, cached), ...], the pairs split by the path the engine takes for them, by the
    engine's rule (engine/attention_path.dense_prefill_step, over the chunks of more than
    one token; a one-token chunk runs as a decode row, the paged decode kernel, and decides
    nothing). Restated here, not imported: importing the engine loads torch, which planning
    does not need; a test holds the two equal. several_prompts: whether the profiled
    backend's dense kernel serves a step of several prompts
    (attention_path.dense_serves_several_prompts)."""
    tokens = single_pairs = multi_pairs = chunks = 0
    dense = dense_prefill
    for new, cached in prefill_chunks:   # one pass: the simulator asks this for every step
        tokens += new
        if new > 1:
            multi_pairs += attention_pairs(new, cached)
            dense = dense and cached == 0
            chunks += 1
        else:
            single_pairs += attention_pairs(new, cached)
    if dense and (chunks == 1 or (chunks > 1 and several_prompts)):
        return tokens, single_pairs, multi_pairs
    return tokens, single_pairs + multi_pairs, 0


def dense_attention_step(prefill_chunks, dense_prefill: bool, *, several_prompts: bool) -> bool:
    """Whether the engine runs this step's prefill attention densely (prefill_sums)."""
    return prefill_sums(prefill_chunks, dense_prefill, several_prompts=several_prompts)[2] > 0


def entry_chunks(entry: dict) -> list[tuple[int, int]] | None:
    """A step entry's prefill chunks [(new, cached)] where its sums determine them: none, or
    one chunk, whose cached tokens follow from its pairs (new*cached + new*(new+1)/2). None
    for several chunks (the sums do not say which had a prefix) or sums no chunk gives."""
    seqs, new, pairs = entry["num_prefill_seqs"], entry["prefill_tokens"], entry["prefill_context"]
    if seqs == 0:
        return []
    if seqs > 1:
        return None
    beyond_own = pairs - new * (new + 1) // 2
    if beyond_own < 0 or beyond_own % new:
        return None
    return [(new, beyond_own // new)]


def entry_pairs_by_path(entry: dict, dense_prefill: bool) -> tuple[int, int] | None:
    """(paged, dense) attention pairs of a step entry (prefill_sums); None where the path
    cannot be told from the entry's sums (entry_chunks) and dense prefill was on."""
    if not dense_prefill:
        return entry["prefill_context"], 0
    if entry["num_prefill_seqs"] == entry["prefill_tokens"]:   # one-token chunks only: decode rows
        return entry["prefill_context"], 0
    chunks = entry_chunks(entry)
    if chunks is None:
        return None
    _, paged_pairs, dense_pairs = prefill_sums(chunks, True, several_prompts=True)   # one chunk: either way
    return paged_pairs, dense_pairs


def step_entry(prefill_chunks, decode_contexts, seconds: float, kind: str | None = None) -> dict:
    """A `steps` item from a step's chunks [(new, cached), ...] and decode context lengths."""
    chunks = [(int(n), int(c)) for n, c in prefill_chunks]
    ctx = [int(c) for c in decode_contexts]
    if kind is None:
        kind = "mixed" if chunks and ctx else ("prefill" if chunks else "decode")
    return dict(kind=kind, prefill_tokens=sum(n for n, _ in chunks),
                prefill_context=sum(attention_pairs(n, c) for n, c in chunks), num_prefill_seqs=len(chunks),
                decode_seqs=len(ctx), decode_context=sum(ctx), seconds=float(seconds))


# ---- field checks: each names the field it rejects --------------------------------------------------
def _obj(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be an object, got {type(d).__name__}")
    return d


def _get(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where}.{key}: missing")
    return d[key]


def _int(d: dict, key: str, where: str, lo: int = 0, hi: int = MAX_INT, optional: bool = False):
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where}.{key}: must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _num(d: dict, key: str, where: str, lo: float = 0.0, hi: float = math.inf, positive: bool = False,
         optional: bool = False):
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
            or (positive and v <= 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{where}.{key}: must be {kind} finite number <= {hi}, got {v!r}")
    return float(v)


def _str(d: dict, key: str, where: str, choices=None, optional: bool = False, limit: int = MAX_STR):
    if optional and d.get(key) is None:
        return None
    v = _get(d, key, where)
    if not isinstance(v, str) or len(v) > limit or (choices is not None and v not in choices):
        want = f"one of {list(choices)}" if choices is not None else f"a string of at most {limit} characters"
        raise ValueError(f"{where}.{key}: must be {want}, got {v!r:.80}")
    return v


def _list(d: dict, key: str, where: str, limit: int) -> list:
    v = _get(d, key, where)
    if not isinstance(v, list):
        raise ValueError(f"{where}.{key}: must be a list, got {type(v).__name__}")
    if len(v) > limit:
        raise ValueError(f"{where}.{key}: at most {limit} items, got {len(v)}")
    return v


# ---- sections ------------------------------------------------------------------------------------------
MAX_RESIDUAL_POINTS = 64


def _check_prompt_residual(o: dict, where: str) -> None:
    """overheads.prompt_residual: [[uncached prompt tokens, seconds], ...], tokens strictly
    increasing (deploy/deployed_probe.py: what a deployed request of that many new tokens
    took beyond the engine's profiled steps and the fixed request path)."""
    pts = _list(o, "prompt_residual", where, MAX_RESIDUAL_POINTS)
    last = -1
    for i, pt in enumerate(pts):
        w = f"{where}.prompt_residual[{i}]"
        if not isinstance(pt, list) or len(pt) != 2:
            raise ValueError(f"{w}: must be [tokens, seconds]")
        n, sec = pt
        if isinstance(n, bool) or not isinstance(n, int) or not last < n <= MAX_INT:
            raise ValueError(f"{w}: tokens must be an integer above the previous point's and <= {MAX_INT}, "
                             f"got {n!r}")
        if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec) \
                or not 0 <= sec <= MAX_SECONDS:
            raise ValueError(f"{w}: seconds must be a non-negative finite number <= {MAX_SECONDS}, got {sec!r}")
        last = n


MAX_JITTER_QUANTILES = 101


def _check_path_jitter(o: dict, where: str) -> None:
    """overheads.path_jitter_s: {"direct" | "disaggregated": [seconds, ...]}, each 2 to 101
    non-decreasing quantiles at even steps from 0 to 100 % (deploy/deployed_probe.py: how lone
    requests scattered about the priced path; negative below its median)."""
    jit = _obj(_get(o, "path_jitter_s", where), f"{where}.path_jitter_s")
    for route, q in jit.items():
        w = f"{where}.path_jitter_s.{route}"
        if route not in ("direct", "disaggregated"):
            raise ValueError(f"{w}: unknown route (direct or disaggregated)")
        if not isinstance(q, list) or not 2 <= len(q) <= MAX_JITTER_QUANTILES:
            raise ValueError(f"{w}: must be a list of 2 to {MAX_JITTER_QUANTILES} quantiles")
        for i, v in enumerate(q):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not abs(v) <= MAX_SECONDS:
                raise ValueError(f"{w}[{i}]: must be a finite number of seconds, got {v!r}")
            if i and v < q[i - 1]:
                raise ValueError(f"{w}[{i}]: quantiles must not decrease")


def _check_step(s, where: str) -> None:
    _obj(s, where)
    _str(s, "kind", where, STEP_KINDS, optional=True)
    p = _int(s, "prefill_tokens", where)
    pc = _int(s, "prefill_context", where)
    ps = _int(s, "num_prefill_seqs", where)
    ds = _int(s, "decode_seqs", where)
    dc = _int(s, "decode_context", where)
    _num(s, "seconds", where, hi=MAX_SECONDS, positive=True)
    if p == 0 and ds == 0:
        raise ValueError(f"{where}: a step computes something: prefill_tokens or decode_seqs must be > 0")
    if (p == 0) != (ps == 0) or ps > p:
        raise ValueError(f"{where}.num_prefill_seqs: {ps} sequences for {p} prefill tokens")
    if pc < p:   # every new token attends at least to itself
        raise ValueError(f"{where}.prefill_context: {pc} is less than prefill_tokens ({p})")
    if dc < ds:
        raise ValueError(f"{where}.decode_context: {dc} is less than decode_seqs ({ds})")


def _check_transfer(t, where: str) -> None:
    _obj(t, where)
    _str(t, "backend", where)
    _str(t, "notes", where, optional=True, limit=MAX_NOTES)
    points = _list(t, "points", where, MAX_TRANSFER_POINTS)
    if not points:
        raise ValueError(f"{where}.points: at least one measured point is needed")
    for i, p in enumerate(points):
        w = f"{where}.points[{i}]"
        _obj(p, w)
        _int(p, "bytes", w, lo=1)
        _num(p, "seconds", w, hi=MAX_SECONDS, positive=True)


def _check_fit(f, where: str) -> None:
    _obj(f, where)
    _str(f, "form", where, optional=True, limit=MAX_NOTES)
    co = _obj(_get(f, "coefficients", where), f"{where}.coefficients")
    if len(co) > MAX_COEFFICIENTS:
        raise ValueError(f"{where}.coefficients: at most {MAX_COEFFICIENTS} entries")
    for k in co:
        if not isinstance(k, str) or len(k) > MAX_STR:
            raise ValueError(f"{where}.coefficients: keys must be short strings, got {k!r:.80}")
        _num(co, k, f"{where}.coefficients")


def validate_profile(d) -> dict:
    """Check a parsed profile; returns it. ValueError naming the first bad field."""
    w = "profile"
    _obj(d, w)
    v = _get(d, "version", w)
    if v != VERSION or isinstance(v, bool):
        raise ValueError(f"profile.version: this pdserve reads version {VERSION}, got {v!r}")
    created = _str(d, "created", w)
    try:
        datetime.datetime.fromisoformat(created)
    except ValueError:
        raise ValueError(f"profile.created: not an ISO 8601 time: {created!r:.80}") from None

    hw = _obj(_get(d, "hardware", w), "profile.hardware")
    _str(hw, "device", "profile.hardware", ("cuda", "cpu"))
    _str(hw, "name", "profile.hardware")
    _int(hw, "count", "profile.hardware", lo=1, hi=4096)
    _int(hw, "cpu_cores", "profile.hardware", lo=1, hi=1 << 20)
    _num(hw, "memory_gb", "profile.hardware", positive=True)

    ver = _obj(_get(d, "versions", w), "profile.versions")
    for k in ("pdserve", "torch", "triton", "python"):
        _str(ver, k, "profile.versions", optional=(k == "triton"))   # null: Triton not installed

    m = _obj(_get(d, "model", w), "profile.model")
    _str(m, "name", "profile.model")
    _str(m, "dtype", "profile.model")
    _int(m, "num_layers", "profile.model", lo=1, hi=4096)
    _int(m, "kv_bytes_per_token", "profile.model", lo=1)
    _int(m, "num_params", "profile.model", lo=1)
    for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size"):
        _int(m, k, "profile.model", lo=1, optional=True)

    e = _obj(_get(d, "engine", w), "profile.engine")
    bs = _int(e, "block_size", "profile.engine", lo=1, hi=1 << 16)
    if bs & (bs - 1):
        raise ValueError(f"profile.engine.block_size: must be a power of two, got {bs}")
    _int(e, "max_num_batched_tokens", "profile.engine", lo=1, hi=1 << 24)
    _int(e, "max_num_seqs", "profile.engine", lo=1, hi=1 << 24)
    _int(e, "num_kv_blocks", "profile.engine", lo=1, hi=1 << 32)
    _str(e, "kernel_backend", "profile.engine")
    ab = _get(e, "async_scheduling", "profile.engine")
    if not isinstance(ab, bool):
        raise ValueError(f"profile.engine.async_scheduling: must be true or false, got {ab!r}")
    dp = e.get("dense_prefill")
    if dp is not None and not isinstance(dp, bool):
        raise ValueError(f"profile.engine.dense_prefill: must be true, false or absent, got {dp!r:.80}")

    steps = _list(d, "steps", w, MAX_STEPS)
    for i, s in enumerate(steps):
        _check_step(s, f"profile.steps[{i}]")
    if d.get("fit") is not None:
        _check_fit(d["fit"], "profile.fit")
    if not steps and d.get("fit") is None:
        raise ValueError("profile.steps: empty, and no fit coefficients to stand in for them")

    _check_transfer(_get(d, "transfer", w), "profile.transfer")

    o = _obj(_get(d, "overheads", w), "profile.overheads")
    for k in ("router_direct_s", "router_disaggregated_s", "per_token_stream_s"):
        _num(o, k, "profile.overheads", hi=MAX_SECONDS)
    # Through the gRPC front end (deploy/frontend_probe.py); profiles before issue 15 lack them.
    for k in ("frontend_direct_s", "per_prompt_token_s", "frontend_cpu_per_request_s",
              "frontend_cpu_per_prompt_token_s", "frontend_cpu_per_token_s"):
        if k in o:
            _num(o, k, "profile.overheads", hi=MAX_SECONDS)
    # Concurrent streams (deploy/deployed_probe.py): per further request in a batch, up to a count.
    if "per_stream_s" in o:
        _num(o, "per_stream_s", "profile.overheads", hi=MAX_SECONDS)
    if "per_stream_upto" in o:
        _int(o, "per_stream_upto", "profile.overheads", lo=0, hi=1 << 20)
    if "prefill_serial_s" in o:
        _num(o, "prefill_serial_s", "profile.overheads", hi=MAX_SECONDS)
    if "prompt_residual" in o:
        _check_prompt_residual(o, "profile.overheads")
    if "path_jitter_s" in o:
        _check_path_jitter(o, "profile.overheads")
    _str(o, "notes", "profile.overheads", optional=True, limit=MAX_NOTES)
    _str(o, "frontend_notes", "profile.overheads", optional=True, limit=MAX_NOTES)
    # How the priced numbers were measured: "deployed" (deploy/deployed_probe.py: Ray clusters timed
    # from a gRPC client; the probes' own numbers then under "reference"), else the in-process probes.
    _str(o, "method", "profile.overheads", optional=True, limit=64)
    return d


def load_profile(path: str | os.PathLike) -> dict:
    """Read and validate a profile file (at most MAX_PROFILE_BYTES)."""
    with open(path, "rb") as f:
        data = f.read(MAX_PROFILE_BYTES + 1)
    if len(data) > MAX_PROFILE_BYTES:
        raise ValueError(f"profile {os.fspath(path)!r}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"profile {os.fspath(path)!r}: not JSON ({e})") from None
    return validate_profile(d)


def save_profile(d: dict, path: str | os.PathLike) -> None:
    """Validate, then write atomically (a reader never sees half a file)."""
    validate_profile(d)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
