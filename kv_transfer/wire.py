"""The KV transfer wire format: msgpack headers plus raw tensor bytes, never pickle.

A message is a list of frames (a ZeroMQ multipart message on the ZeroMQ backend):

* ``kv``    -- frame 0: header ``{"version", "type": "kv", "request_id", "layer",
  "block_ids", "dtype", "shape"}``; frame 1: the raw bytes of one C-contiguous tensor of
  ``shape`` (``[2, len(block_ids), block_size, num_kv_heads, head_dim]``: K and V of the
  destination blocks ``block_ids`` of layer ``layer``), ``prod(shape) * itemsize`` bytes.
  bfloat16 and float8 travel as their raw bytes (numpy has no such types).
* ``done``  -- one frame: ``{"version", "type": "done", "request_id", "first_token",
  "num_layers"}``: the sender has sent every layer; ``first_token`` is the token the prefill
  worker sampled.
* ``abort`` -- one frame: ``{"version", "type": "abort", "request_id", "reason"}``: the
  sender gives the transfer up (the receiver reports it failed at once).

Decoding validates everything before it allocates anything: the header's size, its
msgpack, the version, the type, the exact key set, the type and range of every field, the
dtype against an allow-list and against the receiving cache, the shape against what the
cache expects for that many blocks, the byte length, the block ids against the cache and
against the blocks reserved for that request, the layer, and the frame count. Anything
wrong raises :class:`WireError` (a ``ValueError``); nothing else escapes the decoder.
"""
from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import torch

PROTOCOL_VERSION = 1

# Bounds on what a peer may make us parse or hold.
MAX_HEADER_BYTES = 256 * 1024
MAX_REQUEST_ID_LEN = 256          # characters
MAX_REASON_LEN = 1024             # characters
MAX_BLOCKS_PER_MESSAGE = 32768    # a sender splits larger layers into several messages
MAX_LAYERS = 4096
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_TOKEN_ID = 2**31 - 1
MAX_FRAMES = 2                    # kv: header + data; done/abort: header only
# Default cap on one tensor frame (ZMQ_MAXMSGSIZE on the receiver); senders split a layer
# into messages of at most this many bytes.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20

KV, DONE, ABORT = "kv", "done", "abort"
_KEYS = {
    KV: frozenset({"version", "type", "request_id", "layer", "block_ids", "dtype", "shape"}),
    DONE: frozenset({"version", "type", "request_id", "first_token", "num_layers"}),
    ABORT: frozenset({"version", "type", "request_id", "reason"}),
}
_FRAMES = {KV: 2, DONE: 1, ABORT: 1}

# Wire dtype name -> torch dtype. Only plain floating types a KV cache is kept in.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


