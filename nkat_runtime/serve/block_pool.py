"""Who holds which KV block: reference counts, free lists, shared prompt prefixes and
copy-on-write (nano-vllm's ``BlockManager`` is the model; the storage is ``model/kv_cache.py``).

A sequence's cache is its block table, a list of block ids: position ``p`` is in block
``table[p // block_size]``. Blocks are taken as a sequence grows and given back when its table
is released; a block several tables hold is never written in place: :meth:`BlockPool.writable`
gives the writer a copy first (copy-on-write).

Prefix sharing: a full block whose entries were computed from the sequence's start, in place
(no context shift, no moved chunk before it), is *registered* under a key made of its tokens and
its parent block's serial (an id never reused, so a key names one chain of tokens from position
0, with no hash to collide). A new prompt walks its full blocks through the keys and shares what
it finds (:meth:`BlockPool.lookup`), so eight users of one character card hold its prompt once.
A released block that is registered stays findable (the "cached" free list, least recently
freed first out) until it is taken for something else.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence


class NoBlocks(RuntimeError):
    """The pool has no free block."""


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int  # no holder, nothing registered
    cached: int  # no holder, still findable by its prefix
    held: int  # in some table
    shared: int  # in more than one table
    block_size: int


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int, clear: Callable[[int], None],
                 copy: Callable[[int, int], None]) -> None:
        self.n_blocks, self.block_size = n_blocks, block_size
        self._clear, self._copy = clear, copy
        self.refs = [0] * n_blocks
        self._free = list(range(n_blocks))  # a heap: the lowest id first, so one sequence's blocks run in order
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._key_of: dict[int, tuple] = {}
        self._serial_of: dict[int, int] = {}
        self._by_key: dict[tuple, int] = {}
        self._serials = 0
        self.reserved: set[int] = set()  # held for good outside every table (:meth:`reserve`)

    # --- counts -----------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks that can be taken now (free, or cached and given up)."""
        return len(self._free) + len(self._cached)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def stats(self) -> PoolStats:
        held = sum(r > 0 for r in self.refs) - len(self.reserved)  # a reserved block is no sequence's
        return PoolStats(self.n_blocks - len(self.reserved), len(self._free), len(self._cached), held, sum(r > 1 for r in self.refs),
                         self.block_size)

    def needed(self, table: Sequence[int], start: int, stop: int) -> int:
        """Blocks :meth:`writable` would take for positions ``start .. stop-1`` of ``table``."""
        if stop <= start:
            return 0
        first, last = start // self.block_size, (stop - 1) // self.block_size
        return sum(i >= len(table) or self.refs[table[i]] > 1 for i in range(first, last + 1))

    # --- taking and giving back -------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self._forget(block)
        else:
            raise NoBlocks("the KV pool has no free block")
        self.refs[block] = 1
        self._clear(block)
        return block

    def reserve(self) -> int:
        """A cleared block held for good, outside every table (decode graphs' padding rows write there)."""
        block = self._take()
        self.reserved.add(block)
        return block

    def _drop(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than held"
        if self.refs[block] == 0:
            if block in self._key_of:
                self._cached[block] = None
            else:
                heapq.heappush(self._free, block)

    def release(self, table: list[int]) -> None:
        """Give back every block of ``table`` (which is emptied)."""
        for block in table:
            self._drop(block)
        table.clear()

    def forget(self, blocks: Sequence[int]) -> None:
        """Unregister those of ``blocks`` that no table holds: plain free blocks from now on, found
        by no prefix lookup (an erased slot's content)."""
        for block in blocks:
            if self.refs[block] == 0 and block in self._key_of:
                self._forget(block)
                del self._cached[block]
                heapq.heappush(self._free, block)

    def truncate(self, table: list[int], n_tokens: int) -> None:
        """Keep the blocks that hold the first ``n_tokens`` positions, give back the rest."""
        keep = self.blocks_for(n_tokens)
        for block in table[keep:]:
            self._drop(block)
        del table[keep:]

    def share(self, blocks: Sequence[int]) -> list[int]:
        """A new table holding ``blocks`` too (found by :meth:`lookup`)."""
        for block in blocks:
            if self.refs[block] == 0:
                self._cached.pop(block, None)
            self.refs[block] += 1
        return list(blocks)

    def writable(self, table: list[int], start: int, stop: int) -> None:
        """Make positions ``start .. stop-1`` of ``table`` safe to write: blocks are appended where
        the table is short, a block another table holds too is replaced by a copy, and a
        registered block is unregistered (its entries are about to change). Raises
        :class:`NoBlocks` (after doing what it could) when the pool runs out."""
        if stop <= start:
            return
        first, last = start // self.block_size, (stop - 1) // self.block_size
        if first > len(table):
            raise ValueError(f"position {start} is past the end of a {len(table)}-block table")
        for i in range(first, last + 1):
            if i == len(table):
                table.append(self._take())
                continue
            block = table[i]
            if self.refs[block] > 1:
                copy = self._take()
                self._copy(block, copy)
                self._drop(block)
                table[i] = copy
            elif block in self._key_of:
                self._forget(block)

    def forget_cached(self) -> None:
        """Unregister every block no table holds (they become plain free blocks)."""
        for block in self._cached:
            self._forget(block)
            heapq.heappush(self._free, block)
        self._cached.clear()

    # --- prefix sharing ---------------------------------------------------------------------------
    def _key(self, parent: int | None, tokens: Sequence[int], i: int) -> tuple:
        bs = self.block_size
        return (-1 if parent is None else self._serial_of[parent], tuple(tokens[i * bs : (i + 1) * bs]))

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The registered blocks that hold ``tokens[:n]`` for the largest block multiple ``n <= limit``."""
        found: list[int] = []
        for i in range(limit // self.block_size):
            block = self._by_key.get(self._key(found[-1] if found else None, tokens, i))
            if block is None:
                break
            found.append(block)
        return found

    def register(self, table: Sequence[int], tokens: Sequence[int], exact: int) -> None:
        """Register the full blocks of ``table`` below position ``exact`` (entries computed in place
        from position 0 for ``tokens``), from the first one not yet registered. A block whose
        chain another block already holds is left alone, and so are the ones after it."""
        for i in range(min(exact, len(tokens)) // self.block_size):
            block = table[i]
            if block in self._key_of:
                continue
            parent = table[i - 1] if i else None
            if parent is not None and parent not in self._key_of:
                return
            key = self._key(parent, tokens, i)
            if key in self._by_key:
                return
            self._serials += 1
            self._key_of[block], self._serial_of[block], self._by_key[key] = key, self._serials, block

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        self._serial_of.pop(block)
        if self._by_key.get(key) == block:
            del self._by_key[key]

    def check(self, tables: Sequence[Sequence[int]]) -> None:
        """Raise AssertionError unless the reference counts are exactly the tables' holdings and
        every block is held, free or cached (the tests' consistency check)."""
        counts = [int(b in self.reserved) for b in range(self.n_blocks)]
        for table in tables:
            for block in table:
                counts[block] += 1
        assert counts == self.refs, "reference counts differ from the tables"
        idle = set(self._free) | set(self._cached)
        assert len(idle) == len(self._free) + len(self._cached), "a block is free twice"
        assert all((self.refs[b] == 0) == (b in idle) for b in range(self.n_blocks)), "a held block is free"
