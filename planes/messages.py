"""The two hot-path planes between the router and the workers (ZeroMQ + msgpack).

  request plane  router -> decode worker, decode worker -> prefill worker (PUSH -> PULL)
  token plane    decode worker -> router: one message per engine step (PUSH -> PULL)

Every message is one msgpack map with `v` (protocol version) and `type`. No pickle.
Decoders check size, version, type and every field before building anything, and raise
PlaneError (a ValueError) on anything malformed; receivers log and drop such messages.

Memory: a message is at most MAX_MESSAGE_BYTES (the receiving sockets' ZMQ_MAXMSGSIZE,
checked again here), and msgpack is unpacked into tuples (maps into tuples of pairs, the
empty ones shared), so the Python objects one hostile message can make are bounded by
about 45x its size (lists and dicts would be about 72x: an empty container costs 56-64
bytes for 1 byte on the wire). tests/test_fuzz_planes.py measures it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import msgpack

from planes.sampling_params import SamplingParams

VERSION = 1
MAX_MESSAGE_BYTES = 16 << 20      # a token batch or a request; prompts are bounded far below
MAX_PROMPT_TOKENS = 1 << 20
MAX_ITEMS = 4096
MAX_ID_CHARS = 256


class PlaneError(ValueError):
    pass


# ---- helpers -----------------------------------------------------------------------------------

def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


class _Pairs(tuple):
    """A msgpack map as unpack decodes it: a tuple of (key, value) pairs."""
    __slots__ = ()


_NO_PAIRS = _Pairs()


def _pairs(pairs: list) -> _Pairs:
    return _Pairs(pairs) if pairs else _NO_PAIRS   # one shared empty map: 1 wire byte costs 8


def _map(v, what: str, max_keys: int = 64) -> dict:
    """A decoded msgpack map (see unpack) -> dict."""
    if type(v) is dict:          # callers may pass already-built dicts (params_from_wire)
        pairs = list(v.items())
    elif type(v) is _Pairs:
        pairs = list(v)
    else:
        raise PlaneError(f"{what}: expected a map, got {type(v).__name__}")
    if len(pairs) > max_keys or any(type(k) is not str for k, _ in pairs):
        raise PlaneError(f"{what}: expected a map of at most {max_keys} string keys")
    return dict(pairs)


def unpack(buf: bytes) -> dict:
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise PlaneError(f"message is not bytes ({type(buf).__name__})")
    if len(buf) > MAX_MESSAGE_BYTES:
        raise PlaneError(f"message of {len(buf)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        # Tuples, and maps as tuples of pairs: see the module docstring (memory bound).
        msg = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=False, object_pairs_hook=_pairs,
                              max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES,
                              max_array_len=MAX_PROMPT_TOKENS, max_map_len=64, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PlaneError(f"undecodable message: {type(e).__name__}: {_short(str(e))}") from None
    msg = _map(msg, "message")
    if type(msg.get("v")) is not int or msg.get("v") != VERSION:
        raise PlaneError(f"unsupported protocol version {_short(msg.get('v'))}")
    if type(msg.get("type")) is not str:
        raise PlaneError("message has no type")
    return msg


def _str(m: dict, key: str, max_len: int = MAX_ID_CHARS, optional: bool = False) -> str | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if type(v) is not str or not v or len(v) > max_len:
        raise PlaneError(f"{key}: expected a non-empty string of at most {max_len} chars")
    return v


def _int(m: dict, key: str, lo: int, hi: int, optional: bool = False) -> int | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if type(v) is not int or not lo <= v <= hi:   # bool is not an int here
        raise PlaneError(f"{key}: expected an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _ints(m: dict, key: str, max_len: int, lo: int = 0, hi: int = 2**31 - 1) -> list[int]:
    v = m.get(key)
    if type(v) not in (tuple, list) or len(v) > max_len:
        raise PlaneError(f"{key}: expected a list of at most {max_len} integers")
    for t in v:
        if type(t) is not int or not lo <= t <= hi:
            raise PlaneError(f"{key}: expected integers in [{lo}, {hi}]")
    return list(v)


# Endpoints are checked where they are used (a worker that cannot connect to one falls
# back or replies prefill_failed), so a bad one fails that request, not the message.
MAX_ENDPOINT_CHARS = 1024


# ---- sampling params on the wire -----------------------------------------------------------------

_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                 "logprobs", "ignore_eos")


def params_to_wire(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in _PARAM_FIELDS}


def params_from_wire(d) -> SamplingParams:
    d = _map(d, "params")
    if set(d) - set(_PARAM_FIELDS):
        raise PlaneError(f"params: unknown fields {_short(sorted(set(d) - set(_PARAM_FIELDS)))}")
    for k in ("temperature", "top_p"):
        if k in d and (type(d[k]) not in (int, float) or not math.isfinite(d[k])):
            raise PlaneError(f"params.{k}: expected a finite number")
    for k in ("logprobs", "ignore_eos"):
        if k in d and type(d[k]) is not bool:
            raise PlaneError(f"params.{k}: expected a bool")
    for k in ("stop", "stop_token_ids"):
        if k in d:
            if type(d[k]) not in (tuple, list):
                raise PlaneError(f"params.{k}: expected a list")
            d[k] = list(d[k])
    if "stop" in d and not all(type(s) is str for s in d["stop"]):
        raise PlaneError("params.stop: expected a list of strings")
    try:
        p = SamplingParams(**d)
        p.validate()
    except (TypeError, ValueError) as e:
        raise PlaneError(f"params: {e}") from None
    return p


# ---- request plane ---------------------------------------------------------------------------------

# How long a decode worker waits for a prompt's KV from a prefill worker before it prefills
# in place: the default of the request's kv_timeout_s, the router's (the config file's
# transfer.timeout_s), the decode worker's cap and the KV receivers'.
KV_TIMEOUT_S = 30.0


@dataclass
class GenerateMsg:
    """router -> decode worker. mode "direct": prefill in place; "disaggregated": reserve blocks
    and have `prefill_endpoint` compute the prompt and ship its KV here."""
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    mode: str = "direct"
    prefill_endpoint: str | None = None
    prefill_worker: str | None = None
    cache_salt: bytes = b""
    kv_timeout_s: float = KV_TIMEOUT_S

    def encode(self) -> bytes:
        d = asdict(self)
        d["params"] = params_to_wire(self.params)
        return pack({"v": VERSION, "type": "generate", **d})


@dataclass
class PrefillMsg:
    """decode worker -> prefill worker: compute `prompt_ids`, sample the first token, and send
    the KV of blocks [first_block:] of the prompt to `kv_endpoint` under `kv_key`, into the
    receiver's `dst_block_ids` (one per shipped block)."""
    rid: str
    kv_key: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_endpoint: str
    dst_block_ids: list[int]
    first_block: int
    reply_to: str          # the decode worker's request endpoint, for "prefill_failed"
    cache_salt: bytes = b""

    def encode(self) -> bytes:
        d = asdict(self)
        d["params"] = params_to_wire(self.params)
        return pack({"v": VERSION, "type": "prefill", **d})


