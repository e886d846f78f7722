"""The prefix-cache block hash, shared by the router (its prefix index, fed by the decode
workers' KV events) and the engine (its block manager's cache keys): both sides must hash a
prompt's full blocks the same way, so the function lives here, with no engine dependency.
Re-exported by :mod:`engine.block_manager`."""
from __future__ import annotations

import hashlib

import numpy as np

ROOT_HASH = b"\x00" * 16
# The default KV block size in tokens, of the engine (EngineConfig.block_size) and of the
# router's prompt hashes (RouterConfig.block_size): the two must agree, so it is defined here.
BLOCK_SIZE = 16


def hash_block(parent: bytes, token_ids, salt: bytes = b"") -> bytes:
    """Hash of one full block, chained on its parent's so equal hashes mean equal prefixes.
    128-bit blake2b: collisions are not a practical concern. Shared with the router."""
    h = hashlib.blake2b(parent, digest_size=16, key=salt[:64])
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def hash_prefix_blocks(token_ids: list[int], block_size: int, salt: bytes = b"",
                       start: int = 0, parent: bytes = ROOT_HASH) -> list[bytes]:
    """Chained hashes of the full blocks of token_ids, from block index `start` on."""
    out = []
    for b in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size], salt)
        out.append(parent)
    return out
