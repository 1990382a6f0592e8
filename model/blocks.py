"""The KV block manager: which pool block holds which 64 positions of which sequence. Pure: no
torch, no I/O; the tensors live in ``model.kv.KVPool`` and are indexed by the ids handed out here.

Every sequence owns a block table (a list of block ids, position ``p`` in block ``p // size``).
Blocks are reference counted: a fork (n choices) or a request whose prefix blocks are already in
the pool takes references, never a copy. A full block is registered under the store's block hash
(the same chain as the store's keys, computed by the session), so a block in the pool, in a
finished sequence's tail or in the store is one identity. A block no sequence references stays
cached under its hash (LRU) until an allocation needs it; a block without a hash is free at once.
Writing into a block another table shares (or a registered one) copies it first (copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[str | None] = [None] * num_blocks
        self.by_hash: dict[str, int] = {}
        # Lowest ids first: a block used before has its pages touched already.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, hashed; LRU first
        self.high_water = 0  # one more than the highest id ever handed out

    # -- counts ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free) + len(self._cached)

    # -- prefix cache ----------------------------------------------------------------------
    def match(self, hashes: list[str]) -> list[int]:
        """The blocks registered under the leading ``hashes`` (no references taken)."""
        out = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def count_cached(self, hashes: list[str]) -> int:
        """How many of the leading ``hashes`` are in the pool (advisory: other threads may read it)."""
        n = 0
        for h in hashes:
            if h not in self.by_hash:
                break
            n += 1
        return n

    def register(self, block: int, block_hash: str) -> None:
        """Name full block ``block`` by its store hash; a hash already held keeps its block."""
        if self.hash_of[block] is None and block_hash not in self.by_hash:
            self.hash_of[block] = block_hash
            self.by_hash[block_hash] = block

    # -- tables ----------------------------------------------------------------------------
    def take(self, blocks: list[int]) -> list[int]:
        """Add a reference to each of ``blocks`` (shared prefix blocks); returns them."""
        for b in blocks:
            if self.refs[b] == 0:
                self._cached.pop(b, None)
            self.refs[b] += 1
        return list(blocks)

    def _new_block(self) -> int:
        if self._free:
            b = self._free.pop()
            self.high_water = max(self.high_water, b + 1)
        else:
            b, _ = self._cached.popitem(last=False)  # evict the least recently used cached block
            del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = None
        self.refs[b] = 1
        return b

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks, one reference each.

        Raises:
            MemoryError: fewer are free or cached (check ``can_allocate`` first).
        """
        if not self.can_allocate(num_blocks):
            raise MemoryError(f"{num_blocks} KV blocks asked, {len(self._free) + len(self._cached)} free")
        return [self._new_block() for _ in range(num_blocks)]

    def _writable(self, block: int) -> bool:
        return self.refs[block] == 1 and self.hash_of[block] is None

    def blocks_to_append(self, table: list[int], start: int, end: int) -> int:
        """Blocks an append of positions ``[start, end)`` to ``table`` needs (new and copies)."""
        need = max(0, self.blocks_for(end) - len(table))
        first = start // self.block_size
        if start < end and first < len(table) and not self._writable(table[first]):
            need += 1
        return need

    def may_append(self, table: list[int], start: int, end: int) -> bool:
        return self.can_allocate(self.blocks_to_append(table, start, end))

    def append(self, table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Make ``table`` hold writable blocks for positions ``[start, end)`` (in place).

        Returns:
            (source, destination) block copies the caller must make before writing: a shared or
            registered block about to be written is copied to a fresh one first.
        """
        if not self.may_append(table, start, end):
            raise MemoryError("not enough free KV blocks")
        copies = []
        first = start // self.block_size
        if start < end and first < len(table) and not self._writable(table[first]):
            src = table[first]
            dst = self._new_block()
            table[first] = dst
            self.release([src])
            copies.append((src, dst))
        table.extend(self.allocate(max(0, self.blocks_for(end) - len(table))))
        return copies

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of ``table``."""
        return self.take(table)

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of ``table``: registered blocks stay cached (most
        recently used last), the others are free."""
        for b in reversed(table):  # the deepest block is evicted first: it is reused least
            self.refs[b] -= 1
            if self.refs[b] > 0:
                continue
            if self.hash_of[b] is not None:
                self._cached[b] = None
            else:
                self._free.append(b)