class WireError(ValueError):
    """A malformed, truncated, oversized or unexpected KV message. ``request_id`` is set
    when the header named a request (so a receiver can fail that transfer at once)."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class UnknownRequestError(WireError):
    """A well-formed message for a request the receiver does not expect (never announced,
    or already completed, failed, aborted or cancelled: late data). Dropped, not fatal."""


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel as KV; one of {sorted(DTYPES)}") from None


# ---- endpoints ------------------------------------------------------------------------------------
def split_endpoint(ep, scheme: str, keys: set[str], want: str) -> tuple[str, int, dict[str, str]]:
    """``SCHEME://HOST:PORT?k=v&...`` with exactly the query ``keys``, each once -> (host,
    port, {key: value}); ValueError(want) for anything else (the backends' endpoint strings)."""
    if not isinstance(ep, str):
        raise TypeError(f"endpoint must be a str, got {type(ep).__name__}")
    if not ep.startswith(scheme) or len(ep) > 512:
        raise ValueError(want)
    u = urllib.parse.urlsplit(ep)
    try:
        q = urllib.parse.parse_qs(u.query, strict_parsing=True, max_num_fields=len(keys) + 1)
        host, port = u.hostname, u.port
    except ValueError:
        raise ValueError(want) from None
    if (not host or port is None or not 0 < port < 65536 or u.path or u.fragment or u.username
            or set(q) != keys or any(len(v) != 1 for v in q.values())):
        raise ValueError(want)
    return host, port, {k: v[0] for k, v in q.items()}


# ---- the receiving cache's geometry ------------------------------------------------------------
@dataclass(frozen=True)
class KVLayout:
    """What the receiving KV cache looks like; messages are checked against it. A layer's
    data for ``n`` blocks is a tensor of :meth:`block_shape` ``(n)`` in ``dtype``."""
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int | None = None   # when set, ``done``'s first_token must be below it

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for k in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            v = getattr(self, k)
            if type(v) is not int or v < 1:
                raise ValueError(f"KVLayout.{k} must be a positive int, got {v!r}")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(f"KVLayout.num_layers > {MAX_LAYERS}")
        if self.vocab_size is not None and (type(self.vocab_size) is not int or self.vocab_size < 1):
            raise ValueError(f"KVLayout.vocab_size must be a positive int, got {self.vocab_size!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    def block_shape(self, n: int) -> tuple[int, ...]:
        return (2, n, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @classmethod
    def from_engine(cls, engine) -> "KVLayout":
        """The layout of an ``engine.LLMEngine``'s cache (duck-typed: no import of engine)."""
        cache = engine.kv_cache   # [layer, k/v, block, slot, kv_head, head_dim]
        layers, _, blocks, block_size, heads, head_dim = cache.shape
        return cls(num_layers=layers, num_blocks=blocks, block_size=block_size, num_kv_heads=heads,
                   head_dim=head_dim, dtype=dtype_name(cache.dtype),  # the cache's own (fp8 KV differs)
                   vocab_size=engine.model_config.vocab_size)


@dataclass(frozen=True)
class Reservation:
    """The blocks a receiver reserved for one request, and how many layers it expects."""
    block_ids: tuple[int, ...]
    num_layers: int
    block_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "block_set", frozenset(self.block_ids))


# ---- headers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVHeader:
    request_id: str
    layer: int
    block_ids: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class DoneHeader:
    request_id: str
    first_token: int
    num_layers: int


@dataclass(frozen=True)
class AbortHeader:
    request_id: str
    reason: str


Header = KVHeader | DoneHeader | AbortHeader


@dataclass(frozen=True)
class KVMessage:
    header: KVHeader
    data: torch.Tensor      # header.shape, layout dtype, CPU; backed by the received frame


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _int(v, what: str, lo: int, hi: int, rid: str | None) -> int:
    if type(v) is not int:       # bool and int subclasses are not ints here
        raise WireError(f"{what}: expected int, got {type(v).__name__}", rid)
    if not lo <= v <= hi:
        raise WireError(f"{what}: {v} outside [{lo}, {hi}]", rid)
    return v


def _str(v, what: str, max_len: int, rid: str | None, allow_empty: bool) -> str:
    if type(v) is not str:
        raise WireError(f"{what}: expected str, got {type(v).__name__}", rid)
    if len(v) > max_len or (not v and not allow_empty):
        raise WireError(f"{what}: length {len(v)} outside [{0 if allow_empty else 1}, {max_len}]", rid)
    return v


def _int_list(v, what: str, min_len: int, max_len: int, lo: int, hi: int, rid: str | None) -> tuple[int, ...]:
    if type(v) is not list:
        raise WireError(f"{what}: expected list, got {type(v).__name__}", rid)
    if not min_len <= len(v) <= max_len:
        raise WireError(f"{what}: length {len(v)} outside [{min_len}, {max_len}]", rid)
    for x in v:
        _int(x, what + " item", lo, hi, rid)
    return tuple(v)


def check_request_id(v) -> str:
    return _str(v, "request_id", MAX_REQUEST_ID_LEN, None, allow_empty=False)


def decode_header(buf) -> Header:
    """Schema-check one header frame (no knowledge of the receiving cache). Raises
    WireError on anything but a well-formed header of a known version and type."""
    try:
        n = len(buf)
    except TypeError:
        raise WireError(f"header: not a buffer ({type(buf).__name__})") from None
    if n > MAX_HEADER_BYTES:
        raise WireError(f"header: {n} bytes > {MAX_HEADER_BYTES}")
    if n == 0:
        raise WireError("header: empty frame")
    try:
        d = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True,
                            max_str_len=MAX_HEADER_BYTES, max_bin_len=0, max_ext_len=0,
                            max_array_len=MAX_BLOCKS_PER_MESSAGE, max_map_len=16)
    except Exception as e:   # msgpack raises ValueError, StackError, ExtraData, FormatError, ...
        raise WireError(f"header: not valid msgpack ({type(e).__name__}: {_short(str(e))})") from None
    if type(d) is not dict:
        raise WireError(f"header: expected a map, got {type(d).__name__}")
    version = d.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"header: unsupported protocol version {_short(version)} (want {PROTOCOL_VERSION})")
    mtype = d.get("type")
    if type(mtype) is not str or mtype not in _KEYS:
        raise WireError(f"header: unknown message type {_short(mtype)}")
    rid = None
    if type(d.get("request_id")) is str:
        rid = check_request_id(d["request_id"])
    keys = set(d)
    if keys != _KEYS[mtype]:
        missing, extra = sorted(_KEYS[mtype] - keys), sorted(map(str, keys - _KEYS[mtype]))
        raise WireError(f"header: {mtype} keys wrong (missing {missing}, unexpected {_short(extra)})", rid)
    rid = check_request_id(d["request_id"])
    if mtype == KV:
        layer = _int(d["layer"], "layer", 0, MAX_LAYERS - 1, rid)
        block_ids = _int_list(d["block_ids"], "block_ids", 1, MAX_BLOCKS_PER_MESSAGE, 0, MAX_DIM, rid)
        dt = d["dtype"]
        if type(dt) is not str or dt not in DTYPES:
            raise WireError(f"dtype: {_short(dt)} is not one of {sorted(DTYPES)}", rid)
        shape = _int_list(d["shape"], "shape", 1, MAX_NDIM, 0, MAX_DIM, rid)
        return KVHeader(rid, layer, block_ids, dt, shape)
    if mtype == DONE:
        return DoneHeader(rid, _int(d["first_token"], "first_token", 0, MAX_TOKEN_ID, rid),
                          _int(d["num_layers"], "num_layers", 1, MAX_LAYERS, rid))
    return AbortHeader(rid, _str(d["reason"], "reason", MAX_REASON_LEN, rid, allow_empty=True))


