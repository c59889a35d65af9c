"""Paged KV-cache block accounting with prefix reuse (no tensors here: the runner owns those).

Invariants (checked by `check_invariants`, exercised by property tests):
- every block is either referenced (ref_cnt > 0, owned by >= 1 running request) or in the free queue;
- a full block computed for a request is registered under its chain hash and may be shared by
  any later request whose salted prefix hashes to the same chain; shared blocks are never written
  (only a request's own, not-yet-full tail blocks receive new KV);
- freed hashed blocks stay in the free queue in LRU order and keep their hash until evicted, so a
  later request can still hit them; eviction takes the least recently freed block first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.engine.request import Request
from services.prefix_cache.hashing import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}   # the same, as ids: kept, not rebuilt every step
        self.num_cached_blocks: dict[str, int] = {}   # how many of a request's blocks are registered
        self.on_block_full = None   # optional callback(block_id, block_hash), e.g. the Redis KV tier
        self.prefix_queries = 0     # prompt tokens looked up
        self.prefix_hits = 0        # prompt tokens found

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read it, do not change it)."""
        return self.req_block_ids.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a new request, in whole blocks. At least one token is left to
        compute so that the step produces logits for the next token."""
        if not self.enable_prefix_caching or request.num_computed_tokens > 0:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ---- allocate / free ----------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] = ()) -> bool:
        """Make room for `num_new_tokens` beyond the request's computed tokens (plus `computed_blocks`,
        a prefix hit being taken). Returns False and changes nothing when memory is short."""
        owned = self.req_blocks.get(request.request_id, [])
        total = request.num_computed_tokens + num_new_tokens
        if not computed_blocks and total <= len(owned) * self.block_size \
                and not self._newly_full(request, total):
            return True   # a decode step inside its last block: nothing to take, nothing fills up
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(owned) - len(computed_blocks)
        # Hit blocks that sit in the free queue stop being free once taken.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(needed, 0) + num_revived > self.num_free_blocks:
            return False
        for b in computed_blocks:
            if b.ref_cnt == 0:
                del self.free_queue[b.block_id]
            b.ref_cnt += 1
        owned = self.req_blocks.setdefault(request.request_id, owned)
        if computed_blocks:
            owned.extend(computed_blocks)
            self.num_cached_blocks[request.request_id] = len(owned)
        for _ in range(max(needed, 0)):
            owned.append(self._pop_free())
        ids = self.req_block_ids.setdefault(request.request_id, [])
        if len(ids) != len(owned):
            ids.extend(b.block_id for b in owned[len(ids):])
        self._register_full_blocks(request, num_computed + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        """Release a finished, aborted or preempted request's blocks. Tail blocks go to the free
        queue first so that a prefix's head outlives its tail under eviction."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_block_ids.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        for b in reversed(blocks):
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {b.block_id} freed twice"
            if b.ref_cnt == 0:
                self.free_queue[b.block_id] = b

    def import_cached_blocks(self, prefix: list[BlockHash], new: list[BlockHash]) -> list[int]:
        """[kv-tier] Take free blocks for `new`, prefix blocks loaded from the KV tier that continue
        the cached chain `prefix`, and register them: cached, free, most recently used. The caller
        writes their KV (ModelRunner.import_blocks) before the next step. The prefix's own free
        blocks are refreshed first so that taking blocks cannot evict the chain's head; fewer than
        `new` are taken when free blocks run short. Returns the block ids, in `new`'s order."""
        if not self.enable_prefix_caching:
            return []
        num_head_free = 0
        for h in prefix:
            b = self.cached.get(h)
            if b is not None and b.ref_cnt == 0:
                self.free_queue.move_to_end(b.block_id)
                num_head_free += 1
        ids: list[int] = []
        for h in new[:max(self.num_free_blocks - num_head_free, 0)]:
            if h in self.cached:
                break
            block = self._pop_free()
            block.ref_cnt, block.block_hash = 0, h
            self.cached[h] = block
            self.free_queue[block.block_id] = block
            ids.append(block.block_id)
        return ids

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if b.ref_cnt == 0:
                b.block_hash = None
                del self.cached[h]

    # ---- internals ----------------------------------------------------------------------------
    def _pop_free(self) -> KVBlock:
        _, block = self.free_queue.popitem(last=False)
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _newly_full(self, request: Request, num_tokens_after_step: int) -> range:
        """Indices of the request's blocks that will be full of *committed* tokens after this step and are
        not registered yet (none without prefix caching). Draft tokens are excluded: their KV may be rolled back."""
        if not self.enable_prefix_caching:
            return range(0)
        num_full = min(num_tokens_after_step, request.num_tokens) // self.block_size
        return range(self.num_cached_blocks.get(request.request_id, 0), min(num_full, len(request.block_hashes)))

    def _register_full_blocks(self, request: Request, num_tokens_after_step: int) -> None:
        """The newly full blocks become shareable."""
        new = self._newly_full(request, num_tokens_after_step)
        if not new:
            return
        owned = self.req_blocks[request.request_id]
        for i in new:
            block, h = owned[i], request.block_hashes[i]
            if block.block_hash is None:
                block.block_hash = h
                self.cached.setdefault(h, block)
                if self.on_block_full is not None:
                    self.on_block_full(block.block_id, h)
        self.num_cached_blocks[request.request_id] = new.stop

    def check_invariants(self) -> None:
        refs: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for b in self.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0), f"block {b.block_id}: ref_cnt {b.ref_cnt} != owners"
            assert (b.ref_cnt == 0) == (b.block_id in self.free_queue), f"block {b.block_id} free state"
        for h, b in self.cached.items():
            assert b.block_hash == h
        for rid, blocks in self.req_blocks.items():
            assert self.req_block_ids[rid] == [b.block_id for b in blocks], f"{rid}: block id list out of date"
