"""The block manager alone: reference counts, copy-on-write, prefix registration and lookup."""

from __future__ import annotations

import pytest

from nkat_runtime.serve.block_pool import BlockPool, NoBlocks

BS = 4


class Store:
    """A stand-in for the KV pool: each block holds a list of what was written to it."""

    def __init__(self, n: int) -> None:
        self.data: list[list] = [["junk"] for _ in range(n)]
        self.copies: list[tuple[int, int]] = []

    def clear(self, b: int) -> None:
        self.data[b] = []

    def copy(self, src: int, dst: int) -> None:
        self.data[dst] = list(self.data[src])
        self.copies.append((src, dst))


def pool(n: int = 8) -> tuple[BlockPool, Store]:
    store = Store(n)
    return BlockPool(n, BS, store.clear, store.copy), store


def test_blocks_are_taken_lowest_first_cleared_and_given_back():
    p, store = pool()
    table: list[int] = []
    p.writable(table, 0, 10)  # 3 blocks for positions 0..9
    assert table == [0, 1, 2] and all(store.data[b] == [] for b in table)
    assert p.available() == 5 and p.stats().held == 3
    p.truncate(table, 5)
    assert table == [0, 1] and p.available() == 6
    p.release(table)
    assert table == [] and p.available() == 8
    p.check([])


def test_a_shared_block_is_copied_before_it_is_written():
    p, store = pool()
    a: list[int] = []
    p.writable(a, 0, 8)
    store.data[0], store.data[1] = ["a0"], ["a1"]
    b = p.share(a[:2])
    assert p.needed(b, 6, 9) == 2  # the shared block 1 and a new block 2
    p.writable(b, 6, 9)
    assert b[0] == 0 and b[1] not in a and store.data[b[1]] == ["a1"] and store.copies == [(1, b[1])]
    assert p.refs[0] == 2 and p.refs[1] == 1
    p.check([a, b])
    p.release(a)
    p.release(b)
    p.check([])
    assert p.available() == 8


def test_registered_prefixes_are_found_by_tokens_and_chain():
    p, _ = pool()
    tokens = list(range(10))
    t: list[int] = []
    p.writable(t, 0, 10)
    p.register(t, tokens, exact=10)  # blocks 0, 1 are full; block 2 holds 2 of 4
    assert p.lookup(tokens + [99], 11) == t[:2]
    assert p.lookup(tokens, 7) == t[:1]  # a block multiple within the limit
    assert p.lookup([0, 1, 2, 3, 9, 9, 9, 9], 8) == t[:1]  # the second block differs
    assert p.lookup([5] + tokens[1:], 10) == []
    # a block not computed in place (exact below it) is not registered, nor what follows
    u: list[int] = []
    p.writable(u, 0, 8)
    p.register(u, [7] * 8, exact=3)
    assert p.lookup([7] * 8, 8) == []


def test_released_prefix_blocks_stay_findable_until_taken():
    p, _ = pool(4)
    tokens = list(range(8))
    t: list[int] = []
    p.writable(t, 0, 8)
    p.register(t, tokens, 8)
    blocks = list(t)
    p.release(t)
    assert p.stats().cached == 2 and p.available() == 4
    revived = p.share(p.lookup(tokens, 8))
    assert revived == blocks and p.stats().cached == 0
    p.release(revived)
    other: list[int] = []
    p.writable(other, 0, 16)  # takes the two free blocks, then the cached ones, oldest first
    assert p.lookup(tokens, 8) == [] and p.stats().cached == 0
    with pytest.raises(NoBlocks):
        p.writable(other, 16, 17)
    p.check([other])


def test_writing_a_registered_block_unregisters_it():
    p, _ = pool()
    tokens = list(range(8))
    t: list[int] = []
    p.writable(t, 0, 8)
    p.register(t, tokens, 8)
    p.writable(t, 5, 6)  # rewriting position 5 (a backtrack): block 1's entries change
    assert p.lookup(tokens, 8) == t[:1]
    p.register(t, [0, 1, 2, 3, 4, 50, 6, 7], 8)
    assert p.lookup([0, 1, 2, 3, 4, 50, 6, 7], 8) == t and p.lookup(tokens, 8) == t[:1]


def test_the_same_chain_is_registered_once():
    p, _ = pool()
    a: list[int] = []
    b: list[int] = []
    p.writable(a, 0, 4)
    p.writable(b, 0, 4)
    p.register(a, [1, 2, 3, 4], 4)
    p.register(b, [1, 2, 3, 4], 4)
    assert p.lookup([1, 2, 3, 4], 4) == a
    p.release(a)
    p.release(b)
    assert p.stats().cached == 1 and p.stats().free == 7
