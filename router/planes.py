"""The two hot-path planes between the router and the workers (ZeroMQ + msgpack).

  request plane  router -> decode worker, decode worker -> prefill worker (PUSH -> PULL)
  token plane    decode worker -> router: one message per engine step (PUSH -> PULL)

Every message is one msgpack map with `v` (protocol version) and `type`. No pickle.
Decoders check size, version, type and every field before building anything, and raise
PlaneError (a ValueError) on anything malformed; receivers log and drop such messages.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import msgpack

from engine.sampling_params import SamplingParams

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


def unpack(buf: bytes) -> dict:
    if len(buf) > MAX_MESSAGE_BYTES:
        raise PlaneError(f"message of {len(buf)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES,
                             max_str_len=MAX_MESSAGE_BYTES, max_array_len=MAX_PROMPT_TOKENS,
                             max_map_len=64, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PlaneError(f"undecodable message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise PlaneError("message is not a map")
    if msg.get("v") != VERSION:
        raise PlaneError(f"unsupported protocol version {msg.get('v')!r}")
    if not isinstance(msg.get("type"), str):
        raise PlaneError("message has no type")
    return msg


def _str(m: dict, key: str, max_len: int = MAX_ID_CHARS, optional: bool = False) -> str | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise PlaneError(f"{key}: expected a non-empty string of at most {max_len} chars")
    return v


def _int(m: dict, key: str, lo: int, hi: int, optional: bool = False) -> int | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PlaneError(f"{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _ints(m: dict, key: str, max_len: int, lo: int = 0, hi: int = 2**31 - 1) -> list[int]:
    v = m.get(key)
    if not isinstance(v, list) or len(v) > max_len:
        raise PlaneError(f"{key}: expected a list of at most {max_len} integers")
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or not lo <= t <= hi:
            raise PlaneError(f"{key}: expected integers in [{lo}, {hi}]")
    return v


# ---- sampling params on the wire -----------------------------------------------------------------

_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                 "logprobs", "ignore_eos")


def params_to_wire(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in _PARAM_FIELDS}


def params_from_wire(d) -> SamplingParams:
    if not isinstance(d, dict) or set(d) - set(_PARAM_FIELDS):
        raise PlaneError("params: expected a map of sampling fields")
    for k in ("temperature", "top_p"):
        if k in d and (not isinstance(d[k], (int, float)) or isinstance(d[k], bool) or not math.isfinite(d[k])):
            raise PlaneError(f"params.{k}: expected a finite number")
    if "stop" in d and (not isinstance(d["stop"], list) or not all(isinstance(s, str) for s in d["stop"])):
        raise PlaneError("params.stop: expected a list of strings")
    try:
        p = SamplingParams(**d)
        p.validate()
    except (TypeError, ValueError) as e:
        raise PlaneError(f"params: {e}") from None
    return p


# ---- request plane ---------------------------------------------------------------------------------

@dataclass
class GenerateMsg:
    """router -> decode worker. mode "direct": prefill in place; "disagg": reserve blocks
    and have `prefill_endpoint` compute the prompt and ship its KV here."""
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    mode: str = "direct"
    prefill_endpoint: str | None = None
    prefill_worker: str | None = None
    cache_salt: bytes = b""
    kv_timeout_s: float = 30.0

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


def encode_shutdown() -> bytes:
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
    if not isinstance(salt, bytes) or len(salt) > 64:
        raise PlaneError("cache_salt: expected at most 64 bytes")
    if t == "generate":
        mode = m.get("mode")
        if mode not in ("direct", "disagg"):
            raise PlaneError(f"mode: expected 'direct' or 'disagg', got {mode!r}")
        to = m.get("kv_timeout_s", 30.0)
        if not isinstance(to, (int, float)) or isinstance(to, bool) or not 0 < to <= 3600:
            raise PlaneError("kv_timeout_s: expected a number in (0, 3600]")
        return GenerateMsg(rid=_str(m, "rid"), prompt_ids=_ints(m, "prompt_ids", MAX_PROMPT_TOKENS),
                           params=params_from_wire(m.get("params")), mode=mode,
                           prefill_endpoint=_str(m, "prefill_endpoint", 1024, optional=True),
                           prefill_worker=_str(m, "prefill_worker", optional=True),
                           cache_salt=salt, kv_timeout_s=float(to))
    if t == "prefill":
        return PrefillMsg(rid=_str(m, "rid"), kv_key=_str(m, "kv_key"),
                          prompt_ids=_ints(m, "prompt_ids", MAX_PROMPT_TOKENS),
                          params=params_from_wire(m.get("params")), kv_endpoint=_str(m, "kv_endpoint", 1024),
                          dst_block_ids=_ints(m, "dst_block_ids", MAX_PROMPT_TOKENS),
                          first_block=_int(m, "first_block", 0, MAX_PROMPT_TOKENS),
                          reply_to=_str(m, "reply_to", 1024), cache_salt=salt)
    if t == "prefill_failed":
        return ("prefill_failed", _str(m, "kv_key"))
    raise PlaneError(f"unknown request-plane message type {t!r}")


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


def decode_tokens(buf: bytes) -> TokenBatch:
    m = unpack(buf)
    if m["type"] != "tokens":
        raise PlaneError(f"unknown token-plane message type {m['type']!r}")
    items_raw = m.get("items")
    if not isinstance(items_raw, list) or len(items_raw) > MAX_ITEMS:
        raise PlaneError("items: expected a bounded list")
    items = []
    for raw in items_raw:
        if not isinstance(raw, list) or len(raw) != len(_ITEM_FIELDS):
            raise PlaneError("item: wrong shape")
        it = TokenItem(*raw)
        if not isinstance(it.rid, str) or not isinstance(it.token_ids, list) or not isinstance(it.text, str):
            raise PlaneError("item: wrong field types")
        items.append(it)
    events = m.get("kv_events", [])
    if not isinstance(events, list) or len(events) > 1 << 16:
        raise PlaneError("kv_events: expected a bounded list")
    for e in events:
        if not (isinstance(e, list) and len(e) == 3 and e[0] in ("stored", "evicted", "cleared")):
            raise PlaneError("kv_events: malformed event")
    load = m.get("load", {})
    if not isinstance(load, dict):
        raise PlaneError("load: expected a map")
    return TokenBatch(worker=_str(m, "worker"), items=items, kv_events=[tuple(e) for e in events], load=load)