def check_kv(h: KVHeader, layout: KVLayout, res: Reservation) -> int:
    """Check a KV header against the receiving cache and the request's reservation.
    Returns the byte length the data frame must have."""
    rid = h.request_id
    if h.layer >= min(layout.num_layers, res.num_layers):
        raise WireError(f"layer: {h.layer} outside [0, {min(layout.num_layers, res.num_layers)})", rid)
    if h.dtype != layout.dtype:
        raise WireError(f"dtype: {h.dtype} but the receiving cache is {layout.dtype}", rid)
    if h.block_ids and max(h.block_ids) >= layout.num_blocks:
        raise WireError(f"block_ids: {max(h.block_ids)} outside [0, {layout.num_blocks})", rid)
    ids = set(h.block_ids)
    if len(ids) != len(h.block_ids):
        raise WireError("block_ids: duplicates", rid)
    if not ids <= res.block_set:
        stray = [b for b in h.block_ids if b not in res.block_set]
        raise WireError(f"block_ids: {_short(stray)} not reserved for {rid!r}", rid)
    want = layout.block_shape(len(h.block_ids))
    if h.shape != want:
        raise WireError(f"shape: {list(h.shape)} but {len(h.block_ids)} blocks of this cache are {list(want)}", rid)
    return h.nbytes


def _as_bytes_view(frame, what: str, rid: str | None) -> memoryview:
    try:
        mv = memoryview(frame)
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            mv = mv.cast("B")
    except (TypeError, ValueError) as e:
        raise WireError(f"{what}: not a contiguous byte buffer ({e})", rid) from None
    return mv


