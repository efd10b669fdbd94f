"""Paged KV memory bookkeeping: a pool of fixed-size blocks with reference counts and prefix hashes.

Follows vLLM's v1 design (Kwon et al. 2023, PagedAttention; vLLM's BlockPool and KVCacheManager):
- `BlockPool` owns the blocks: a free queue in eviction order, a reference count per block, and a
  map from block hash to block for prefix caching. A block that drops to zero references goes to the
  back of the free queue but keeps its hash, so a later request with the same prefix can take it back;
  it is evicted (its hash dropped) only when it reaches the front and is allocated for new data.
- `KVCacheManager` keeps one block table per request over the pool, finds the cached prefix of a new
  request, allocates blocks for the tokens about to be computed (all or nothing, so the scheduler can
  preempt instead), registers blocks once they are full, and frees a request's blocks at once.

A block's hash chains the previous block's hash with the block's token ids (SHA-256), so equal token
blocks at different prefixes never alias. This file holds no tensors; the KV tensors are indexed by
block id elsewhere.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class NoFreeBlocks(RuntimeError):
    """The pool cannot satisfy an allocation; the scheduler should preempt a request."""


@dataclass(slots=True)
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered for prefix caching


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of `token_ids`."""
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[start : start + block_size]))
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in self.blocks)  # front: evicted first
        self.cached: dict[bytes, Block] = {}
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[Block]:
        """n blocks with one reference each, taken from the front of the free queue (evicting their hashes)."""
        if n > len(self.free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.hash is not None:
                if self.cached.get(block.hash) is block:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a prefix-cache hit); referenced blocks leave the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free[block.id]
            block.ref_count += 1

    def release(self, blocks: Sequence[Block]) -> None:
        """Drop one reference on each. Freed blocks join the back of the queue in reverse order, so a
        sequence's tail is evicted before its head (heads are the prefixes most likely to be shared)."""
        for block in reversed(blocks):
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.id} released more often than it was referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.id] = block

    def register(self, block: Block, block_hash: bytes) -> None:
        """Make a full block findable by its hash (the first block with a given hash wins)."""
        if not self.enable_prefix_caching or block.hash is not None:
            return
        block.hash = block_hash
        self.cached.setdefault(block_hash, block)

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached.get(block_hash) if self.enable_prefix_caching else None


@dataclass
class RequestBlocks:
    blocks: list[Block] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes of the full blocks registered so far


class KVCacheManager:
    """Per-request block tables over one BlockPool."""

    def __init__(self, pool: BlockPool, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.requests: dict[str, RequestBlocks] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def computed_prefix(self, token_ids: Sequence[int]) -> list[Block]:
        """Cached blocks covering the longest full-block prefix of `token_ids`, keeping at least one
        token to compute (the model must run on something to produce the next token's logits)."""
        hits = []
        for h in block_hashes(token_ids[: len(token_ids) - 1], self.block_size):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request_id: str, num_tokens: int, prefix: Sequence[Block] = ()) -> bool:
        """Make the request's table cover `num_tokens` tokens, starting a new request from `prefix`
        (cached blocks). All or nothing: False, with nothing taken, when the pool is short."""
        req = self.requests.get(request_id)
        have = len(req.blocks) if req else len(prefix)
        # Hit blocks sitting in the free queue stop being free once touched: count them as a cost.
        reusing_free = 0 if req else sum(1 for b in prefix if b.ref_count == 0)
        need = self.blocks_needed(num_tokens) - have
        if max(need, 0) + reusing_free > self.pool.num_free:
            return False
        if req is None:
            self.pool.touch(prefix)
            req = self.requests[request_id] = RequestBlocks(list(prefix), [b.hash for b in prefix])
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        return True

    def register_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """After the first `num_computed` tokens are in the cache, register every newly full block."""
        req = self.requests[request_id]
        full = num_computed // self.block_size
        for i in range(len(req.hashes), full):
            parent = req.hashes[-1] if req.hashes else None
            h = hash_block(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            self.pool.register(req.blocks[i], h)
            req.hashes.append(h)

    def free(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.pool.release(req.blocks)

    def block_table(self, request_id: str) -> list[int]:
        return [b.id for b in self.requests[request_id].blocks]

    def slots(self, request_id: str, positions: Iterable[int]) -> list[int]:
        """Flat KV slot of each position: block_id * block_size + offset."""
        table = self.requests[request_id].blocks
        return [table[p // self.block_size].id * self.block_size + p % self.block_size for p in positions]
