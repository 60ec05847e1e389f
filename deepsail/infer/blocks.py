"""KV blocks: a refcounted allocator over the pool's block ids, and the prefix cache.

Prefix reuse: a block that is full is registered under the hash of its token chain (its own tokens plus the hash of
everything before it), so a later request whose prompt starts with the same full blocks points its block table at
them instead of recomputing. A freed registered block keeps its contents and stays findable until the allocator
needs it back (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict, deque

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the chain before this block, this block's tokens)


class BlockAllocator:
    """Refcounted block ids, plus the prefix cache: full blocks findable by the hash of their token chain.

    A block is in exactly one of three places: in use (refcount > 0), free (no contents worth keeping), or
    evictable (refcount 0 but registered, so a later prompt may still reuse it; reclaimed LRU-first)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self.key_of: dict[int, BlockKey] = {}
        self.block_of: dict[BlockKey, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        """A block with refcount 1. The caller checks `num_free` first."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of[self.key_of.pop(block)]
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than taken"
        if self.refs[block] == 0:
            if block in self.key_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block holding this chain, with a reference taken; None on a miss."""
        block = self.block_of.get(key)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1
        return block

    def forget_prefixes(self) -> None:
        """Drop the prefix cache: no block is findable any more, and cached-but-unused blocks become free. For when
        the weights changed (a training step between GRPO rollouts): the cached keys and values are the old model's."""
        self.free.extend(self.evictable)
        self.evictable.clear()
        self.key_of.clear()
        self.block_of.clear()

    def register(self, block: int, key: BlockKey) -> None:
        """Make a full block findable. If an identical block is registered already, keep that one."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key], self.key_of[block] = block, key