def tensor_from_frame(frame, dtype: str, shape: tuple[int, ...], rid: str | None = None) -> torch.Tensor:
    """A tensor over the frame's bytes (no copy when the frame is writable and aligned)."""
    mv = _as_bytes_view(frame, "data", rid)
    want = math.prod(shape) * ITEMSIZE[dtype]
    if mv.nbytes != want:
        raise WireError(f"data: {mv.nbytes} bytes but shape {list(shape)} of {dtype} is {want}", rid)
    if mv.readonly:
        raw = torch.frombuffer(bytearray(mv), dtype=torch.uint8)
    else:
        raw = torch.frombuffer(mv, dtype=torch.uint8)
        if raw.data_ptr() % ITEMSIZE[dtype]:
            raw = raw.clone()   # libzmq may hand frames at any offset; views need alignment
    return raw.view(DTYPES[dtype]).view(shape)


def decode_message(frames: Sequence, layout: KVLayout, reservations: Mapping[str, Reservation]
                   ) -> KVMessage | DoneHeader | AbortHeader:
    """Validate a whole message (a list of frames: bytes, memoryviews or zmq.Frames).
    Raises UnknownRequestError for a well-formed message of an unexpected request, and
    WireError for everything else that is wrong."""
    if not frames:
        raise WireError("message: no frames")
    head = _as_bytes_view(frames[0], "header", None)
    h = decode_header(head)
    mtype = KV if isinstance(h, KVHeader) else DONE if isinstance(h, DoneHeader) else ABORT
    want = _FRAMES[mtype]
    if len(frames) != want:
        kind = "too many frames" if len(frames) > want else "truncated: data frame missing"
        raise WireError(f"message: {kind} (a {mtype} message has {want})", h.request_id)
    res = reservations.get(h.request_id)
    if res is None:
        raise UnknownRequestError(f"request {h.request_id!r} is not expected here", h.request_id)
    if isinstance(h, DoneHeader):
        if h.num_layers != res.num_layers:
            raise WireError(f"done: num_layers {h.num_layers} but {res.num_layers} expected", h.request_id)
        if layout.vocab_size is not None and h.first_token >= layout.vocab_size:
            raise WireError(f"done: first_token {h.first_token} outside [0, {layout.vocab_size})", h.request_id)
        return h
    if isinstance(h, AbortHeader):
        return h
    check_kv(h, layout, res)
    return KVMessage(h, tensor_from_frame(frames[1], h.dtype, h.shape, h.request_id))


# ---- encoding ---------------------------------------------------------------------------------------
def _pack(d: dict) -> bytes:
    b = msgpack.packb(d, use_bin_type=True)
    if len(b) > MAX_HEADER_BYTES:
        raise WireError(f"header: {len(b)} bytes > {MAX_HEADER_BYTES}", d.get("request_id"))
    return b


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 and fp8 included)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def encode_kv(request_id: str, layer: int, block_ids: Sequence[int], tensor: torch.Tensor) -> list:
    """Frames of one kv message. ``tensor`` must be a contiguous CPU tensor of shape
    ``[2, len(block_ids), ...]``; its bytes are not copied (keep it alive until sent)."""
    rid = check_request_id(request_id)
    ids = [int(b) for b in block_ids]
    h = dict(version=PROTOCOL_VERSION, type=KV, request_id=rid, layer=int(layer), block_ids=ids,
             dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))
    # Re-check with the receiver's own schema so a sender cannot emit what a receiver rejects.
    decode_header(header := _pack(h))
    if tensor.dim() < 2 or tensor.shape[1] != len(ids):
        raise WireError(f"tensor: shape {list(tensor.shape)} does not hold {len(ids)} blocks on dim 1", rid)
    return [header, tensor_bytes(tensor)]


def encode_done(request_id: str, first_token: int, num_layers: int) -> list:
    h = _pack(dict(version=PROTOCOL_VERSION, type=DONE, request_id=request_id,
                   first_token=first_token, num_layers=num_layers))
    decode_header(h)
    return [h]


def encode_abort(request_id: str, reason: str = "") -> list:
    h = _pack(dict(version=PROTOCOL_VERSION, type=ABORT, request_id=request_id,
                   reason=str(reason)[:MAX_REASON_LEN]))
    decode_header(h)
    return [h]