def encode_abort(rid: str) -> bytes:
    return pack({"v": VERSION, "type": "abort", "rid": rid})


def encode_drain() -> bytes:
    return pack({"v": VERSION, "type": "drain"})


def decode_request(buf: bytes):
    """-> GenerateMsg | PrefillMsg | ("abort", rid) | ("drain", None)"""
    m = unpack(buf)
    t = m["type"]
    if t == "abort":
        return ("abort", _str(m, "rid"))
    if t == "drain":
        return ("drain", None)
    salt = m.get("cache_salt", b"")
    if type(salt) is not bytes or len(salt) > 64:
        raise PlaneError("cache_salt: expected at most 64 bytes")
    if t == "generate":
        mode = m.get("mode")
        if mode not in ("direct", "disaggregated"):
            raise PlaneError(f"mode: expected 'direct' or 'disaggregated', got {mode!r}")
        to = m.get("kv_timeout_s", KV_TIMEOUT_S)
        if type(to) not in (int, float) or not 0 < to <= 3600:   # NaN fails the comparison
            raise PlaneError("kv_timeout_s: expected a number in (0, 3600]")
        return GenerateMsg(rid=_str(m, "rid"), prompt_ids=_ints(m, "prompt_ids", MAX_PROMPT_TOKENS),
                           params=params_from_wire(m.get("params")), mode=mode,
                           prefill_endpoint=_str(m, "prefill_endpoint", MAX_ENDPOINT_CHARS, optional=True),
                           prefill_worker=_str(m, "prefill_worker", optional=True),
                           cache_salt=salt, kv_timeout_s=float(to))
    if t == "prefill":
        return PrefillMsg(rid=_str(m, "rid"), kv_key=_str(m, "kv_key"),
                          prompt_ids=_ints(m, "prompt_ids", MAX_PROMPT_TOKENS),
                          params=params_from_wire(m.get("params")),
                          kv_endpoint=_str(m, "kv_endpoint", MAX_ENDPOINT_CHARS),
                          dst_block_ids=_ints(m, "dst_block_ids", MAX_PROMPT_TOKENS),
                          first_block=_int(m, "first_block", 0, MAX_PROMPT_TOKENS),
                          reply_to=_str(m, "reply_to", MAX_ENDPOINT_CHARS), cache_salt=salt)
    if t == "prefill_failed":
        return ("prefill_failed", _str(m, "kv_key"))
    raise PlaneError(f"unknown request-plane message type {_short(t)}")


def encode_prefill_failed(kv_key: str) -> bytes:
    return pack({"v": VERSION, "type": "prefill_failed", "kv_key": kv_key})


# ---- token plane ------------------------------------------------------------------------------------

@dataclass
class TokenItem:
    rid: str
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None        # "stop" | "length" | "abort" on the last item
    logprobs: list[float] = field(default_factory=list)
    # On the last item only:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    fallback: str | None = None              # why a disaggregated request was prefilled in place
    error: str | None = None                 # the worker rejected the request (bad input / capacity)
    error_code: str | None = None            # "invalid_argument" | "resource_exhausted" | "internal"


