"""The one definition of block hashes, shared by the engine's prefix cache, the Redis KV tier and
the router's prefix index.

A block's hash chains its parent's hash with its token ids, so equal hashes mean equal whole
prefixes. The chain's root is the tenant salt: two tenants never share a hash, so they never
share a cached block (in a replica or in Redis). Only full blocks are hashed.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes

_ROOT = b"inference-stack/v1"


def root_hash(salt: str | bytes | None = None) -> BlockHash:
    s = salt.encode() if isinstance(salt, str) else (salt or b"")
    return hashlib.blake2b(_ROOT + b"\0" + s, digest_size=16).digest()


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | bytes | None = None,
                 start: int = 0, parent: BlockHash | None = None) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block index `start` (whose parent is `parent`)."""
    parent = root_hash(salt) if parent is None else parent
    out: list[BlockHash] = []
    for i in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[i:i + block_size])
        out.append(parent)
    return out