_ITEM_FIELDS = [f for f in TokenItem.__dataclass_fields__]


@dataclass
class TokenBatch:
    worker: str
    items: list[TokenItem]
    kv_events: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    load: dict = field(default_factory=dict)   # running, waiting, free_blocks, num_blocks

    def encode(self) -> bytes:
        return pack({"v": VERSION, "type": "tokens", "worker": self.worker,
                     "items": [[getattr(it, f) for f in _ITEM_FIELDS] for it in self.items],
                     "kv_events": [list(e) for e in self.kv_events], "load": self.load})


MAX_TOKENS_PER_ITEM = 4096          # tokens of one request in one engine step
MAX_TEXT_CHARS = 1 << 20
MAX_ERROR_CHARS = 1 << 16
MAX_KV_EVENTS = 1 << 16
MAX_HASH_BYTES = 64
MAX_LOAD_KEYS = 32
_FINISH_REASONS = (None, "stop", "length", "abort")
_EVENT_KINDS = ("stored", "evicted", "cleared")


def _opt_str(v, what: str, max_len: int) -> str | None:
    if v is not None and (type(v) is not str or len(v) > max_len):
        raise PlaneError(f"{what}: expected null or a string of at most {max_len} chars")
    return v


def _item(raw) -> TokenItem:
    """One token item, every field type- and range-checked: what reaches the router's
    queues (and from there the gRPC response) is exactly what the dataclass declares."""
    if type(raw) is not tuple or len(raw) != len(_ITEM_FIELDS):
        raise PlaneError("item: expected a list of the TokenItem fields")
    d = dict(zip(_ITEM_FIELDS, raw))
    rid = _str(d, "rid")
    token_ids = _ints(d, "token_ids", MAX_TOKENS_PER_ITEM)
    text = d["text"]
    if type(text) is not str or len(text) > MAX_TEXT_CHARS:
        raise PlaneError(f"item.text: expected a string of at most {MAX_TEXT_CHARS} chars")
    if d["finish_reason"] not in _FINISH_REASONS:
        raise PlaneError(f"item.finish_reason: expected one of {_FINISH_REASONS}, got {_short(d['finish_reason'])}")
    lp = d["logprobs"]
    if type(lp) not in (tuple, list) or len(lp) > len(token_ids) or any(type(x) not in (int, float) for x in lp):
        raise PlaneError("item.logprobs: expected a list of numbers, at most one per token")
    counts = [_int(d, k, 0, 2**32 - 1) for k in ("prompt_tokens", "cached_tokens", "completion_tokens")]
    return TokenItem(rid, token_ids, text, d["finish_reason"], [float(x) for x in lp], *counts,
                     fallback=_opt_str(d["fallback"], "item.fallback", MAX_ID_CHARS),
                     error=_opt_str(d["error"], "item.error", MAX_ERROR_CHARS),
                     error_code=_opt_str(d["error_code"], "item.error_code", 64))


def _event(e) -> tuple[str, bytes | None, bytes | None]:
    if type(e) is not tuple or len(e) != 3 or e[0] not in _EVENT_KINDS:
        raise PlaneError("kv_events: expected [kind, block_hash, parent_hash] events")
    kind, h, parent = e
    for x in (h, parent):
        if x is not None and (type(x) is not bytes or not x or len(x) > MAX_HASH_BYTES):
            raise PlaneError(f"kv_events: hashes are null or 1..{MAX_HASH_BYTES} bytes")
    if kind != "cleared" and h is None:
        raise PlaneError(f"kv_events: a {kind} event needs a block hash")
    return (kind, h, parent)


def decode_tokens(buf: bytes) -> TokenBatch:
    m = unpack(buf)
    if m["type"] != "tokens":
        raise PlaneError(f"unknown token-plane message type {_short(m['type'])}")
    worker = _str(m, "worker")
    items_raw = m.get("items")
    if type(items_raw) is not tuple or len(items_raw) > MAX_ITEMS:
        raise PlaneError(f"items: expected a list of at most {MAX_ITEMS}")
    items = [_item(raw) for raw in items_raw]
    events = m.get("kv_events", ())
    if type(events) is not tuple or len(events) > MAX_KV_EVENTS:
        raise PlaneError(f"kv_events: expected a list of at most {MAX_KV_EVENTS}")
    kv_events = [_event(e) for e in events]
    load = _map(m.get("load", _NO_PAIRS), "load", MAX_LOAD_KEYS)
    if not all(v is None or type(v) in (int, float, bool) or (type(v) is str and len(v) <= MAX_ENDPOINT_CHARS)
               for v in load.values()):
        raise PlaneError(f"load: values must be numbers, bools, null or strings of at most {MAX_ENDPOINT_CHARS}")
    return TokenBatch(worker=worker, items=items, kv_events=kv_events, load=load)
